"""Relationship and quest cards: typed, versioned, validated, <= 2 KB serialized, rendered deterministically.

A card is a frozen dataclass about one NPC x player. Its serialized form is compact JSON (sorted keys) with a
schema version `v` and a `type`; `revision` counts the changes made to it (every transition bumps it), so the
archive can order card events. A card whose serialized form exceeds the byte limit raises CardTooLarge; it is
never truncated. Transitions (`apply_game_event`) keep each list to its newest MAX_ITEMS entries, which keeps
cards of ASCII text below 2 KB; text in multi-byte scripts can still exceed it, and is rejected.

Rendering uses only the card's own fields (timestamps as UTC dates), so the same card always renders to the
same text: the prompt prefix stays byte-identical and the worker's prefix cache keeps hitting.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

from memory.events import GameEvent
from memory.records import check_id, check_text, check_ts, compact_json

CARD_SCHEMA_VERSION = 1
MAX_CARD_BYTES = 2048
MAX_ITEMS = 8  # per list (promises, betrayals, gifts, quests, milestones of a quest)
MAX_ITEM_CHARS = 120
SCORE_RANGE = (-100, 100)  # trust and affinity
PROMISE_STATUSES = ("open", "kept", "broken")


class CardError(ValueError):
    """A card (or its serialized form) is invalid."""


class CardTooLarge(CardError):
    def __init__(self, card_type: str, npc_id: str, player_id: str, size: int, limit: int):
        super().__init__(f"{card_type} card of npc {npc_id!r} x player {player_id!r} is {size} bytes "
                         f"serialized, over the limit of {limit} bytes; it was not stored (cards are never "
                         "truncated: drop entries or shorten texts)")
        self.size, self.limit = size, limit


def _valid(fn, *args) -> None:
    try:
        fn(*args)
    except CardError:
        raise
    except ValueError as e:
        raise CardError(str(e)) from e


def _check_items(items: object, cls: type, name: str) -> None:
    if not isinstance(items, tuple) or not all(isinstance(i, cls) for i in items):
        raise CardError(f"{name}: must be a tuple of {cls.__name__}, got {items!r}")
    if len(items) > MAX_ITEMS:
        raise CardError(f"{name}: {len(items)} entries, more than the limit of {MAX_ITEMS}")


def _check_score(value: object, name: str) -> None:
    low, high = SCORE_RANGE
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise CardError(f"{name}: must be an int in [{low}, {high}], got {value!r}")


def _check_revision(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CardError(f"revision: must be an int >= 0, got {value!r}")


# -------------------------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Promise:
    text: str
    made_at: float  # epoch seconds
    status: str = "open"

    def __post_init__(self):
        _valid(check_text, self.text, "promise.text", MAX_ITEM_CHARS)
        object.__setattr__(self, "made_at", _ts(self.made_at, "promise.made_at"))
        if self.status not in PROMISE_STATUSES:
            raise CardError(f"promise.status: must be one of {PROMISE_STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class Mark:
    """A dated entry: a betrayal or a gift."""

    text: str
    at: float  # epoch seconds

    def __post_init__(self):
        _valid(check_text, self.text, "text", MAX_ITEM_CHARS)
        object.__setattr__(self, "at", _ts(self.at, "at"))


@dataclass(frozen=True)
class Quest:
    quest_id: str
    title: str
    started_at: float
    milestones: tuple[Mark, ...] = ()

    def __post_init__(self):
        _valid(check_id, self.quest_id, "quest_id")
        _valid(check_text, self.title, "quest.title", MAX_ITEM_CHARS)
        object.__setattr__(self, "started_at", _ts(self.started_at, "quest.started_at"))
        _check_items(self.milestones, Mark, "quest.milestones")


def _ts(value: object, name: str) -> float:
    try:
        return check_ts(value, name)
    except ValueError as e:
        raise CardError(str(e)) from e


# ---------------------------------------------------------------------------------------------- cards


@dataclass(frozen=True)
class RelationshipCard:
    npc_id: str
    player_id: str
    trust: int = 0
    affinity: int = 0
    promises: tuple[Promise, ...] = ()
    betrayals: tuple[Mark, ...] = ()
    gifts: tuple[Mark, ...] = ()
    last_interaction: float | None = None  # epoch seconds
    revision: int = 0

    CARD_TYPE = "relationship"

    def __post_init__(self):
        _valid(check_id, self.npc_id, "npc_id")
        _valid(check_id, self.player_id, "player_id")
        _check_score(self.trust, "trust")
        _check_score(self.affinity, "affinity")
        _check_items(self.promises, Promise, "promises")
        _check_items(self.betrayals, Mark, "betrayals")
        _check_items(self.gifts, Mark, "gifts")
        if self.last_interaction is not None:
            object.__setattr__(self, "last_interaction", _ts(self.last_interaction, "last_interaction"))
        _check_revision(self.revision)

    @classmethod
    def from_fields(cls, raw: dict) -> RelationshipCard:
        return cls(npc_id=raw["npc_id"], player_id=raw["player_id"], trust=raw["trust"],
                   affinity=raw["affinity"], promises=tuple(Promise(**p) for p in raw["promises"]),
                   betrayals=tuple(Mark(**m) for m in raw["betrayals"]),
                   gifts=tuple(Mark(**m) for m in raw["gifts"]), last_interaction=raw["last_interaction"],
                   revision=raw["revision"])


@dataclass(frozen=True)
class QuestCard:
    npc_id: str
    player_id: str
    quests: tuple[Quest, ...] = ()  # active quests, oldest first; finished ones leave the card (a fact stays)
    revision: int = 0

    CARD_TYPE = "quest"

    def __post_init__(self):
        _valid(check_id, self.npc_id, "npc_id")
        _valid(check_id, self.player_id, "player_id")
        _check_items(self.quests, Quest, "quests")
        ids = [q.quest_id for q in self.quests]
        if len(set(ids)) != len(ids):
            raise CardError(f"quests: duplicate quest ids {sorted(ids)}")
        _check_revision(self.revision)

    @classmethod
    def from_fields(cls, raw: dict) -> QuestCard:
        quests = tuple(Quest(quest_id=q["quest_id"], title=q["title"], started_at=q["started_at"],
                             milestones=tuple(Mark(**m) for m in q["milestones"])) for q in raw["quests"])
        return cls(npc_id=raw["npc_id"], player_id=raw["player_id"], quests=quests, revision=raw["revision"])


Card = RelationshipCard | QuestCard
CARD_TYPES: dict[str, type] = {"relationship": RelationshipCard, "quest": QuestCard}


# ------------------------------------------------------------------------------------- serialization


def card_to_dict(card: Card) -> dict:
    return {"v": CARD_SCHEMA_VERSION, "type": card.CARD_TYPE, **asdict(card)}


def serialize_card(card: Card, max_bytes: int = MAX_CARD_BYTES) -> bytes:
    """Compact UTF-8 JSON of the card; CardTooLarge when it exceeds max_bytes."""
    if not isinstance(card, (RelationshipCard, QuestCard)):
        raise CardError(f"card: expected a RelationshipCard or QuestCard, got {type(card).__name__}")
    data = compact_json(card_to_dict(card)).encode()
    if len(data) > max_bytes:
        raise CardTooLarge(card.CARD_TYPE, card.npc_id, card.player_id, len(data), max_bytes)
    return data


def card_from_dict(raw: object) -> Card:
    if not isinstance(raw, dict):
        raise CardError(f"card: expected a JSON object, got {type(raw).__name__}")
    if raw.get("v") != CARD_SCHEMA_VERSION:
        raise CardError(f"card: unsupported schema version {raw.get('v')!r} (this build reads "
                        f"v{CARD_SCHEMA_VERSION})")
    cls = CARD_TYPES.get(raw.get("type"))
    if cls is None:
        raise CardError(f"card: unknown type {raw.get('type')!r}; expected one of {sorted(CARD_TYPES)}")
    body = {k: v for k, v in raw.items() if k not in ("v", "type")}
    expected = {f for f in cls.__dataclass_fields__ if f != "CARD_TYPE"}
    if set(body) != expected:
        raise CardError(f"{cls.CARD_TYPE} card: fields {sorted(body)} differ from {sorted(expected)}")
    try:
        return cls.from_fields(body)
    except (TypeError, KeyError, AttributeError) as e:
        raise CardError(f"{cls.CARD_TYPE} card: malformed entry: {e}") from e


def deserialize_card(data: bytes | str, max_bytes: int = MAX_CARD_BYTES) -> Card:
    raw_bytes = data.encode() if isinstance(data, str) else data
    if len(raw_bytes) > max_bytes:
        raise CardTooLarge("stored", "?", "?", len(raw_bytes), max_bytes)
    try:
        raw = json.loads(raw_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CardError(f"card: not valid JSON: {e}") from e
    return card_from_dict(raw)


# ------------------------------------------------------------------------------------------ rendering

_TRUST_LABELS = ((-60, "hostile"), (-20, "distrustful"), (20, "neutral"), (60, "trusting"), (101, "devoted"))
_AFFINITY_LABELS = ((-60, "loathes"), (-20, "dislikes"), (20, "indifferent"), (60, "likes"), (101, "adores"))


def _label(value: int, labels: tuple[tuple[int, str], ...]) -> str:
    return next(name for bound, name in labels if value < bound)


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _marks(items: tuple[Mark, ...]) -> str:
    return "; ".join(f"{m.text} ({_date(m.at)})" for m in items) if items else "none"


def render_relationship(card: RelationshipCard) -> str:
    promises = "; ".join(f'"{p.text}" ({p.status}, {_date(p.made_at)})' for p in card.promises) or "none"
    last = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(card.last_interaction)) \
        if card.last_interaction is not None else "never"
    return "\n".join([
        f"[Relationship with player {card.player_id}]",
        f"Trust: {card.trust:+d}/100 ({_label(card.trust, _TRUST_LABELS)}). "
        f"Affinity: {card.affinity:+d}/100 ({_label(card.affinity, _AFFINITY_LABELS)}).",
        f"Promises: {promises}.",
        f"Betrayals: {_marks(card.betrayals)}.",
        f"Gifts: {_marks(card.gifts)}.",
        f"Last interaction: {last}.",
    ])


def render_quest(card: QuestCard) -> str:
    lines = [f"[Quests with player {card.player_id}]"]
    for q in card.quests:
        lines.append(f'- {q.quest_id} "{q.title}" (since {_date(q.started_at)}); milestones: '
                     f"{_marks(q.milestones)}.")
    if not card.quests:
        lines.append("No active quests.")
    return "\n".join(lines)


def render_card(card: Card) -> str:
    return render_relationship(card) if isinstance(card, RelationshipCard) else render_quest(card)


# ---------------------------------------------------------------------------------------- transitions


def _newest(items: tuple, item) -> tuple:
    return (*items, item)[-MAX_ITEMS:]


def _clamp(value: int) -> int:
    low, high = SCORE_RANGE
    return max(low, min(high, value))


def _settle_promise(promises: tuple[Promise, ...], text: str, status: str) -> tuple[Promise, ...]:
    """Marks the open promise with this text (case-insensitive), else the newest open one, as `status`."""
    open_ids = [i for i, p in enumerate(promises) if p.status == "open"]
    match = [i for i in open_ids if promises[i].text.strip().lower() == text.strip().lower()]
    chosen = (match or open_ids or [None])[-1]
    if chosen is None:
        return promises
    return tuple(replace(p, status=status) if i == chosen else p for i, p in enumerate(promises))


def _relationship_after(card: RelationshipCard, event: GameEvent, ts: float, trust: int,
                        affinity: int) -> RelationshipCard:
    text = event.text.strip()
    promises, betrayals, gifts = card.promises, card.betrayals, card.gifts
    if event.type == "gift":
        gifts = _newest(gifts, Mark(text or "a gift", ts))
    elif event.type == "promise" and text:
        promises = _newest(promises, Promise(text, ts))
    elif event.type in ("promise_kept", "promise_broken"):
        promises = _settle_promise(promises, text, "kept" if event.type == "promise_kept" else "broken")
    elif event.type == "betrayal":
        betrayals = _newest(betrayals, Mark(text or "a betrayal", ts))
    return replace(card, trust=_clamp(card.trust + trust + event.trust_delta),
                   affinity=_clamp(card.affinity + affinity + event.affinity_delta), promises=promises,
                   betrayals=betrayals, gifts=gifts, last_interaction=ts, revision=card.revision + 1)


def _quest_after(card: QuestCard, event: GameEvent, ts: float) -> tuple[QuestCard, str]:
    """The quest card after a quest_* event, and the quest's title (for the fact)."""
    quests = {q.quest_id: q for q in card.quests}
    current = quests.get(event.quest_id)
    title = current.title if current else (event.text.strip() or event.quest_id)
    if event.type == "quest_started":
        if current is None:
            quests[event.quest_id] = Quest(event.quest_id, title, ts)
    elif event.type == "quest_milestone":
        base = current or Quest(event.quest_id, event.quest_id, ts)
        quests[event.quest_id] = replace(base, milestones=_newest(base.milestones,
                                                                  Mark(event.text.strip() or "progress", ts)))
    else:
        quests.pop(event.quest_id, None)
    ordered = sorted(quests.values(), key=lambda q: (q.started_at, q.quest_id))[-MAX_ITEMS:]
    return replace(card, quests=tuple(ordered), revision=card.revision + 1), title


_FACT_TEMPLATES = {
    "gift": "The player gave me {text}.",
    "promise": "The player promised: {text}.",
    "promise_kept": "The player kept a promise: {text}.",
    "promise_broken": "The player broke a promise: {text}.",
    "betrayal": "The player betrayed me: {text}.",
    "help": "The player helped me: {text}.",
    "life_saved": "The player saved my life: {text}.",
    "attack": "The player attacked me: {text}.",
    "insult": "The player insulted me: {text}.",
    "quest_started": "I gave the player the quest \"{title}\".",
    "quest_milestone": "On the quest \"{title}\" the player reached: {text}.",
    "quest_completed": "The player completed the quest \"{title}\".",
    "quest_failed": "The player failed the quest \"{title}\".",
}


def apply_game_event(relationship: RelationshipCard, quest: QuestCard, event: GameEvent, ts: float,
                     effect: tuple[int, int]) -> tuple[RelationshipCard, QuestCard, str]:
    """(relationship card, quest card, fact text) after `event` at `ts`; effect = (trust, affinity) deltas.

    The relationship card always changes (last interaction at least); the quest card only on quest events.
    """
    title = ""
    if event.type.startswith("quest_"):
        quest, title = _quest_after(quest, event, ts)
    relationship = _relationship_after(relationship, event, ts, *effect)
    text = event.text.strip() or {"gift": "a gift"}.get(event.type, "")
    fact = _FACT_TEMPLATES[event.type].format(text=text, title=title)
    return relationship, quest, fact.replace(": .", ".")
