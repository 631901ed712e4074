"""A method is an ordered list of stages, chosen by the kind of search.mode's strategy."""

from searchllm import strategies
from searchllm.stages import METHODS, stages_for


def test_every_strategy_kind_has_a_method():
    assert set(strategies.KINDS) <= set(METHODS)
    for name in strategies.names():
        assert stages_for(strategies.get(name).kind)


def test_the_level_search_and_the_mask_search_share_generate_build_heal_export_evaluate_and_report():
    levels = [s.name for s in stages_for("levels")]
    masks = [s.name for s in stages_for("search")]
    tail = ["build", "heal", "export", "evaluate", "report"]
    assert levels == ["generate", "database", "search", "reform", *tail]
    assert masks == ["generate", "calibrate", "search", "reform", *tail]
    assert stages_for("levels")[0] == stages_for("search")[0]
    assert stages_for("baseline") == stages_for("search")
    assert stages_for("levels")[-5:] == stages_for("search")[-5:]


def test_the_heal_runs_after_the_pool_is_gone_and_before_the_export():
    names = {s.name: s for s in stages_for("levels")}
    assert names["build"].pool and not names["heal"].pool and not names["export"].pool


def test_stages_on_the_pool_come_before_those_after_it():
    for stages in METHODS.values():
        on_pool = [s.pool for s in stages]
        assert on_pool == sorted(on_pool, reverse=True), [s.name for s in stages]
