"""SchedulerConfig: validated when built, per tier and kind lookups, the archetypes of the registry."""

import dataclasses

import pytest

from tier_scheduler.config import ARCHETYPES, SchedulerConfig, Tier


def test_defaults_of_the_issue():
    config = SchedulerConfig()
    assert (config.gold_enter_m, config.gold_exit_m, config.gold_cap, config.silver_cap) == (25, 35, 200, 400)
    assert 5 <= config.batch_window_min_ms <= config.batch_window_max_ms <= 15
    assert config.deadline_ms(Tier.GOLD, "talk") == 150
    assert config.deadline_ms(Tier.BRONZE, "summary") == config.summary_deadline_ms
    assert config.max_new_tokens(Tier.SILVER, "talk") < config.max_new_tokens(Tier.GOLD, "talk")
    assert config.turn_window(Tier.GOLD) == (20, 12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gold_cap = 5


@pytest.mark.parametrize("overrides, match", [
    (dict(gold_enter_m=40.0), "gold_exit_m"),
    (dict(silver_enter_m=30.0), "silver_enter_m"),
    (dict(silver_exit_m=70.0), "silver_exit_m"),
    (dict(gold_cap=-1), "gold_cap"),
    (dict(gold_cap=True), "gold_cap"),
    (dict(batch_window_min_ms=20.0), "batch_window_max_ms"),
    (dict(batch_load_alpha=0.0), "batch_load_alpha"),
    (dict(gold_talk_deadline_ms=0.0), "gold_talk_deadline_ms"),
    (dict(gold_enter_m=float("nan")), "gold_enter_m"),
    (dict(silver_turn_window_min=9), "silver_turn_window_min"),
    (dict(max_queued=10), "max_queued"),
])
def test_invalid_configs_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=f"SchedulerConfig.{match}"):
        SchedulerConfig(**overrides)


def test_lookup_errors():
    config = SchedulerConfig()
    with pytest.raises(ValueError, match="Bronze never reaches the LLM"):
        config.deadline_ms(Tier.BRONZE, "talk")
    with pytest.raises(ValueError, match="kind"):
        config.max_new_tokens(Tier.GOLD, "sing")
    with pytest.raises(ValueError, match="barks only"):
        config.turn_window(Tier.BRONZE)


def test_archetypes_match_the_adapter_registry():
    from gpu_worker.lora.registry import ARCHETYPES as REGISTRY_ARCHETYPES

    assert ARCHETYPES == REGISTRY_ARCHETYPES
