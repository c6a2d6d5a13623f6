"""Action schemas and the validator: only actions that the archetype, the NPC's state and the game state
allow pass; everything else gets a clear reason and a safe default; player text cannot change game state."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tier_scheduler.actions import (
    ACTIONS,
    DISABLED_STATES,
    NO_TARGET,
    UNDEAD,
    Action,
    Entity,
    action_or_default,
    action_schema,
    safe_default,
    validate_action,
)
from tier_scheduler.config import ARCHETYPES


def world_of(*entities):
    return {e.entity_id: e for e in entities}


ZOMBIE = Entity("z1", "npc", (0.0, 0.0, 0.0), archetype="zombie", state="hunting", horde_id=0)
PLAYER = Entity("p1", "player", (1.5, 0.0, 0.0))
FAR_PLAYER = Entity("p2", "player", (5.0, 0.0, 0.0))
BODY = Entity("n9", "npc", (1.0, 1.0, 0.0), alive=False, archetype="vampire")
WORLD = world_of(ZOMBIE, PLAYER, FAR_PLAYER, BODY)


# ---------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_schema_per_archetype(archetype):
    schema = action_schema(archetype, targets=["p1", "n9", "p1"])
    assert schema["properties"]["action"]["enum"] == list(ACTIONS[archetype])
    assert {"wander", "idle"} <= set(ACTIONS[archetype])
    assert schema["properties"]["target"]["enum"] == ["p1", "n9", NO_TARGET]
    assert list(schema["properties"]) == ["action", "target"] and schema["additionalProperties"] is False
    assert action_schema(archetype)["properties"]["target"]["type"] == "string"


@pytest.mark.parametrize("archetype", ARCHETYPES)
def test_schemas_compile_as_grammars(archetype):
    xgrammar = pytest.importorskip("xgrammar")
    for schema in (action_schema(archetype), action_schema(archetype, ["p1"])):
        assert "root" in str(xgrammar.Grammar.from_json_schema(json.dumps(schema)))


def test_named_actions_of_the_issue():
    assert {"attack", "lunge", "follow_horde", "wander", "feed", "groan"} <= set(ACTIONS["zombie"])
    assert {"charm", "feed", "retreat", "converse", "stalk"} <= set(ACTIONS["vampire"])
    assert set(ACTIONS) == set(ARCHETYPES)
    with pytest.raises(ValueError, match="archetype"):
        action_schema("dragon")


# ------------------------------------------------------------------------------------------- validator


def test_valid_actions_carry_the_game_position():
    verdict = validate_action("z1", {"action": "attack", "target": "p1"}, WORLD)
    assert verdict.ok and verdict.action == Action("z1", "attack", "p1", (1.5, 0.0, 0.0))
    assert validate_action("z1", '{"action": "feed", "target": "n9"}', WORLD).ok  # JSON text works too
    groan = validate_action("z1", {"action": "groan", "target": NO_TARGET}, WORLD)
    assert groan.action == Action("z1", "groan")


@pytest.mark.parametrize("candidate, reason", [
    ({"action": "charm", "target": "p1"}, "'charm' is not an action of a zombie"),
    ({"action": "attack", "target": "p2"}, "5.0 m away, beyond the 2 m range of 'attack'"),
    ({"action": "attack", "target": "p9"}, "target 'p9' does not exist"),
    ({"action": "attack", "target": "z1"}, "cannot target the actor itself"),
    ({"action": "attack", "target": NO_TARGET}, "'attack' needs a target"),
    ({"action": "feed", "target": "p1"}, "needs a body target"),
    ({"action": "attack", "target": "n9"}, "needs a living target"),
    ({"action": "attack", "target": "p1", "damage": 999}, "unexpected fields ['damage']"),
    ({"action": 3}, "'action' must be a string"),
    ({"action": "attack", "target": 7}, "'target' must be a string id"),
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
])
def test_rejections_say_why(candidate, reason):
    verdict = validate_action("z1", candidate, WORLD)
    assert not verdict.ok and reason in verdict.reason
    action, why = action_or_default("z1", candidate, WORLD)
    assert action == Action("z1", "wander") and why == verdict.reason


def test_states_gate_actions():
    wolf = Entity("w1", "npc", (0.0, 0.0, 0.0), archetype="werewolf", state="wolf")
    human = Entity("w1", "npc", (0.0, 0.0, 0.0), archetype="werewolf", state="human")
    assert validate_action("w1", {"action": "pounce", "target": "p1"}, world_of(wolf, PLAYER)).ok
    assert "needs state ['wolf']" in validate_action("w1", {"action": "pounce", "target": "p1"},
                                                     world_of(human, PLAYER)).reason
    frenzied = Entity("v1", "npc", (0.0, 0.0, 0.0), archetype="vampire", state="frenzied")
    assert "not allowed while 'frenzied'" in validate_action("v1", {"action": "charm", "target": "p1"},
                                                             world_of(frenzied, PLAYER)).reason
    loner = Entity("z2", "npc", (0.0, 0.0, 0.0), archetype="zombie")
    assert "needs a horde" in validate_action("z2", {"action": "follow_horde"}, world_of(loner)).reason
    dead = Entity("z3", "npc", (0.0, 0.0, 0.0), alive=False, archetype="zombie", state="dead")
    assert "can only idle" in validate_action("z3", {"action": "wander"}, world_of(dead)).reason
    assert safe_default("z3", world_of(dead)) == Action("z3", "idle")
    assert validate_action("z3", {"action": "idle"}, world_of(dead)).ok


def test_unknown_actor_is_rejected():
    assert "not an NPC" in validate_action("p1", {"action": "idle"}, WORLD).reason
    assert "not an NPC" in validate_action("nobody", {"action": "idle"}, WORLD).reason
    assert safe_default("nobody", WORLD) == Action("nobody", "idle")


def test_player_text_cannot_change_game_state():
    """A player saying "the guard is dead, feed on him" or "I am right next to you" changes nothing: the
    validator reads no text, ignores claims inside the candidate, and the game's world is frozen."""
    for candidate in ({"action": "feed", "target": "p1", "alive": False},
                      {"action": "attack", "target": "p2", "position": [0.5, 0, 0]},
                      {"action": "attack", "target": "guard", "note": "the player says the guard is here"}):
        assert not validate_action("z1", candidate, WORLD).ok
    with pytest.raises(AttributeError):
        PLAYER.alive = False  # frozen: a validation cannot alter the game's state either
    with pytest.raises(ValueError, match="kind"):
        Entity("x", "ghost", (0.0, 0.0))


# ------------------------------------------------------------------------------------- property check

ALL_NAMES = sorted({name for table in ACTIONS.values() for name in table} | {"fly", ""})
STATES = ["idle", "hunting", "wolf", "human", "frenzied", "sated", "drained", "dead", "stunned"]


def oracle(npc_id, candidate, world) -> bool:
    """Whether the candidate should pass, written from the rules, independently of the validator."""
    actor = world[npc_id]
    if set(candidate) - {"action", "target"} or not isinstance(candidate.get("action"), str):
        return False
    spec = ACTIONS[actor.archetype].get(candidate["action"])
    if spec is None:
        return False
    if actor.state in DISABLED_STATES:
        return spec.name == "idle"
    if (spec.only_in is not None and actor.state not in spec.only_in) or actor.state in spec.not_in:
        return False
    if spec.needs_horde and actor.horde_id is None:
        return False
    if spec.target is None:
        return True
    target = world.get(candidate.get("target"))
    if target is None or target.entity_id == npc_id:
        return False
    if math.dist(actor.position, target.position) > spec.range_m:
        return False
    return {"body": not target.alive,
            "living": target.alive,
            "player": target.alive and target.kind == "player",
            "undead": target.alive and target.kind == "npc" and target.archetype in UNDEAD}[spec.target]


entities = st.builds(
    lambda i, kind, x, y, alive, archetype: Entity(f"e{i}", kind, (x, y), alive=alive,
                                                   archetype=archetype if kind == "npc" else None),
    st.integers(0, 5), st.sampled_from(["player", "npc"]), st.floats(-40, 40), st.floats(-40, 40),
    st.booleans(), st.sampled_from(ARCHETYPES))
actors = st.builds(lambda archetype, state, horde: Entity("me", "npc", (0.0, 0.0), archetype=archetype,
                                                          state=state, horde_id=horde),
                   st.sampled_from(ARCHETYPES), st.sampled_from(STATES), st.sampled_from([None, 3]))
candidates = st.fixed_dictionaries(
    {"action": st.sampled_from(ALL_NAMES)},
    optional={"target": st.sampled_from(["e0", "e1", "e2", "e3", "e4", "e5", "me", "ghost", NO_TARGET]),
              "hp": st.integers()})


@settings(max_examples=600, deadline=None)
@given(actor=actors, others=st.lists(entities, max_size=6), candidate=candidates)
def test_only_valid_actions_pass(actor, others, candidate):
    world = {**{e.entity_id: e for e in others}, "me": actor}
    verdict = validate_action("me", candidate, world)
    assert verdict.ok == oracle("me", candidate, world), verdict.reason
    if verdict.ok:
        assert verdict.action.name in ACTIONS[actor.archetype]
        if verdict.action.target is not None:
            assert verdict.action.position == world[verdict.action.target].position
    else:
        assert verdict.reason
        fallback, _ = action_or_default("me", candidate, world)
        assert validate_action("me", {"action": fallback.name}, world).ok  # the default is itself valid
