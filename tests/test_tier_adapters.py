"""Adapter stack degradation: NPC delta dropped first, then the subfaction delta, then the base model alone;
the choice says it was degraded and why."""

from types import SimpleNamespace

import pytest

from tier_scheduler.adapters import Availability, choose_stack, degradation_steps, kind_of

TASK, SUB, NPC = "vampire.dialogue_style", "vampire.sub.nosferatu", "npc.mirela.dialogue_style"
WANTED = [TASK, SUB, NPC]


def test_full_stack_when_everything_is_resident():
    choice = choose_stack(WANTED, Availability(resident={TASK, SUB, NPC}))
    assert choice.adapters == (TASK, SUB, NPC) and not choice.degraded and choice.reason == ""


@pytest.mark.parametrize("resident, expected, dropped", [
    ({TASK, SUB}, (TASK, SUB), (NPC,)),
    ({TASK, NPC}, (TASK,), (SUB, NPC)),  # an NPC delta is never kept without its subfaction delta
    ({TASK}, (TASK,), (SUB, NPC)),
    ({SUB, NPC}, (), (TASK, SUB, NPC)),
    (set(), (), (TASK, SUB, NPC)),
])
def test_degradation_order(resident, expected, dropped):
    choice = choose_stack(WANTED, Availability(resident=resident, registered=set(WANTED)))
    assert choice.adapters == expected and choice.dropped == dropped and choice.degraded
    assert choice.wanted == tuple(WANTED)
    assert "not resident yet" in choice.reason
    assert ("base model alone" in choice.reason) == (expected == ())


def test_reasons_name_the_missing_adapter_and_the_cause():
    availability = Availability(resident={TASK, SUB}, registered={TASK, SUB}, failed={NPC})
    choice = choose_stack(WANTED, availability)
    assert choice.reason == f"{NPC} failed to load: dropped {NPC} (kept {TASK}, {SUB})"
    choice = choose_stack([TASK, SUB], Availability(resident={TASK}))
    assert choice.reason == f"{SUB} missing from the registry: dropped {SUB} (kept {TASK})"


def test_disk_loads_count_only_when_allowed():
    registered = Availability(resident={TASK}, registered={TASK, SUB, NPC}, allow_disk_load=True)
    assert not choose_stack(WANTED, registered).degraded
    assert choose_stack(WANTED, Availability(resident={TASK}, registered=set(WANTED))).degraded


def test_any_predicate_and_registry_records():
    records = [SimpleNamespace(name=TASK), SimpleNamespace(name=NPC)]  # no subfaction delta registered
    choice = choose_stack(records, lambda name: name != NPC)
    assert choice.adapters == (TASK,) and choice.reason == f"{NPC} unavailable: dropped {NPC} (kept {TASK})"
    assert choose_stack([], lambda name: False).adapters == ()


def test_steps_and_kinds():
    assert [kind_of(n) for n in WANTED] == ["task", "subfaction", "npc"]
    assert kind_of("npc.mirela") == "npc" and kind_of("lich.sub.ashen.world_knowledge") == "subfaction"
    assert degradation_steps((TASK, SUB, NPC)) == [(TASK, SUB, NPC), (TASK, SUB), (TASK,), ()]
    assert degradation_steps((TASK,)) == [(TASK,), ()]
    with pytest.raises(ValueError, match="duplicate"):
        choose_stack([TASK, TASK], lambda name: True)
