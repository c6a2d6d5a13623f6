"""The memory records below the cards: turns, salient facts, session summaries, emotion points.

Each is a frozen dataclass validated when built, with one JSON form (compact, sorted keys) used in Redis and
in outbox payloads. The JSON of a record is deterministic, so a record re-written after a lost reply lands on
the same sorted-set member (writes are idempotent).

Two times: `ts` is when the thing happened (prompt dates and retrieval recency use it); `window_ts` is where
the record sits in the 30-day Redis window. They differ only for facts, summaries and emotion points that a
cold restore brought back from the archive (`restored_at`, see memory/store.py).
"""

from __future__ import annotations

import functools
import json
import math
import re
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SPEAKERS = ("player", "npc")
MAX_FACT_CHARS = 280
IMPORTANCE_RANGE = (1, 10)  # Generative Agents' poignancy scale: 1 mundane, 10 life-changing
# NPC and player ids become parts of Redis keys: no ':' (the separator), no spaces or glob characters.
_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_HEX_ID = re.compile(r"[0-9a-f]{32}")


def new_id() -> str:
    return uuid.uuid4().hex


def compact_json(obj: Any) -> str:
    """The one JSON form of the package: no spaces, sorted keys, UTF-8 kept (sizes are counted in bytes)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)


def check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise ValueError(f"{name}: needs 1-128 of letters, digits, '_', '.' or '-', got {value!r}")
    return value


def check_hex_id(value: object, name: str) -> str:
    if not isinstance(value, str) or _HEX_ID.fullmatch(value) is None:
        raise ValueError(f"{name}: must be 32 lowercase hex digits (uuid4 hex), got {value!r}")
    return value


def check_ts(value: object, name: str = "ts") -> float:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number of epoch seconds >= 0, got {value!r}")
    return float(value)


def check_text(value: object, name: str, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ValueError(f"{name}: must be a non-empty string, got {value!r}")
    if len(value) > max_chars:
        raise ValueError(f"{name}: {len(value)} characters, more than the limit of {max_chars}")
    return value


def check_range(value: object, name: str, low: float, high: float) -> float:
    if not _is_number(value) or not low <= value <= high:
        raise ValueError(f"{name}: must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    # dataclasses.fields costs ~1 us a call, and a prefetch parses ~40 records.
    return frozenset(f.name for f in fields(cls))


class _Record:
    """JSON round trip shared by the records (each a frozen dataclass of JSON-native fields)."""

    def to_dict(self) -> dict:
        out = asdict(self)
        if "restored_at" in out and out["restored_at"] is None:
            del out["restored_at"]  # only restored records carry it: the JSON of every other one is unchanged
        return out

    @property
    def window_ts(self) -> float:
        """Where the record sits in the 30-day window (its Redis score, what trimming and retention compare):
        the time a cold restore put it back, else its own ts."""
        restored = getattr(self, "restored_at", None)
        return self.ts if restored is None else restored

    def to_json(self) -> str:
        return compact_json(self.to_dict())

    @classmethod
    def from_dict(cls, raw: object):
        if not isinstance(raw, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - _field_names(cls))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**raw)

    @classmethod
    def from_json(cls, text: str | bytes):
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cls.__name__}: not valid JSON: {e}") from e
        return cls.from_dict(raw)


@dataclass(frozen=True)
class Turn(_Record):
    """One utterance. turn_id is also the event_id of its outbox event; seq numbers the turns of a session
    (orders turns of equal ts). valence in [-1, 1], arousal in [0, 1] when the emotional_response step
    scored it."""

    speaker: str
    text: str
    ts: float
    session_id: str
    seq: int = 0
    turn_id: str = field(default_factory=new_id)
    valence: float | None = None
    arousal: float | None = None

    def __post_init__(self):
        if self.speaker not in SPEAKERS:
            raise ValueError(f"speaker: must be one of {SPEAKERS}, got {self.speaker!r}")
        check_text(self.text, "text", 1 << 16)  # the store applies MemoryConfig.max_turn_chars
        object.__setattr__(self, "ts", check_ts(self.ts))
        check_hex_id(self.session_id, "session_id")
        if not isinstance(self.seq, int) or isinstance(self.seq, bool) or self.seq < 0:
            raise ValueError(f"seq: must be an int >= 0, got {self.seq!r}")
        check_hex_id(self.turn_id, "turn_id")
        _check_emotion(self.valence, self.arousal, optional=True)


@dataclass(frozen=True)
class Fact(_Record):
    """A salient fact the NPC holds about the player; ts is when it was learned (epoch seconds)."""

    text: str
    importance: int
    ts: float
    fact_id: str = field(default_factory=new_id)
    source: str = "session"  # "session" (extracted at session end) or a game event type
    restored_at: float | None = None  # set by a cold restore (see window_ts); ts stays when it was learned

    def __post_init__(self):
        check_text(self.text, "text", MAX_FACT_CHARS)
        low, high = IMPORTANCE_RANGE
        if not isinstance(self.importance, int) or isinstance(self.importance, bool) \
                or not low <= self.importance <= high:
            raise ValueError(f"importance: must be an int in [{low}, {high}], got {self.importance!r}")
        object.__setattr__(self, "ts", check_ts(self.ts))
        check_hex_id(self.fact_id, "fact_id")
        check_text(self.source, "source", 32)
        _check_restored_at(self)


@dataclass(frozen=True)
class Summary(_Record):
    """A session folded into prose (300-600 characters when the session had that much to say)."""

    text: str
    ts: float
    session_id: str
    turns: int  # how many turns it folds
    summary_id: str = field(default_factory=new_id)
    method: str = "extractive"  # "worker" when the worker's summarization request wrote it
    restored_at: float | None = None  # set by a cold restore (see window_ts)

    def __post_init__(self):
        check_text(self.text, "text", 4096)
        object.__setattr__(self, "ts", check_ts(self.ts))
        check_hex_id(self.session_id, "session_id")
        check_hex_id(self.summary_id, "summary_id")
        if not isinstance(self.turns, int) or self.turns < 0:
            raise ValueError(f"turns: must be an int >= 0, got {self.turns!r}")
        if self.method not in ("extractive", "worker"):
            raise ValueError(f"method: must be 'extractive' or 'worker', got {self.method!r}")
        _check_restored_at(self)


@dataclass(frozen=True)
class EmotionPoint(_Record):
    """One point of the NPC's emotional trajectory towards the player: valence [-1, 1], arousal [0, 1]."""

    valence: float
    arousal: float
    ts: float
    source: str = "session"
    point_id: str = field(default_factory=new_id)
    restored_at: float | None = None  # set by a cold restore (see window_ts)

    def __post_init__(self):
        _check_emotion(self.valence, self.arousal, optional=False)
        object.__setattr__(self, "valence", float(self.valence))
        object.__setattr__(self, "arousal", float(self.arousal))
        object.__setattr__(self, "ts", check_ts(self.ts))
        check_text(self.source, "source", 32)
        check_hex_id(self.point_id, "point_id")
        _check_restored_at(self)


def _check_restored_at(record) -> None:
    if record.restored_at is not None:
        object.__setattr__(record, "restored_at", check_ts(record.restored_at, "restored_at"))


def _check_emotion(valence: object, arousal: object, optional: bool) -> None:
    if optional and valence is None and arousal is None:
        return
    check_range(valence, "valence", -1.0, 1.0)
    check_range(arousal, "arousal", 0.0, 1.0)
