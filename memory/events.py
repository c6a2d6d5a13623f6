"""Outbox events (the contract with the archiver) and game events (what the game reports about a player).

Outbox: every turn and memory event is appended on the hot path, in the same MULTI as the write it records,
to the Redis stream `<key_prefix>outbox` (see `outbox_stream`) as one XADD with the fields

| field | holds |
| --- | --- |
| event_id | uuid4 hex, unique: the archive's idempotency key (a turn's event_id is its turn_id) |
| kind | "turn", "fact", "summary", "card", "emotion" or "event" |
| npc_id, player_id | whose memory it is |
| ts | float epoch seconds on the store's injectable clock, as `repr(float)` |
| payload | compact JSON object (sorted keys), below |

Payloads by kind: turn, fact, summary, emotion: the record (`memory.records`: Turn, Fact, Summary,
EmotionPoint) as its dict; card: {"card_type": "relationship" or "quest", "card": `cards.card_to_dict`};
event: {"event": GameEvent dict, "fact_id": id of the fact it produced}.

A write replayed after a lost reply (or after an outage) repeats its XADD with the same event_id: the archive
must treat the event_id as the key, never the stream entry id.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from memory.records import check_hex_id, check_id, check_text, check_ts, compact_json, new_id

OUTBOX_STREAM_SUFFIX = "outbox"
EVENT_KINDS = ("turn", "fact", "summary", "card", "emotion", "event")
OUTBOX_FIELDS = ("event_id", "kind", "npc_id", "player_id", "ts", "payload")


def outbox_stream(key_prefix: str) -> str:
    return key_prefix + OUTBOX_STREAM_SUFFIX


@dataclass(frozen=True)
class OutboxEvent:
    kind: str
    npc_id: str
    player_id: str
    ts: float
    payload: dict
    event_id: str = field(default_factory=new_id)

    def __post_init__(self):
        ts = _check_event(self.event_id, self.kind, self.npc_id, self.player_id, self.ts, self.payload)
        object.__setattr__(self, "ts", ts)

    def to_fields(self) -> dict[str, str]:
        """The XADD field -> value mapping (all strings)."""
        return {"event_id": self.event_id, "kind": self.kind, "npc_id": self.npc_id,
                "player_id": self.player_id, "ts": repr(self.ts), "payload": compact_json(self.payload)}

    @classmethod
    def from_fields(cls, raw: Mapping) -> OutboxEvent:
        """Parses a stream entry's fields (bytes or str keys and values); ValueError names a bad field."""
        event_id, kind, npc_id, player_id, ts, payload = _parse_fields(raw)  # checked by __post_init__
        return cls(kind=kind, npc_id=npc_id, player_id=player_id, ts=ts, payload=payload, event_id=event_id)


_OUTBOX_VALUES = operator.itemgetter(*OUTBOX_FIELDS)
_EVENT_KINDS = frozenset(EVENT_KINDS)


def parse_fields(raw: Mapping) -> tuple[str, str, str, str, float, dict]:
    """(event_id, kind, npc_id, player_id, ts, payload) of a stream entry's fields, each checked as
    OutboxEvent checks it, without building one: the archiver's per-event path (~6 us instead of ~14).
    Keys and values may be bytes or str; ValueError names the bad field."""
    event_id, kind, npc_id, player_id, ts, payload = _parse_fields(raw)
    return event_id, kind, npc_id, player_id, _check_event(event_id, kind, npc_id, player_id, ts, payload), \
        payload


def _parse_fields(raw: Mapping) -> tuple[str, str, str, str, float, dict]:
    """The six fields as text, ts as a float and the payload parsed, not yet checked."""
    try:
        values = _OUTBOX_VALUES(raw)
    except KeyError:
        raw = {_text(k): v for k, v in raw.items()}
        missing = [name for name in OUTBOX_FIELDS if name not in raw]
        if missing:
            raise ValueError(f"outbox entry: missing fields {missing}") from None
        values = _OUTBOX_VALUES(raw)
    event_id, kind, npc_id, player_id, ts_text, payload_text = (
        v if type(v) is str else _text(v) for v in values)
    try:
        ts = float(ts_text)
    except ValueError as e:
        raise ValueError(f"ts: not a number: {ts_text!r}") from e
    try:
        payload = json.loads(payload_text)
    except json.JSONDecodeError as e:
        raise ValueError(f"payload: not valid JSON: {e}") from e
    return event_id, kind, npc_id, player_id, ts, payload


def _check_event(event_id: str, kind: str, npc_id: str, player_id: str, ts: object, payload: object) -> float:
    """The outbox event contract, for OutboxEvent and parse_fields alike; returns ts as a float."""
    if kind not in _EVENT_KINDS:
        raise ValueError(f"kind: must be one of {EVENT_KINDS}, got {kind!r}")
    check_id(npc_id, "npc_id")
    check_id(player_id, "player_id")
    ts = check_ts(ts)
    if not isinstance(payload, dict):
        raise ValueError(f"payload: must be a dict (a JSON object), got {type(payload).__name__}")
    check_hex_id(event_id, "event_id")
    return ts


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ------------------------------------------------------------------------------------------ game events

# type -> (trust delta, affinity delta, fact importance 1-10, valence, arousal) applied to the relationship.
# Trust and affinity are on a -100..100 scale; valence [-1, 1] and arousal [0, 1] are the NPC's reaction.
GAME_EVENT_EFFECTS: dict[str, tuple[int, int, int, float, float]] = {
    "gift": (5, 10, 5, 0.6, 0.4),
    "promise": (3, 0, 6, 0.3, 0.3),
    "promise_kept": (15, 10, 7, 0.7, 0.5),
    "promise_broken": (-20, -10, 8, -0.6, 0.6),
    "betrayal": (-35, -25, 9, -0.9, 0.9),
    "help": (10, 8, 6, 0.6, 0.5),
    "life_saved": (30, 25, 9, 0.9, 0.8),
    "attack": (-25, -20, 8, -0.8, 1.0),
    "insult": (-5, -10, 4, -0.5, 0.6),
    "quest_started": (2, 2, 6, 0.3, 0.4),
    "quest_milestone": (3, 2, 5, 0.4, 0.4),
    "quest_completed": (10, 5, 7, 0.7, 0.6),
    "quest_failed": (-5, -2, 6, -0.4, 0.5),
}
GAME_EVENT_TYPES = tuple(GAME_EVENT_EFFECTS)
QUEST_EVENT_TYPES = ("quest_started", "quest_milestone", "quest_completed", "quest_failed")
MAX_EVENT_TEXT = 120


@dataclass(frozen=True)
class GameEvent:
    """Something the game reports between an NPC and a player. `text` is the gift's item, the promise, the
    betrayal, what the help / rescue / attack was, the milestone or the quest title; `quest_id` names the
    quest of a quest_* event. The deltas add to the type's own trust/affinity effect (the game may weigh an
    event)."""

    type: str
    text: str = ""
    quest_id: str | None = None
    trust_delta: int = 0
    affinity_delta: int = 0

    def __post_init__(self):
        if self.type not in GAME_EVENT_EFFECTS:
            raise ValueError(f"type: must be one of {GAME_EVENT_TYPES}, got {self.type!r}")
        check_text(self.text, "text", MAX_EVENT_TEXT, allow_empty=True)
        if self.type in QUEST_EVENT_TYPES:
            check_id(self.quest_id, "quest_id")
        elif self.quest_id is not None:
            raise ValueError(f"quest_id: only quest events carry one, got {self.quest_id!r} on {self.type!r}")
        for name in ("trust_delta", "affinity_delta"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 200:
                raise ValueError(f"{name}: must be an int in [-200, 200], got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping) -> GameEvent:
        if not isinstance(raw, Mapping):
            raise ValueError(f"game event: expected a mapping, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {"type", "text", "quest_id", "trust_delta", "affinity_delta"})
        if unknown:
            raise ValueError(f"game event: unknown fields {unknown}")
        return cls(**raw)
