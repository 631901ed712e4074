"""The strategy registry: search.mode names a registered strategy; a new one is a module, not a branch."""

import pytest

from searchllm import strategies
from searchllm.config import ConfigError, load_config


def test_every_builtin_search_mode_is_a_registered_strategy_of_a_known_kind():
    kinds = {s: strategies.get(s).kind for s in strategies.names()}
    assert kinds == {
        "levels": "levels",
        "evolution": "search",
        "random": "search",
        "uniform": "baseline",
        "flap": "baseline",
        "layerdrop": "baseline",
    }
    assert [s for s in strategies.names() if strategies.get(s).compensates] == ["flap"]


def test_an_unregistered_search_mode_stops_with_one_line_listing_the_registered_ones():
    with pytest.raises(ConfigError) as e:
        load_config(["search.mode=annealing"])
    assert "search.mode='annealing'" in str(e.value) and "layerdrop" in str(e.value) and "\n" not in str(e.value)


def test_a_strategy_registered_by_a_new_module_becomes_a_valid_search_mode(monkeypatch):
    monkeypatch.setattr(strategies, "_REGISTRY", dict(strategies._REGISTRY))

    @strategies.register("everything", "baseline", "keeps the whole model (test only)")
    def everything(space, scores, budget):
        return space.full()

    assert load_config(["search.mode=everything"]).search.mode == "everything"
    assert strategies.get("everything").make is everything


def test_registering_a_second_strategy_under_a_taken_name_is_refused(monkeypatch):
    monkeypatch.setattr(strategies, "_REGISTRY", dict(strategies._REGISTRY))
    with pytest.raises(ValueError, match="registered twice"):
        strategies.register("flap", "baseline", "another FLAP")(lambda space, scores, budget: None)
