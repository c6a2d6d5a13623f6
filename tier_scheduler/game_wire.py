"""The scheduler's game-facing wire protocol (ipc/GAME_PROTOCOL.md): messages <-> ZeroMQ frames, checked.

    frames = encode(GameMsgType.TALK, corr_id=7, fields={"npc_id": "npc-7", "player_id": "p1", "text": "Hi"})
    msg = decode(frames, accept=GAME_TO_SCHEDULER)       # GameMessage(type, corr_id, fields); or raises
    msg.fields["text"]                                   # every field present (defaults filled in)

A message is [header (32 bytes)][msgpack metadata][payload 0]...: the same frame layout as the worker's
protocol (ipc/PROTOCOL.md) under its own magic ("NPCG") and version. Payload frames carry positions only:
packed little-endian float32 [N, 3] arrays. Both directions go through the same checks, so a bug on the
sending side fails there, with the same error the receiver would have answered.

Every problem with a message raises GameProtocolError with a code (GameErrorCode) and a message naming the
field; decode never raises anything else, whatever bytes it is given. Nothing is unpickled: metadata is
msgpack without extension types.

Also here: the conversions between wire fields and the result types the game clients return (TalkResult,
ActResult, cards, EventOutcome, SessionOutcome, TickResult), shared by tier_scheduler.service and
plugin_bindings.remote so both sides agree on one definition.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import msgpack
import numpy as np

from ipc.messages import HEADER as WORKER_HEADER

# Result types of the game clients (data classes only; nothing here calls into the scheduler).
from memory.cards import Card, CardError, CardTooLarge, deserialize_card, serialize_card
from memory.records import EmotionPoint, Fact
from memory.session import SessionOutcome
from memory.store import EventOutcome
from tier_scheduler.actions import Action, Entity
from tier_scheduler.server import ActContext, ActResult, TalkResult

MAGIC = b"NPCG"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
# The worker protocol's header layout (ipc/messages.py), with this protocol's magic and version: magic,
# version, type, corr_id, flags, meta_len, payload_frames, reserved, payload_bytes.
HEADER = WORKER_HEADER
REPLY_BIT = 0x80
U64 = 2**64 - 1
I32_MAX = 2**31 - 1
MAX_ARRAYS = 2  # payload frames of one message
POSITION_DTYPE = "<f4"
MAX_ERROR_MESSAGE = 1000  # characters of an ERROR's message (it may quote hostile values)
MAX_DEPTH = 16  # nesting of a free-form map (STATS_REPLY)

ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # NPC, player, entity, quest ids (memory's id rule)
LABEL = re.compile(r"[\x21-\x7e]{0,128}")  # client / server ids: printable ASCII, no spaces
ADAPTER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # adapter names (the worker's rule)
TIERS = ("gold", "silver", "bronze")
CARD_TYPES = ("relationship", "quest")
ENTITY_KINDS = ("player", "npc")


class GameMsgType(IntEnum):
    # game -> scheduler requests; each is answered by exactly one message of type | 0x80, or ERROR
    HELLO = 0x01
    REGISTER_NPCS = 0x02
    DESPAWN = 0x03
    POSITIONS = 0x04
    TICK = 0x05
    SET_OVERRIDE = 0x06
    TALK = 0x07
    ACT = 0x08
    ACT_HORDE = 0x09
    HORDES = 0x0A
    EVENT = 0x0B
    GET_CARD = 0x0C
    PUT_CARD = 0x0D
    END_SESSION = 0x0E
    STATS = 0x0F
    CANCEL = 0x10
    GOODBYE = 0x11
    # scheduler -> game, streamed before a reply (corr_id of the TALK)
    TALK_CHUNK = 0x40
    # replies
    HELLO_REPLY = 0x81
    REGISTER_NPCS_REPLY = 0x82
    DESPAWN_REPLY = 0x83
    POSITIONS_REPLY = 0x84
    TICK_REPLY = 0x85
    SET_OVERRIDE_REPLY = 0x86
    TALK_DONE = 0x87
    ACT_RESULT = 0x88
    ACT_HORDE_REPLY = 0x89
    HORDES_REPLY = 0x8A
    EVENT_REPLY = 0x8B
    GET_CARD_REPLY = 0x8C
    PUT_CARD_REPLY = 0x8D
    END_SESSION_REPLY = 0x8E
    STATS_REPLY = 0x8F
    CANCEL_REPLY = 0x90
    GOODBYE_REPLY = 0x91
    ERROR = 0xFF


GAME_TO_SCHEDULER = frozenset(t for t in GameMsgType if t < 0x40)
SCHEDULER_TO_GAME = frozenset(t for t in GameMsgType if t >= 0x40)


class GameErrorCode(IntEnum):
    # Numbers shared with the worker protocol (ipc/errors.py) where the meaning is the same.
    MALFORMED_FRAME = 100
    BAD_MAGIC = 101
    UNSUPPORTED_VERSION = 102
    UNKNOWN_TYPE = 103
    BAD_FLAGS = 104
    TOO_LARGE = 105
    BAD_METADATA = 200
    BAD_FIELD = 201
    BAD_PAYLOAD = 202
    BAD_POSITION = 203
    LIMIT_EXCEEDED = 401
    DUPLICATE_REQUEST = 403
    INVALID_REQUEST = 405
    NOT_SUPPORTED = 406
    CANCELLED = 409
    UNKNOWN_NPC = 410
    DUPLICATE_NPC = 411
    UNKNOWN_HORDE = 412
    CARD_TOO_LARGE = 420
    BAD_CARD = 421
    OVERLOADED = 500
    SHUTTING_DOWN = 501
    INTERNAL = 502
    MEMORY_UNAVAILABLE = 503
    TIMEOUT = 504  # never sent: what a client reports when no answer comes in time


def code_name(code: int) -> str:
    try:
        return GameErrorCode(code).name
    except ValueError:
        return "UNKNOWN_CODE"  # a newer scheduler's code: still reported


class GameProtocolError(Exception):
    """A message that breaks the protocol (or a request the scheduler refuses): the receiver answers it with
    ERROR of this code. corr_id / ref_type name the offending message once its header could be read."""

    def __init__(self, code: int, message: str, *, corr_id: int = 0, ref_type: int = 0):
        self.code = int(code)
        self.message = message[:MAX_ERROR_MESSAGE]
        self.corr_id, self.ref_type = corr_id, ref_type
        super().__init__(f"{code_name(self.code)} ({self.code}): {self.message}")

    def attributed(self, corr_id: int, ref_type: int) -> GameProtocolError:
        self.corr_id, self.ref_type = corr_id, ref_type
        return self


@dataclass(frozen=True)
class GameLimits:
    """What a receiver accepts (HELLO_REPLY.limits carries the scheduler's values)."""

    max_frame_bytes: int = 1 << 20  # any one payload frame (a [N, 3] float32 array: 12 N bytes)
    max_meta_bytes: int = 1 << 20  # the metadata frame
    max_npcs: int = 16384  # NPC ids (or NPC records) of one message
    max_players: int = 1024  # players of one TICK
    max_entities: int = 1024  # entities of an act's world
    max_text: int = 8192  # a talk's text, a chunk, a reply, a situation, a reason (code points)
    max_string: int = 4096  # any other string (names, states, messages)
    max_card_bytes: int = 2048  # a card's JSON, in UTF-8 bytes
    max_items: int = 65536  # any other array (members of a horde, facts...)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"GameLimits.{f.name} must be an int >= 1, got {value!r}")

    def to_wire(self) -> dict[str, int]:
        return dataclasses.asdict(self)


DEFAULT_LIMITS = GameLimits()


# ------------------------------------------------------------------------------------------- field rules


def _kind(value: object) -> str:
    return {dict: "a map", list: "an array", str: "a string", bytes: "binary", bool: "a bool", int: "an int",
            float: "a float", type(None): "nil"}.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, message: str, code: int = GameErrorCode.BAD_FIELD) -> GameProtocolError:
    return GameProtocolError(code, f"{where}: {message}")


def _cap(max_len: str | int, limits) -> int:
    """A spec's size limit: a number, or the name of a GameLimits field."""
    return max_len if isinstance(max_len, int) else getattr(limits, max_len)


def _too_many(where: str, n: int, cap: int) -> GameProtocolError:
    return _bad(where, f"{n} entries, more than the limit of {cap}", GameErrorCode.LIMIT_EXCEEDED)


class Spec:
    """One field's wire rule. check() returns the value (converted: an int given for a float) or raises."""

    def check(self, value: object, where: str, limits: GameLimits) -> object:
        raise NotImplementedError

    def doc(self) -> str:
        raise NotImplementedError


class Str(Spec):
    def __init__(self, max_len: str | int = "max_string", pattern: re.Pattern | None = None,
                 choices: Sequence[str] | None = None, non_empty: bool = False):
        self.max_len, self.pattern, self.choices, self.non_empty = max_len, pattern, choices, non_empty

    def check(self, value, where, limits):
        if type(value) is not str:
            raise _bad(where, f"expected a string, got {_kind(value)}")
        cap = _cap(self.max_len, limits)
        if len(value) > cap:
            raise _bad(where, f"{len(value)} characters, more than the limit of {cap}",
                       GameErrorCode.LIMIT_EXCEEDED)
        if self.choices is not None and value not in self.choices:
            raise _bad(where, f"must be one of {list(self.choices)}, got {_show(value)}")
        if self.pattern is not None and self.pattern.fullmatch(value) is None:
            raise _bad(where, f"{_show(value)} does not match {self.pattern.pattern}")
        if self.non_empty and not value.strip():
            raise _bad(where, "must not be empty")
        return value


class CardJson(Spec):
    """A card as memory.cards serializes it: compact UTF-8 JSON of at most max_card_bytes bytes."""

    def check(self, value, where, limits):
        if type(value) is not str:
            raise _bad(where, f"expected a string (the card's JSON), got {_kind(value)}")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > limits.max_card_bytes:
            raise _bad(where, f"card of {size} bytes, over the limit of {limits.max_card_bytes} bytes (cards "
                       "are never truncated)", GameErrorCode.CARD_TOO_LARGE)
        return value


class Int(Spec):
    def __init__(self, lo: int = -(2**63), hi: int = U64):
        self.lo, self.hi = lo, hi

    def check(self, value, where, limits):
        if type(value) is not int:
            raise _bad(where, f"expected an int, got {_kind(value)}")
        if not self.lo <= value <= self.hi:
            raise _bad(where, f"must be in [{self.lo}, {self.hi}], got {value}")
        return value


class Float(Spec):
    def __init__(self, lo: float = -math.inf, hi: float = math.inf):
        self.lo, self.hi = lo, hi

    def check(self, value, where, limits):
        if type(value) not in (int, float):
            raise _bad(where, f"expected a number, got {_kind(value)}")
        value = float(value)
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise _bad(where, f"must be a finite number in [{self.lo}, {self.hi}], got {value!r}")
        return value


class Bool(Spec):
    def check(self, value, where, limits):
        if type(value) is not bool:
            raise _bad(where, f"expected a bool, got {_kind(value)}")
        return value


class Position(Spec):
    """[x, y, z]: three finite numbers, meters."""

    def check(self, value, where, limits):
        if type(value) is not list or len(value) != 3 or not all(type(v) in (int, float) for v in value):
            raise _bad(where, f"expected an array of 3 numbers, got {_show(value)}")
        coords = [float(v) for v in value]
        if not all(math.isfinite(v) for v in coords):
            raise _bad(where, f"NaN or infinite coordinate in {_show(value)}", GameErrorCode.BAD_POSITION)
        return coords


class Nullable(Spec):
    def __init__(self, inner: Spec):
        self.inner = inner

    def check(self, value, where, limits):
        return None if value is None else self.inner.check(value, where, limits)


class List(Spec):
    def __init__(self, item: Spec, max_len: str | int = "max_items", unique: bool = False):
        self.item, self.max_len, self.unique = item, max_len, unique

    def check(self, value, where, limits):
        if type(value) is not list:
            raise _bad(where, f"expected an array, got {_kind(value)}")
        cap = _cap(self.max_len, limits)
        if len(value) > cap:
            raise _too_many(where, len(value), cap)
        out = [self.item.check(v, f"{where}[{i}]", limits) for i, v in enumerate(value)]
        if self.unique and len(set(out)) != len(out):
            seen, dup = set(), None
            for v in out:
                if v in seen:
                    dup = v
                    break
                seen.add(v)
            raise _bad(where, f"{_show(dup)} appears twice")
        return out


class MapOf(Spec):
    """A map with string keys (each checked by `key`) and values of one rule."""

    def __init__(self, value: Spec, key: Spec | None = None, max_len: str | int = "max_items"):
        self.value, self.key, self.max_len = value, key or Str(), max_len

    def check(self, value, where, limits):
        if type(value) is not dict:
            raise _bad(where, f"expected a map, got {_kind(value)}")
        cap = _cap(self.max_len, limits)
        if len(value) > cap:
            raise _too_many(where, len(value), cap)
        out = {}
        for k, v in value.items():
            k = self.key.check(k, f"{where} key", limits)
            out[k] = self.value.check(v, f"{where}[{k!r}]", limits)
        return out


class FreeMap(Spec):
    """Any msgpack map with string keys (nil, bool, int, float, str, array, map values), depth-bounded."""

    def check(self, value, where, limits):
        if type(value) is not dict:
            raise _bad(where, f"expected a map, got {_kind(value)}")
        self._walk(value, where, 0)
        return value

    def _walk(self, value, where, depth):
        if depth > MAX_DEPTH:
            raise _bad(where, f"nested deeper than {MAX_DEPTH} levels")
        if type(value) is dict:
            for k, v in value.items():
                if type(k) is not str:
                    raise _bad(where, f"map keys must be strings, got {_kind(k)}")
                self._walk(v, f"{where}.{k}", depth + 1)
        elif type(value) is list:
            for i, v in enumerate(value):
                self._walk(v, f"{where}[{i}]", depth + 1)
        elif value is not None and type(value) not in (bool, int, float, str):
            raise _bad(where, f"{_kind(value)} is not a plain msgpack value")


REQUIRED = object()


class _Absent:
    """The default of a field whose absence means something of its own (SET_OVERRIDE: keep the value)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


class Record(Spec):
    """A map of named fields: each (spec, default); REQUIRED fields must be there, unknown keys are refused,
    absent ones take their default."""

    def __init__(self, fields: dict[str, tuple[Spec, object]]):
        self.fields = fields

    def check(self, value, where, limits):
        if type(value) is not dict:
            raise _bad(where, f"expected a map, got {_kind(value)}")
        unknown = [k for k in value if k not in self.fields]
        if unknown:
            raise _bad(where, f"unknown key {_show(unknown[0])} (known: {sorted(self.fields)})")
        out = {}
        prefix = f"{where}." if where else ""
        for name, (spec, default) in self.fields.items():
            if name in value:
                out[name] = spec.check(value[name], prefix + name, limits)
            elif default is REQUIRED:
                raise _bad(where or "metadata", f"missing required key {name!r}")
            else:
                out[name] = _copy_default(default)
        return out

    def strip_defaults(self, values: dict) -> dict:
        """values without the keys equal to their default (a sender may leave those out)."""
        return {k: v for k, v in values.items()
                if self.fields[k][1] is REQUIRED or not _same(v, self.fields[k][1])}


def _copy_default(default):
    if isinstance(default, list | dict):
        return type(default)(default)
    return default


def _same(value, default) -> bool:
    return type(value) is type(default) and value == default


# ------------------------------------------------------------------------------------------- messages

NPC_ID, PLAYER_ID = Str(pattern=ID), Str(pattern=ID)
TIER = Str(choices=TIERS)
NAME = Str(max_len=128, non_empty=True)

ENTITY = Record({
    "entity_id": (Str(pattern=ID), REQUIRED),
    "kind": (Str(choices=ENTITY_KINDS), REQUIRED),
    "position": (Position(), REQUIRED),
    "alive": (Bool(), True),
    "archetype": (Nullable(Str(max_len=64)), None),
    "state": (Str(max_len=64), "idle"),
    "horde_id": (Nullable(Int(0, I32_MAX)), None),
})
ACTION = Record({
    "npc_id": (NPC_ID, REQUIRED),
    "name": (Str(max_len=64), REQUIRED),
    "target": (Nullable(Str(pattern=ID)), None),
    "position": (Nullable(Position()), None),
})
ACT_RESULT_FIELDS = {
    "action": (ACTION, REQUIRED),
    "valid": (Bool(), REQUIRED),
    "reason": (Str(max_len="max_text"), ""),
    "raw": (Str(max_len="max_text"), ""),
}
FACT = Record({
    "text": (Str(max_len="max_text"), REQUIRED),
    "importance": (Int(0, 100), REQUIRED),
    "ts": (Float(0.0), REQUIRED),
    "fact_id": (Str(max_len=128), REQUIRED),
    "source": (Str(max_len=64), "session"),
    "restored_at": (Nullable(Float(0.0)), None),
})
EMOTION = Record({
    "valence": (Float(-1.0, 1.0), REQUIRED),
    "arousal": (Float(0.0, 1.0), REQUIRED),
    "ts": (Float(0.0), REQUIRED),
    "source": (Str(max_len=64), "session"),
    "point_id": (Str(max_len=128), REQUIRED),
    "restored_at": (Nullable(Float(0.0)), None),
})
NPC_RECORD = Record({
    "npc_id": (NPC_ID, REQUIRED),
    "archetype": (Str(max_len=64), REQUIRED),
    "subfaction": (Nullable(Str(pattern=ID)), None),
    "name": (Nullable(NAME), None),
    "stacks": (MapOf(List(Str(pattern=ADAPTER), 4), Str(max_len=64), 16), {}),
})
HORDE = Record({
    "horde_id": (Int(0, I32_MAX), REQUIRED),
    "leader_id": (NPC_ID, REQUIRED),
    "members": (List(NPC_ID, "max_npcs"), REQUIRED),
})
WORLD = List(ENTITY, "max_entities")


@dataclass(frozen=True)
class ArraySpec:
    """A [N, 3] float32 payload array; N = the length of the `count` field. presence: "required",
    "optional" (a trailing array the sender may leave out) or "if_any" (present iff `count` is not empty)."""

    name: str
    count: str
    presence: str


@dataclass(frozen=True)
class MessageSpec:
    msg_type: GameMsgType
    record: Record
    arrays: tuple[ArraySpec, ...] = ()


def _spec(msg_type: GameMsgType, fields: dict | None = None,
          arrays: tuple[ArraySpec, ...] = ()) -> MessageSpec:
    return MessageSpec(msg_type, Record(fields or {}), arrays)


T = GameMsgType
SPECS: dict[int, MessageSpec] = {s.msg_type: s for s in (
    _spec(T.HELLO, {"client_id": (Str(pattern=LABEL), "")}),
    _spec(T.HELLO_REPLY, {
        "server_id": (Str(pattern=LABEL), REQUIRED),
        "versions": (List(Int(0, 65535), 16), [1]),
        "limits": (MapOf(Int(0), Str(max_len=64), 64), {}),
        "archetypes": (List(Str(max_len=64), 64), []),
        "emotions": (List(Str(max_len=64), 64), []),
        "event_types": (List(Str(max_len=64), 64), []),
        "features": (List(Str(max_len=64), 64), []),
    }),
    _spec(T.REGISTER_NPCS, {"npcs": (List(NPC_RECORD, "max_npcs"), REQUIRED)},
          (ArraySpec("positions", "npcs", "optional"),)),
    _spec(T.REGISTER_NPCS_REPLY, {"registered": (Int(0), 0)}),
    _spec(T.DESPAWN, {"npc_ids": (List(NPC_ID, "max_npcs"), REQUIRED)}),
    _spec(T.DESPAWN_REPLY, {"despawned": (Int(0), 0)}),
    _spec(T.POSITIONS, {"npc_ids": (List(NPC_ID, "max_npcs"), REQUIRED)},
          (ArraySpec("positions", "npc_ids", "required"),)),
    _spec(T.POSITIONS_REPLY, {"updated": (Int(0), 0)}),
    _spec(T.TICK, {"players": (List(PLAYER_ID, "max_players", unique=True), REQUIRED),
                   "npc_ids": (List(NPC_ID, "max_npcs"), [])},
          (ArraySpec("player_positions", "players", "required"),
           ArraySpec("npc_positions", "npc_ids", "if_any"))),
    _spec(T.TICK_REPLY, {
        "counts": (MapOf(Int(0), TIER, 3), {}),
        "tiers": (MapOf(TIER, NPC_ID, "max_npcs"), {}),
        "promoted": (List(NPC_ID, "max_npcs"), []),
        "demoted": (List(NPC_ID, "max_npcs"), []),
        "promoted_gold": (List(NPC_ID, "max_npcs"), []),
        "held": (List(NPC_ID, "max_npcs"), []),
        "over_cap": (List(Int(0), 2), [0, 0]),
    }),
    _spec(T.SET_OVERRIDE, {"npc_id": (NPC_ID, REQUIRED), "forced": (Nullable(TIER), ABSENT),
                           "relationship": (Nullable(Float(-100.0, 100.0)), ABSENT)}),
    _spec(T.SET_OVERRIDE_REPLY),
    _spec(T.TALK, {"npc_id": (NPC_ID, REQUIRED), "player_id": (PLAYER_ID, REQUIRED),
                   "text": (Str(max_len="max_text"), REQUIRED)}),
    _spec(T.TALK_CHUNK, {"text": (Str(max_len="max_text"), REQUIRED), "index": (Int(0), 0)}),
    _spec(T.TALK_DONE, {
        "npc_id": (NPC_ID, REQUIRED),
        "text": (Str(max_len="max_text"), REQUIRED),
        "emotion": (Str(max_len=64), "neutral"),
        "degraded": (Bool(), False),
        "reason": (Str(max_len="max_text"), ""),
        "tier": (TIER, REQUIRED),
        "bark": (Bool(), False),
        "emote": (Str(max_len=64), ""),
        "finish_reason": (Str(max_len=64), ""),
        "chunks": (Int(0), 0),
    }),
    _spec(T.ACT, {"npc_id": (NPC_ID, REQUIRED), "world": (WORLD, REQUIRED),
                  "situation": (Str(max_len="max_text"), "Nothing happens.")}),
    _spec(T.ACT_RESULT, ACT_RESULT_FIELDS),
    _spec(T.ACT_HORDE, {"leader_id": (Nullable(NPC_ID), None), "horde_id": (Nullable(Int(0, I32_MAX)), None),
                        "world": (WORLD, REQUIRED),
                        "situation": (Str(max_len="max_text"), "Nothing happens.")}),
    _spec(T.ACT_HORDE_REPLY, {"results": (MapOf(Record(ACT_RESULT_FIELDS), NPC_ID, "max_npcs"), {})}),
    _spec(T.HORDES),
    _spec(T.HORDES_REPLY, {"hordes": (List(HORDE, "max_npcs"), [])}),
    _spec(T.EVENT, {"npc_id": (NPC_ID, REQUIRED), "player_id": (PLAYER_ID, REQUIRED),
                    "type": (Str(max_len=64), REQUIRED), "text": (Str(), ""),
                    "quest_id": (Nullable(Str(pattern=ID)), None),
                    "trust_delta": (Int(-200, 200), 0), "affinity_delta": (Int(-200, 200), 0)}),
    _spec(T.EVENT_REPLY, {"relationship": (CardJson(), REQUIRED), "quest": (CardJson(), REQUIRED),
                          "fact": (FACT, REQUIRED), "emotion": (EMOTION, REQUIRED)}),
    _spec(T.GET_CARD, {"npc_id": (NPC_ID, REQUIRED), "player_id": (PLAYER_ID, REQUIRED),
                       "card_type": (Str(choices=CARD_TYPES), REQUIRED)}),
    _spec(T.GET_CARD_REPLY, {"card": (Nullable(CardJson()), None)}),
    _spec(T.PUT_CARD, {"card": (CardJson(), REQUIRED)}),
    _spec(T.PUT_CARD_REPLY),
    _spec(T.END_SESSION, {"npc_id": (NPC_ID, REQUIRED), "player_id": (PLAYER_ID, REQUIRED)}),
    _spec(T.END_SESSION_REPLY, {"summary": (Nullable(Str(max_len="max_text")), None),
                                "method": (Str(max_len=64), "none"),
                                "facts_added": (List(FACT), []), "facts_evicted": (List(FACT), []),
                                "emotion": (Nullable(EMOTION), None)}),
    _spec(T.STATS),
    _spec(T.STATS_REPLY, {"stats": (FreeMap(), {})}),
    _spec(T.CANCEL, {"corr_id": (Int(0, U64), REQUIRED)}),
    _spec(T.CANCEL_REPLY, {"cancelled": (Bool(), False)}),
    _spec(T.GOODBYE),
    _spec(T.GOODBYE_REPLY, {"cancelled": (Int(0), 0)}),
    _spec(T.ERROR, {"code": (Int(0, 65535), REQUIRED), "message": (Str(), ""),
                    "ref_type": (Int(0, 65535), 0)}),
)}
assert set(SPECS) == set(GameMsgType)


@dataclass(frozen=True)
class GameMessage:
    msg_type: int
    corr_id: int
    fields: dict  # every field (defaults filled in); arrays as float32 [N, 3] under their names

    @property
    def name(self) -> str:
        return GameMsgType(self.msg_type).name


# ---------------------------------------------------------------------------------------------- encode


def encode(msg_type: int, corr_id: int, fields: Mapping | None = None,
           limits: GameLimits = DEFAULT_LIMITS) -> list[bytes]:
    """The frames of one message, after the same checks a receiver makes (GameProtocolError otherwise).
    Position arrays (any float array-like of shape [N, 3]) go under their names in `fields`."""
    spec = SPECS.get(msg_type)
    if spec is None:
        raise GameProtocolError(GameErrorCode.UNKNOWN_TYPE, f"message type 0x{msg_type:02x} does not exist")
    if type(corr_id) is not int or not 0 <= corr_id <= U64:
        raise GameProtocolError(GameErrorCode.BAD_FIELD, f"corr_id: must be a u64, got {corr_id!r}")
    try:
        body = dict(fields or {})
        named = {a.name: body.pop(a.name, None) for a in spec.arrays}
        checked = spec.record.check(body, "", limits)
        arrays = _arrays_to_send(spec, checked, named)
        meta_body = spec.record.strip_defaults(checked)
        payload = [a.tobytes() for a in arrays]
        if arrays:
            meta_body["arrays"] = [{"dtype": POSITION_DTYPE, "shape": [len(a), 3]} for a in arrays]
        try:
            meta = msgpack.packb(meta_body, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:  # e.g. a lone surrogate in a string
            raise GameProtocolError(GameErrorCode.BAD_FIELD, f"not encodable as msgpack: {e}") from None
        _check_sizes(len(meta), payload, limits)
    except GameProtocolError as e:
        raise e.attributed(corr_id, msg_type) from None
    header = HEADER.pack(MAGIC, VERSION, msg_type, corr_id, 0, len(meta), len(payload), 0,
                         sum(len(p) for p in payload))
    return [header, meta, *payload]


def _arrays_to_send(spec: MessageSpec, checked: dict, named: dict) -> list[np.ndarray]:
    out = []
    for a in spec.arrays:
        value, n = named[a.name], len(checked[a.count])
        if value is None:
            if a.presence == "required" or (a.presence == "if_any" and n):
                raise _bad(a.name, f"positions for the {n} entries of {a.count} are required",
                           GameErrorCode.BAD_PAYLOAD)
            continue
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise _bad(a.name, f"not an array of numbers: {e}", GameErrorCode.BAD_PAYLOAD) from None
        if array.shape != (n, 3):
            raise _bad(a.name, f"expected shape [{n}, 3] (one row per entry of {a.count}), got "
                       f"{list(array.shape)}", GameErrorCode.BAD_PAYLOAD)
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.ascontiguousarray(array, dtype=POSITION_DTYPE)
        _check_finite(array, a.name)
        out.append(array)
    return out


def _check_finite(array: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise _bad(name, f"row {row} has a NaN or infinite coordinate ({array[row].tolist()}); "
                   f"{int(bad.sum())} bad rows in all", GameErrorCode.BAD_POSITION)


def _check_sizes(meta_len: int, payload: list, limits: GameLimits) -> None:
    if meta_len > limits.max_meta_bytes:
        raise GameProtocolError(GameErrorCode.TOO_LARGE, f"metadata frame of {meta_len} bytes; the limit is "
                                f"{limits.max_meta_bytes}")
    for i, p in enumerate(payload):
        if len(p) > limits.max_frame_bytes:
            raise GameProtocolError(GameErrorCode.TOO_LARGE, f"payload frame {i} of {len(p)} bytes; the "
                                    f"limit is {limits.max_frame_bytes}")


def error_frames(error: GameProtocolError, limits: GameLimits = DEFAULT_LIMITS) -> list[bytes]:
    """The ERROR message answering `error` (naming the offending message when its header was readable)."""
    return encode(GameMsgType.ERROR, error.corr_id,
                  {"code": error.code, "message": error.message[:limits.max_string],
                   "ref_type": error.ref_type if 0 <= error.ref_type <= 65535 else 0}, limits)


# ---------------------------------------------------------------------------------------------- decode


def _bytes(frame) -> bytes | memoryview:
    view = memoryview(getattr(frame, "buffer", frame))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def decode(frames: Sequence, accept: Collection[int], limits: GameLimits = DEFAULT_LIMITS) -> GameMessage:
    """The message in these frames (bytes, memoryviews or zmq.Frames), checked throughout.

    accept: the message types this side takes. Raises GameProtocolError only, whatever the input."""
    try:
        return _decode(frames, accept, limits)
    except GameProtocolError:
        raise
    except Exception as e:  # a check missed something: still an answer, never a crash
        raise GameProtocolError(GameErrorCode.BAD_METADATA, f"undecodable message: {type(e).__name__}: "
                                f"{e}") from None


def _decode(frames: Sequence, accept: Collection[int], limits: GameLimits) -> GameMessage:
    if not frames:
        raise GameProtocolError(GameErrorCode.MALFORMED_FRAME, "a message needs a header frame")
    views = [_bytes(f) for f in frames]
    head = views[0]
    corr_id = msg_type = 0
    if len(head) >= 16 and bytes(head[:4]) == MAGIC:  # bytes 0..15 keep their layout in every version
        _, _, msg_type, corr_id = struct.unpack_from("<4sHHQ", head)
    try:
        return _decode_checked(views, accept, limits)
    except GameProtocolError as e:
        if e.code != GameErrorCode.BAD_MAGIC:
            e.attributed(corr_id, msg_type)
        raise


def _decode_checked(views: list, accept: Collection[int], limits: GameLimits) -> GameMessage:
    head = views[0]
    if len(head) >= 4 and bytes(head[:4]) != MAGIC:
        raise GameProtocolError(GameErrorCode.BAD_MAGIC, f"frame 0 must start with {MAGIC!r}, got "
                                f"{bytes(head[:4])!r}")
    if len(head) != HEADER.size:
        raise GameProtocolError(GameErrorCode.MALFORMED_FRAME, f"header frame must be {HEADER.size} bytes, "
                                f"got {len(head)}")
    _, version, msg_type, corr_id, flags, meta_len, n_payload, reserved, payload_bytes = HEADER.unpack(head)
    if version not in SUPPORTED_VERSIONS:
        raise GameProtocolError(GameErrorCode.UNSUPPORTED_VERSION, f"protocol version {version} is not "
                                f"supported (supported: {list(SUPPORTED_VERSIONS)})")
    if flags:
        raise GameProtocolError(GameErrorCode.BAD_FLAGS, f"unknown flag bits 0x{flags:x} (version 1 has "
                                "none)")
    if reserved:
        raise GameProtocolError(GameErrorCode.MALFORMED_FRAME, f"reserved header field must be 0, got "
                                f"{reserved}")
    if msg_type not in accept:
        raise GameProtocolError(GameErrorCode.UNKNOWN_TYPE, f"message type 0x{msg_type:02x} is not one this "
                                f"side accepts")
    spec = SPECS[msg_type]
    if n_payload > MAX_ARRAYS or len(views) != 2 + n_payload:
        raise GameProtocolError(GameErrorCode.MALFORMED_FRAME, f"header announces 1 metadata + {n_payload} "
                                f"payload frames (at most {MAX_ARRAYS}); the message has {len(views) - 1} "
                                f"after the header")
    meta, payload = views[1], views[2:]
    _check_sizes(len(meta), payload, limits)
    if len(meta) != meta_len:
        raise GameProtocolError(GameErrorCode.MALFORMED_FRAME, f"metadata frame is {len(meta)} bytes, the "
                                f"header says {meta_len} (truncated?)")
    if sum(len(p) for p in payload) != payload_bytes:
        raise GameProtocolError(GameErrorCode.MALFORMED_FRAME, f"payload frames hold "
                                f"{sum(len(p) for p in payload)} bytes, the header says {payload_bytes} "
                                f"(truncated?)")
    body = _unpack(meta)
    descriptors = body.pop("arrays", [])
    fields = spec.record.check(body, "", limits)
    fields.update(_arrays_received(spec, fields, descriptors, payload))
    return GameMessage(msg_type, corr_id, fields)


def _unpack(meta) -> dict:
    try:
        body = msgpack.unpackb(meta, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext)
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError...
        raise GameProtocolError(GameErrorCode.BAD_METADATA, f"metadata is not one valid msgpack map: "
                                f"{type(e).__name__}: {e}") from None
    if type(body) is not dict:
        raise GameProtocolError(GameErrorCode.BAD_METADATA, f"metadata must be a msgpack map, got "
                                f"{_kind(body)}")
    return body


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not used by this protocol")


def _arrays_received(spec: MessageSpec, fields: dict, descriptors: object, payload: list) -> dict:
    if type(descriptors) is not list or len(descriptors) > MAX_ARRAYS:
        raise _bad("arrays", f"expected an array of at most {MAX_ARRAYS} descriptors")
    if len(descriptors) != len(payload):
        raise _bad("arrays", f"{len(descriptors)} arrays described, {len(payload)} payload frames sent",
                   GameErrorCode.BAD_PAYLOAD)
    expected = [a for a in spec.arrays if a.presence == "required"
                or (a.presence == "if_any" and fields[a.count])]
    optional = [a for a in spec.arrays if a.presence == "optional"]
    if len(descriptors) != len(expected) and len(descriptors) != len(expected) + len(optional):
        names = [a.name for a in expected] or ["none"]
        raise _bad("arrays", f"{len(descriptors)} arrays sent; this message carries {' + '.join(names)}"
                   + (f" (and optionally {', '.join(a.name for a in optional)})" if optional else ""),
                   GameErrorCode.BAD_PAYLOAD)
    out = {a.name: None for a in spec.arrays}
    for i, (a, d, frame) in enumerate(zip([*expected, *optional], descriptors, payload)):
        n = len(fields[a.count])
        if type(d) is not dict or set(d) != {"dtype", "shape"}:
            raise _bad(f"arrays[{i}]", "expected a map with exactly the keys ['dtype', 'shape']")
        if d["dtype"] != POSITION_DTYPE:
            raise _bad(f"arrays[{i}].dtype", f"must be {POSITION_DTYPE!r} (little-endian float32), got "
                       f"{_show(d['dtype'])}")
        if d["shape"] != [n, 3] or not all(type(x) is int for x in d["shape"]):
            raise _bad(f"arrays[{i}].shape", f"{a.name} must be [{n}, 3] (one row per entry of {a.count}), "
                       f"got {_show(d['shape'])}", GameErrorCode.BAD_PAYLOAD)
        if len(frame) != 12 * n:
            raise _bad(f"arrays[{i}]", f"payload frame {i} is {len(frame)} bytes; [{n}, 3] float32 needs "
                       f"{12 * n}", GameErrorCode.BAD_PAYLOAD)
        array = np.frombuffer(frame, dtype=POSITION_DTYPE).reshape(n, 3)
        _check_finite(array, a.name)
        out[a.name] = array
    return out


# ----------------------------------------------------------------------------------- result conversions


@dataclass(frozen=True)
class TickResult:
    """What a remote tick returns: the in-process TierUpdate's content keyed by NPC id (its row indices mean
    nothing outside the scheduler process). tiers: new tier of every NPC whose tier changed this tick."""

    tiers: dict[str, str]
    promoted: tuple[str, ...]
    demoted: tuple[str, ...]
    promoted_gold: tuple[str, ...]
    held: tuple[str, ...]
    tier_counts: dict[str, int]
    over_cap: tuple[int, int] = (0, 0)

    def counts(self) -> dict[str, int]:
        return dict(self.tier_counts)


def tick_to_wire(update, ids: Sequence[str]) -> dict:
    """A tier_scheduler.tiers.TierUpdate as TICK_REPLY fields; ids: the server's row -> NPC id at the tick."""
    def named(rows) -> list[str]:
        return [ids[int(r)] for r in rows]

    changed = np.concatenate([update.promoted, update.demoted]).astype(np.int64)
    return {"counts": update.counts(), "tiers": {ids[int(r)]: TIERS[int(update.tiers[r])] for r in changed},
            "promoted": named(update.promoted), "demoted": named(update.demoted),
            "promoted_gold": named(update.promoted_gold), "held": named(update.held),
            "over_cap": [int(x) for x in update.over_cap]}


def tick_from_wire(f: Mapping) -> TickResult:
    return TickResult(dict(f["tiers"]), tuple(f["promoted"]), tuple(f["demoted"]), tuple(f["promoted_gold"]),
                      tuple(f["held"]), {t: f["counts"].get(t, 0) for t in TIERS}, tuple(f["over_cap"]))


def talk_result_to_wire(result: TalkResult, chunks: int) -> dict:
    return {"npc_id": result.npc_id, "text": result.text, "emotion": result.emotion,
            "degraded": result.degraded, "reason": result.reason, "tier": result.tier, "bark": result.bark,
            "emote": result.emote, "finish_reason": result.finish_reason or "", "chunks": chunks}


def talk_result_from_wire(f: Mapping) -> TalkResult:
    return TalkResult(f["npc_id"], f["text"], f["emotion"], f["degraded"], f["reason"], f["tier"],
                      bark=f["bark"], emote=f["emote"], finish_reason=f["finish_reason"])


def entity_to_wire(e: Entity) -> dict:
    return {"entity_id": e.entity_id, "kind": e.kind, "position": [float(x) for x in e.position],
            "alive": bool(e.alive), "archetype": e.archetype, "state": e.state, "horde_id": e.horde_id}


def entity_from_wire(f: Mapping) -> Entity:
    return Entity(f["entity_id"], f["kind"], tuple(f["position"]), alive=f["alive"], archetype=f["archetype"],
                  state=f["state"], horde_id=f["horde_id"])


def context_to_wire(context: ActContext | Mapping) -> dict:
    """An ActContext (or {"world": ..., "situation": ...}) as the `world` / `situation` fields of ACT."""
    if isinstance(context, ActContext):
        world, situation = context.world, context.situation
    else:
        world, situation = context["world"], context.get("situation", "Nothing happens.")
    entities = world.values() if isinstance(world, Mapping) else world
    return {"world": [entity_to_wire(e) for e in entities], "situation": situation}


def context_from_wire(f: Mapping) -> ActContext:
    world = {}
    for i, raw in enumerate(f["world"]):
        if raw["entity_id"] in world:
            raise _bad(f"world[{i}].entity_id", f"{raw['entity_id']!r} appears twice")
        try:
            world[raw["entity_id"]] = entity_from_wire(raw)
        except ValueError as e:
            raise _bad(f"world[{i}]", str(e)) from None
    return ActContext(world, f["situation"])


def act_result_to_wire(result: ActResult, limits: GameLimits = DEFAULT_LIMITS) -> dict:
    a = result.action
    position = None if a.position is None else [float(x) for x in a.position]
    if position is not None and len(position) != 3:
        position = None  # only 3-D positions travel (the game's own axes)
    return {"action": {"npc_id": a.npc_id, "name": a.name, "target": a.target, "position": position},
            "valid": bool(result.valid), "reason": result.reason[:limits.max_text],
            "raw": result.raw[:limits.max_text]}


def act_result_from_wire(f: Mapping) -> ActResult:
    a = f["action"]
    position = None if a["position"] is None else tuple(a["position"])
    return ActResult(Action(a["npc_id"], a["name"], a["target"], position), f["valid"], f["reason"], f["raw"])


def card_to_wire(card: Card) -> str:
    """serialize_card's JSON as a string (CardTooLarge over 2 KB: never truncated)."""
    return serialize_card(card).decode()


def card_from_wire(text: str) -> Card:
    return deserialize_card(text)


def fact_to_wire(fact: Fact) -> dict:
    return fact.to_dict()  # the record's own JSON form (restored_at only when set: nil is its default)


def fact_from_wire(f: Mapping) -> Fact:
    return Fact.from_dict(dict(f))


def emotion_to_wire(point: EmotionPoint) -> dict:
    return point.to_dict()


def emotion_from_wire(f: Mapping) -> EmotionPoint:
    return EmotionPoint.from_dict(dict(f))


def event_outcome_to_wire(outcome: EventOutcome) -> dict:
    return {"relationship": card_to_wire(outcome.relationship), "quest": card_to_wire(outcome.quest),
            "fact": fact_to_wire(outcome.fact), "emotion": emotion_to_wire(outcome.emotion)}


def event_outcome_from_wire(f: Mapping) -> EventOutcome:
    return EventOutcome(card_from_wire(f["relationship"]), card_from_wire(f["quest"]),
                        fact_from_wire(f["fact"]), emotion_from_wire(f["emotion"]))


def session_outcome_to_wire(outcome: SessionOutcome) -> dict:
    return {"summary": outcome.summary_text, "method": outcome.method,
            "facts_added": [fact_to_wire(x) for x in outcome.facts_added],
            "facts_evicted": [fact_to_wire(x) for x in outcome.facts_evicted],
            "emotion": None if outcome.emotion is None else emotion_to_wire(outcome.emotion)}


def session_outcome_from_wire(f: Mapping) -> SessionOutcome:
    return SessionOutcome(f["summary"], f["method"], tuple(fact_from_wire(x) for x in f["facts_added"]),
                          tuple(fact_from_wire(x) for x in f["facts_evicted"]),
                          None if f["emotion"] is None else emotion_from_wire(f["emotion"]))


def hordes_to_wire(hordes: Mapping) -> dict:
    """SchedulerServer.hordes() ({horde_id: (leader_id, member_ids)}) as HORDES_REPLY fields."""
    return {"hordes": [{"horde_id": int(h), "leader_id": leader, "members": list(members)}
                       for h, (leader, members) in hordes.items()]}


def hordes_from_wire(f: Mapping) -> dict[int, tuple[str, tuple[str, ...]]]:
    return {h["horde_id"]: (h["leader_id"], tuple(h["members"])) for h in f["hordes"]}


def plain(value: object) -> object:
    """Stats as plain msgpack data: string keys, lists for tuples and sets, numpy scalars unwrapped."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


__all__ = [  # the codec, and the result types it converts (re-exported for the clients)
    "ABSENT", "DEFAULT_LIMITS", "GAME_TO_SCHEDULER", "SCHEDULER_TO_GAME", "ActContext", "ActResult", "Action",
    "Card", "CardError", "CardTooLarge", "Entity", "EventOutcome", "GameErrorCode", "GameLimits",
    "GameMessage", "GameMsgType", "GameProtocolError", "SessionOutcome", "TalkResult", "TickResult", "decode",
    "encode", "error_frames",
]
