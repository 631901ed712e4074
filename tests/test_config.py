"""Config: defaults from conf/, dotted overrides, and one-line errors for bad keys and values."""
import pytest

from searchllm.config import ConfigError, check_resume_overrides, load_config


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
        (["budget.count=params"], "budget.count='params' is not allowed; choose one of: total, decoder"),
        (["search.population=abc"], "bad value for 'search.population'"),
        (["search.mutations=90", "search.crossovers=30"], "must be >= 0 and <= search.population=16"),
        (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
        (["data.fitness.name=text"], "data.fitness.name=text needs data.fitness.path"),
        (["oops"], "unexpected argument 'oops'"),
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
