"""Config: defaults from conf/, dotted overrides, and one-line errors for bad keys and values."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from searchllm.config import Config, ConfigError, check_resume_overrides, flatten, load_config
from searchllm.stages.plan import float32_cut


def test_defaults_come_from_conf_and_overrides_win():
    c = load_config(["budget.target=0.6", "space.attention=heads"])
    assert c.model.path == "smollm2" and c.budget.target == 0.6 and c.space.attention == "heads"


def test_paper_config_has_the_papers_budget():
    c = load_config(["--config", "conf/paper.yaml"])
    s = c.search
    assert (s.population, s.parents, s.mutations, s.crossovers, s.generations) == (100, 10, 50, 30, 50)
    assert (c.data.fitness.samples, c.data.fitness.seqlen, c.data.calibration.samples) == (5, 2048, 128)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["ray.replica=2"], "unknown config key 'ray.replica'"),
        (["budget.count=params"], "budget.count='params' is not allowed; choose one of: auto, total, decoder"),
        (["search.population=abc"], "bad value for 'search.population'"),
        (["search.mutations=90", "search.crossovers=30"], "must be >= 0 and <= search.population=16"),
        (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
        (["--config", "conf"], "--config 'conf' is a directory (it holds default.yaml"),
        (["data.fitness.name=text"], "data.fitness.name=text needs data.fitness.path"),
        (["oops"], "unexpected argument 'oops'"),
        (
            ["method=sparsegpt"],
            "method='sparsegpt' is not allowed; choose one of: searchllm, paper, uniform, flap, random",
        ),
        (["eval.lengths=[128,long]"], "eval.lengths entry 'long' is not a number or 'full'"),
        (["eval.corpora=[wiki:test]"], "unknown corpus 'wiki'"),
        (["reform.finalists=0"], "reform.finalists=0 must be >= 1"),
        (["data.generate.dtype=int8"], "data.generate.dtype='int8' is not allowed; choose one of: model, auto"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(argv, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resume_only_accepts_execution_overrides():
    check_resume_overrides(["resume=runs/x", "ray.replicas=2", "search.generations=60"])
    with pytest.raises(ConfigError, match="'budget.target' cannot change on resume"):
        check_resume_overrides(["resume=runs/x", "budget.target=0.5"])


def test_defaults_are_the_searchllm_method():
    c = load_config([])
    assert (c.method, c.search.mode, c.search.compensate) == ("searchllm", "levels", False)
    lv = c.levels
    assert (lv.heads, lv.fitness, lv.inputs, lv.tokens, lv.score_dtype, lv.probe_tokens) == (
        "equal",
        "kl",
        "accumulated",
        [8192],
        "auto",
        4096,
    )
    assert c.data.calibration.samples * c.data.calibration.seqlen >= 64 * 512  # enough tokens for the solves
    assert (
        load_config(["method=searchllm"]).levels == lv and load_config(["method=searchllm"]).search == c.search
    )  # the preset says what the defaults say


@pytest.mark.parametrize(
    "method,expect",
    [
        ("paper", dict(mode="evolution", init="uniform", solver="admm", reform=True)),
        ("uniform", dict(mode="uniform", reform=False)),
        ("flap", dict(mode="flap", reform=False)),
        ("random", dict(mode="random", solver="exact", reform=True)),
        ("layerdrop", dict(mode="layerdrop", reform=False)),
    ],
)
def test_a_method_preset_sets_its_keys_and_later_overrides_still_win(method, expect):
    c = load_config([f"method={method}"])
    assert c.method == method and c.search.mode == expect["mode"] and c.reform.enabled == expect["reform"]
    assert c.search.init == expect.get("init", c.search.init) and c.reform.solver == expect.get(
        "solver", c.reform.solver
    )
    assert c.budget.target == 0.8  # untouched keys keep conf/default.yaml's values
    assert load_config([f"method={method}", "reform.enabled=true"]).reform.enabled


def test_paper_method_uses_the_papers_admm_settings():
    r = load_config(["method=paper"]).reform
    assert (r.solver, r.rho, r.iters, r.inputs, r.targets, r.features) == (
        "admm",
        1.0,
        30,
        "sequential",
        "layer",
        "full",
    )
    assert (r.bias, r.finalists, r.flap_finalist) == (False, 1, False)


def started_run(tmp_path, *argv):
    from searchllm.config import to_yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config([f"run_dir={run}", *argv])))
    return run


def test_resume_auto_continues_a_started_run_with_the_same_settings(tmp_path):
    from searchllm.driver import resolve_config

    run = started_run(tmp_path, "budget.target=0.6")
    cfg, _ = resolve_config([f"run_dir={run}", "budget.target=0.6", "resume=auto", "ray.replicas=4"])
    assert cfg.resume == str(run) and cfg.budget.target == 0.6 and cfg.ray.replicas == 4


def test_resume_auto_starts_a_run_dir_that_holds_no_run(tmp_path):
    from searchllm.driver import resolve_config

    cfg, run = resolve_config([f"run_dir={tmp_path / 'new'}", "resume=auto"])
    assert cfg.resume is None and run.path == tmp_path / "new"


def test_resume_auto_refuses_a_run_started_with_other_settings(tmp_path):
    from searchllm.driver import resolve_config

    run = started_run(tmp_path, "budget.target=0.6")
    with pytest.raises(ConfigError, match=r"was started with budget.target=0.6, this command asks for 0.8"):
        resolve_config([f"run_dir={run}", "budget.target=0.8", "resume=auto"])


def test_ray_replicas_stages_and_threads_take_a_number_or_auto():
    cfg = load_config(["ray.replicas=auto", "ray.stages=3"])
    assert cfg.ray.replicas == "auto" and cfg.ray.stages == 3
    with pytest.raises(ConfigError, match="ray.stages=0 must be an integer >= 1 or auto"):
        load_config(["ray.stages=0"])
    with pytest.raises(ConfigError, match="ray.threads=0 must be an integer >= 1 or auto"):
        load_config(["ray.threads=0"])


# -- random overrides: accepted, or exit 2 with one line; never a traceback -------------------------------

KEYS = sorted(
    k
    for k in flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    if k not in ("resume", "run_dir")  # those open run dirs: tests of their own
)
SCALARS = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "auto", "", "[]", "{}", "[", "]", "'", '"', "${oops}", "1e400", "-0"]),
    st.text("abcxyz_-./:0123456789", max_size=12),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"))
OVERRIDES = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(KEYS), st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True)), VALUES
    ).map(lambda kv: f"{kv[0]}={kv[1]}"),
    min_size=1,
    max_size=3,
)


class Accepted(Exception):
    """The config stage passed: the driver went on to plan the run."""


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(argv=OVERRIDES)
def test_random_overrides_are_accepted_or_stop_with_exit_2_and_one_line(argv, monkeypatch, capsys):
    import searchllm.driver as driver

    def planned(cfg, run, alongside=None):
        raise Accepted

    monkeypatch.setattr(driver, "plan", planned)
    try:
        code = driver.main(argv)
    except Accepted:
        return
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("searchllm: error: "), (argv, err)


@pytest.mark.parametrize(
    "native, local, dtype, tokens",
    [
        (False, True, "auto", ([4096], 2048)),
        (True, True, "auto", ([8192], 4096)),
        (False, False, "auto", ([8192], 4096)),
        (False, True, "float32", ([8192], 4096)),
    ],
)
def test_a_cpu_without_native_bfloat16_scores_the_default_search_on_half_the_tokens_once(native, local, dtype, tokens):
    cfg = load_config([f"levels.score_dtype={dtype}"])
    float32_cut(cfg, native_bf16=native, local=local)
    assert (cfg.levels.tokens, cfg.levels.probe_tokens) == tokens
    float32_cut(cfg, native_bf16=native, local=local)  # a resume reads the cut config back: no second cut
    assert (cfg.levels.tokens, cfg.levels.probe_tokens) == tokens


def test_a_float32_share_outside_zero_to_one_stops_with_one_line():
    with pytest.raises(ConfigError, match=r"levels.float32_share=0.0 must be in \(0, 1\]"):
        load_config(["levels.float32_share=0"])
