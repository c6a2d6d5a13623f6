"""Per-archetype action schemas (for the worker's grammar) and the validator of decoded actions.

    schema = action_schema("zombie", targets=["player-1", "npc-9"])  # for Grammar.from_json_schema
    verdict = validate_action("npc-7", {"action": "lunge", "target": "player-1"}, world)
    action, reason = action_or_default("npc-7", decoded, world)     # a safe default when invalid

Trust: the validator reads two things, the model's candidate ({"action", "target"} and nothing else) and
`world`, the game state the game itself sent (positions, alive, states, hordes). Player text is never an
input, and nothing in a candidate is believed beyond the action name and a target id to look up: the
target's position and state come from `world`. So player text can change game state only through an action
that the game state allows, and the returned Action is a proposal the game applies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tier_scheduler.config import ARCHETYPES

TARGET_KINDS = ("living", "player", "body", "undead")  # what a targeted action aims at (see target_ok)
UNDEAD = ("zombie", "ghoul", "vampire", "lich")  # what a lich may command (werewolves are alive)
DISABLED_STATES = frozenset({"dead", "stunned"})  # an NPC in one of these may only idle
NO_TARGET = "none"  # the schema's target value for actions without one
MAX_ID_CHARS = 128


@dataclass(frozen=True)
class ActionSpec:
    name: str
    target: str | None = None  # None: no target; else one of TARGET_KINDS
    range_m: float = math.inf  # the target must be within this distance of the actor, meters
    only_in: frozenset[str] | None = None  # actor states that allow it (None: any state not disabled)
    not_in: frozenset[str] = frozenset()  # actor states that forbid it
    needs_horde: bool = False


def _specs(*specs: ActionSpec) -> dict[str, ActionSpec]:
    return {spec.name: spec for spec in (*specs, ActionSpec("wander"), ActionSpec("idle"))}


_FRENZY = frozenset({"frenzied"})
_DRAINED = frozenset({"drained"})
_WOLF, _HUMAN = frozenset({"wolf"}), frozenset({"human"})

# Every archetype has "wander" and "idle": the safe defaults.
ACTIONS: dict[str, dict[str, ActionSpec]] = {
    "zombie": _specs(
        ActionSpec("attack", "living", 2.0), ActionSpec("lunge", "living", 6.0),
        ActionSpec("follow_horde", needs_horde=True), ActionSpec("feed", "body", 2.0), ActionSpec("groan")),
    "vampire": _specs(
        ActionSpec("charm", "living", 10.0, not_in=_FRENZY), ActionSpec("feed", "living", 2.0,
                                                                         not_in=frozenset({"sated"})),
        ActionSpec("retreat"), ActionSpec("converse", "player", 5.0, not_in=_FRENZY),
        ActionSpec("stalk", "living", 40.0), ActionSpec("attack", "living", 2.0)),
    "werewolf": _specs(
        ActionSpec("attack", "living", 2.5), ActionSpec("pounce", "living", 8.0, only_in=_WOLF),
        ActionSpec("howl", only_in=_WOLF), ActionSpec("track", "living", 60.0, only_in=_WOLF),
        ActionSpec("converse", "player", 5.0, only_in=_HUMAN), ActionSpec("transform"),
        ActionSpec("retreat")),
    "ghoul": _specs(
        ActionSpec("scavenge", "body", 2.0), ActionSpec("feed", "body", 2.0),
        ActionSpec("attack", "living", 2.0),
        ActionSpec("follow", "living", 20.0), ActionSpec("converse", "player", 5.0), ActionSpec("skulk"),
        ActionSpec("hiss"), ActionSpec("retreat")),
    "lich": _specs(
        ActionSpec("cast_spell", "living", 30.0, not_in=_DRAINED), ActionSpec("raise_dead", "body", 15.0,
                                                                               not_in=_DRAINED),
        ActionSpec("summon", not_in=_DRAINED), ActionSpec("command_undead", "undead", 30.0),
        ActionSpec("converse", "player", 5.0), ActionSpec("teleport", not_in=_DRAINED),
        ActionSpec("retreat")),
}


@dataclass(frozen=True)
class Entity:
    """One thing in the game state, as the game reports it (never as a player or the model says it)."""

    entity_id: str
    kind: str  # "player" or "npc"
    position: tuple[float, ...]  # meters, same axes as the tier positions
    alive: bool = True  # False: a body (what feed / scavenge / raise_dead aim at)
    archetype: str | None = None  # NPCs
    state: str = "idle"  # the game's behaviour state: "idle", "hunting", "wolf", "human", "sated", "dead"...
    horde_id: int | None = None  # zombies in a horde (hordes.py)

    def __post_init__(self):
        if self.kind not in ("player", "npc"):
            raise ValueError(f"Entity.kind: must be 'player' or 'npc', got {self.kind!r}")
        if not all(math.isfinite(x) for x in self.position):
            raise ValueError(f"Entity.position: must be finite, got {self.position!r}")


@dataclass(frozen=True)
class Action:
    npc_id: str
    name: str
    target: str | None = None
    position: tuple[float, ...] | None = None  # where to act or move, meters: the target's, from the game


@dataclass(frozen=True)
class Verdict:
    action: Action | None  # None when rejected
    reason: str = ""  # why it was rejected

    @property
    def ok(self) -> bool:
        return self.action is not None


# --------------------------------------------------------------------------------------------- schema


def action_schema(archetype: str, targets: Sequence[str] | None = None) -> dict:
    """JSON schema of one action of `archetype`: {"action": <name>, "target": <id or "none">}, in that
    order. With `targets` (the ids in the NPC's surroundings) the target is one of them or "none", so the
    grammar cannot even spell an absent target; the validator still checks range and state."""
    actions = _actions_of(archetype)
    if targets is None:
        target = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
    else:
        target = {"enum": [*dict.fromkeys(str(t) for t in targets if t != NO_TARGET), NO_TARGET]}
    return {"type": "object", "properties": {"action": {"enum": list(actions)}, "target": target},
            "required": ["action", "target"], "additionalProperties": False}


def _actions_of(archetype: str) -> dict[str, ActionSpec]:
    if archetype not in ACTIONS:
        raise ValueError(f"archetype: unknown {archetype!r}; expected one of {ARCHETYPES}")
    return ACTIONS[archetype]


# ------------------------------------------------------------------------------------------ validator


def validate_action(npc_id: str, candidate: object, world: Mapping[str, Entity]) -> Verdict:
    """Accepts the candidate only if it names an action of the NPC's archetype that its state allows, with
    an existing target of the right kind within range (see the module doc for what is trusted)."""
    actor = world.get(npc_id) if isinstance(npc_id, str) else None
    if actor is None or actor.kind != "npc" or actor.archetype not in ACTIONS:
        return Verdict(None, f"actor {npc_id!r} is not an NPC of a known archetype in the game state")
    parsed = _parse(candidate)
    if isinstance(parsed, str):
        return Verdict(None, parsed)
    name, target_id = parsed
    spec = ACTIONS[actor.archetype].get(name)
    if spec is None:
        return Verdict(None, f"{name!r} is not an action of a {actor.archetype}")
    reason = state_refusal(spec, actor)
    if reason:
        return Verdict(None, reason)
    if spec.target is None:
        return Verdict(Action(npc_id, name))
    return _targeted(spec, actor, target_id, world)


def _parse(candidate: object) -> tuple[str, str | None] | str:
    """(action name, target id or None), or the reason the candidate is malformed."""
    if isinstance(candidate, (str, bytes)):
        try:
            candidate = json.loads(candidate)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"not valid JSON: {e}"
    if not isinstance(candidate, Mapping):
        return f"expected a JSON object with 'action' and 'target', got {type(candidate).__name__}"
    extra = sorted(str(k) for k in candidate if k not in ("action", "target"))
    if extra:
        return (f"unexpected fields {extra}: only 'action' and 'target' are read (game state comes from "
                "the game)")
    name, target = candidate.get("action"), candidate.get("target")
    if not isinstance(name, str):
        return f"'action' must be a string, got {name!r}"
    if target is not None and not isinstance(target, str):
        return f"'target' must be a string id or {NO_TARGET!r}, got {target!r}"
    return name, None if target in (None, "", NO_TARGET) else target


def state_refusal(spec: ActionSpec, actor: Entity) -> str:
    """"" when the actor's own state allows the action; else why not."""
    if actor.state in DISABLED_STATES and spec.name != "idle":
        return f"{actor.entity_id} is {actor.state}: it can only idle"
    if spec.only_in is not None and actor.state not in spec.only_in:
        return f"{spec.name!r} needs state {sorted(spec.only_in)}, {actor.entity_id} is {actor.state!r}"
    if actor.state in spec.not_in:
        return f"{spec.name!r} is not allowed while {actor.state!r}"
    if spec.needs_horde and actor.horde_id is None:
        return f"{spec.name!r} needs a horde, {actor.entity_id} is in none"
    return ""


def _targeted(spec: ActionSpec, actor: Entity, target_id: str | None, world: Mapping[str, Entity]) -> Verdict:
    if target_id is None:
        return Verdict(None, f"{spec.name!r} needs a target")
    target = world.get(target_id)
    if target is None:
        return Verdict(None, f"target {target_id!r} does not exist in the game state")
    if target.entity_id == actor.entity_id:
        return Verdict(None, f"{spec.name!r} cannot target the actor itself")
    if not target_ok(spec.target, target):
        return Verdict(None, f"{spec.name!r} needs a {spec.target} target, {target_id!r} is not one")
    distance = math.dist(actor.position, target.position)
    if distance > spec.range_m:
        return Verdict(None, f"target {target_id!r} is {distance:.1f} m away, beyond the {spec.range_m:g} m "
                             f"range of {spec.name!r}")
    return Verdict(Action(actor.entity_id, spec.name, target_id, tuple(target.position)))


def target_ok(kind: str, target: Entity) -> bool:
    """living: a living player or NPC; player: a living player; body: a dead one; undead: a living
    (not destroyed) undead NPC."""
    if kind == "body":
        return not target.alive
    if not target.alive:
        return False
    if kind == "player":
        return target.kind == "player"
    if kind == "undead":
        return target.kind == "npc" and target.archetype in UNDEAD
    return kind == "living"


# ---------------------------------------------------------------------------------------- fallbacks


def safe_default(npc_id: str, world: Mapping[str, Entity]) -> Action:
    """"wander" when the NPC's state allows it, else "idle" (always allowed)."""
    actor = world.get(npc_id)
    if actor is None or actor.archetype not in ACTIONS:
        return Action(npc_id, "idle")
    wander = ACTIONS[actor.archetype]["wander"]
    return Action(npc_id, "idle" if state_refusal(wander, actor) else "wander")


def action_or_default(npc_id: str, candidate: object, world: Mapping[str, Entity]) -> tuple[Action, str]:
    """The validated action and "", or the safe default and the rejection reason."""
    verdict = validate_action(npc_id, candidate, world)
    return (verdict.action, "") if verdict.ok else (safe_default(npc_id, world), verdict.reason)
