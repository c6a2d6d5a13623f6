"""Nearline tier: the 30-day window in Redis, its key layout, write commands and the one-round-trip prefetch.

Key layout (P is MemoryConfig.key_prefix, "npc:mem:" by default; ids never contain ':'):

| key | type | holds |
| --- | --- | --- |
| P rel:<npc>:<player> | string | relationship card, compact JSON (<= max_card_bytes) |
| P quest:<npc>:<player> | string | quest card, compact JSON |
| P turns:<npc>:<player> | zset | Turn JSON by ts: the open session's prompt window (as in the hot cache) |
| P sum:<npc>:<player> | zset | Summary JSON by ts: session summaries of the window (<= max_summaries) |
| P facts:<npc>:<player> | zset | Fact JSON by ts: the retained salient facts (<= max_facts, merge_facts) |
| P emo:<npc>:<player> | zset | EmotionPoint JSON by ts: the emotional trajectory (<= max_emotion_points) |
| P outbox | stream | OutboxEvent fields (memory.events): every turn and memory event, for the archiver |
| P restore:requests | stream | cold-restore requests {npc_id, player_id} for npc-restore (restore.py) |
| P restore:<npc>:<player> | string | npc-restore's answer: the pair's archived history as JSON (TTL 24 h) |

Time: every zset is scored by the store's injectable clock (epoch seconds: a record's ts, or for a restored
record the window time it was given, `window_ts`), and both trimming (ZREMRANGEBYSCORE below now - window on
each write) and reading (BYSCORE from now - window) use that clock, so the 30-day window follows game/test
time. Redis's own TTLs run on its wall clock: every write of a pair (turn, card, game event, session end)
re-arms `idle_key_ttl_s` (PEXPIRE) on all six of its keys, so only an NPC x player idle for longer
disappears, and never one key of a pair in conversation while the others stay.

Cold restore: every prefetch also GETs the pair's restore blob (one more read in the same round trip);
`parse_restore` turns a blob into records that the store merges into the keys above (memory/store.py).

Writes are raw commands (tuples) built here without I/O, so the store can pipeline them, buffer them through
an outage and replay them. Every member is deterministic JSON with a unique id, so a replayed ZADD/SET is a
no-op (the replayed XADD repeats its event_id, which the archive deduplicates).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import redis.asyncio as aioredis

from memory.cards import CardError, QuestCard, RelationshipCard, card_from_dict, deserialize_card
from memory.config import MemoryConfig
from memory.events import OutboxEvent, outbox_stream
from memory.hot_cache import PairMemory
from memory.records import EmotionPoint, Fact, Summary, Turn, check_id

log = logging.getLogger(__name__)

Command = tuple  # one raw Redis command: ("ZADD", key, score, member), ...
PAIR_KEY_KINDS = ("rel", "quest", "turns", "sum", "facts", "emo")
# Replies per pair in a prefetch pipeline: PAIR_KEY_KINDS in order, then the restore blob.
PREFETCH_COMMANDS = len(PAIR_KEY_KINDS) + 1
RESTORE_VERSION = 1  # of the restore blob (written by memory/restore.py, read by parse_restore)
RESTORE_SPACING_S = 0.001  # window-time step between restored records of one kind (keeps their order)
_WHITESPACE = re.compile(r"\s+")


def restore_key(prefix: str, npc_id: str, player_id: str) -> str:
    return f"{prefix}restore:{npc_id}:{player_id}"


def restore_requests_stream(prefix: str) -> str:
    # Cannot collide with a restore_key: ids never contain ':'.
    return f"{prefix}restore:requests"


def restore_request_cmd(prefix: str, npc_id: str, player_id: str | None) -> Command:
    """One XADD asking npc-restore for a pair's history (player_id None: the NPC's recent players)."""
    check_id(npc_id, "npc_id")
    if player_id is not None:
        check_id(player_id, "player_id")
    return ("XADD", restore_requests_stream(prefix), "*", "npc_id", npc_id, "player_id", player_id or "")


@dataclass
class RestoredMemory:
    """A restore blob's records (memory/restore.py), each parsed and validated; turns and game events are
    not kept (ended sessions live on in their summaries, events in the cards and facts they produced)."""

    relationship: RelationshipCard | None = None
    quest: QuestCard | None = None
    summaries: list[Summary] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    emotions: list[EmotionPoint] = field(default_factory=list)


def restamp(records: Sequence, below: float) -> list:
    """The records, oldest first, with window times (restored_at) RESTORE_SPACING_S apart ending just below
    `below`: their order is kept and they sort before everything the pair wrote after `below`."""
    ordered = sorted(records, key=lambda r: r.ts)
    n = len(ordered)
    return [replace(r, restored_at=below - (n - i) * RESTORE_SPACING_S) for i, r in enumerate(ordered)]


class Nearline:
    """Key names, write commands and prefetch parsing of the Redis window (no connection of its own)."""

    def __init__(self, config: MemoryConfig):
        self.config = config
        self.prefix = config.key_prefix
        self.outbox = outbox_stream(config.key_prefix)
        self.idle_ms = int(config.idle_key_ttl_s * 1000)
        self.corrupt_entries = 0  # members or cards that failed to parse (logged, skipped)

    def key(self, kind: str, npc_id: str, player_id: str) -> str:
        return f"{self.prefix}{kind}:{npc_id}:{player_id}"

    def pair_keys(self, npc_id: str, player_id: str) -> list[str]:
        return [self.key(kind, npc_id, player_id) for kind in PAIR_KEY_KINDS]

    def cutoff(self, now: float) -> float:
        """Entries scored below this are outside the window."""
        return now - self.config.window_s

    # ------------------------------------------------------------------------------------------ writes

    def _zadd_window(self, kind: str, npc_id: str, player_id: str, records: Sequence, now: float,
                     keep: int) -> list[Command]:
        """ZADD records by ts, drop members older than the window, keep the newest `keep`, re-arm the TTL."""
        key = self.key(kind, npc_id, player_id)
        cmds: list[Command] = []
        if records:
            cmds.append(("ZADD", key, *[x for r in records for x in (repr(r.window_ts), r.to_json())]))
        cmds.append(("ZREMRANGEBYSCORE", key, "-inf", f"({self.cutoff(now)!r}"))
        cmds.append(("ZREMRANGEBYRANK", key, 0, -(keep + 1)))
        cmds.append(("PEXPIRE", key, self.idle_ms))
        return cmds

    def turn_cmds(self, npc_id: str, player_id: str, turn: Turn, compacted: Sequence[Turn],
                  now: float) -> list[Command]:
        """Appends a turn; `compacted` are the turns the hot window just dropped, removed here too, so Redis
        holds the same window as the prompt (a reload rebuilds the same prompt prefix). Re-arms the idle TTL
        of all the pair's keys: a pair in conversation is not idle, whichever keys this turn writes."""
        return self.drop_turns_cmds(npc_id, player_id, compacted) + self._zadd_window(
            "turns", npc_id, player_id, [turn], now, self.config.turn_window_max) + self.touch_cmds(
            npc_id, player_id)

    def drop_turns_cmds(self, npc_id: str, player_id: str, turns: Sequence[Turn]) -> list[Command]:
        """Removes exactly these turns (a session end folds them; turns of a newer session stay)."""
        if not turns:
            return []
        return [("ZREM", self.key("turns", npc_id, player_id), *[t.to_json() for t in turns])]

    def card_cmds(self, card: RelationshipCard | QuestCard, data: bytes,
                  only_new: bool = False) -> list[Command]:
        """SET of the card; only_new (NX): never over a card already there (a restored card must not replace
        one written since)."""
        kind = "rel" if isinstance(card, RelationshipCard) else "quest"
        nx = ("NX",) if only_new else ()
        return [("SET", self.key(kind, card.npc_id, card.player_id), data, "PX", self.idle_ms, *nx)]

    def summary_cmds(self, npc_id: str, player_id: str, summary: Summary, now: float) -> list[Command]:
        return self._zadd_window("sum", npc_id, player_id, [summary], now, self.config.max_summaries)

    def facts_cmds(self, npc_id: str, player_id: str, added: Sequence[Fact], evicted: Sequence[Fact],
                   now: float) -> list[Command]:
        # ZREM before ZADD: a fact replaced by a same-text one of a new id must not count against the cap.
        cmds: list[Command] = []
        if evicted:
            cmds.append(("ZREM", self.key("facts", npc_id, player_id), *[f.to_json() for f in evicted]))
        # The store's retention already holds the count to max_facts; the rank cap here is a backstop for
        # facts it did not know of (written while its entry was degraded), sized so it never cuts a kept one.
        return cmds + self._zadd_window("facts", npc_id, player_id, added, now, 4 * self.config.max_facts)

    def emotion_cmds(self, npc_id: str, player_id: str, point: EmotionPoint, now: float) -> list[Command]:
        return self._zadd_window("emo", npc_id, player_id, [point], now, self.config.max_emotion_points)

    def restored_cmds(self, npc_id: str, player_id: str, summaries: Sequence[Summary],
                      emotions: Sequence[EmotionPoint], now: float) -> list[Command]:
        """Writes restored summaries and emotion points (already restamped) and deletes the restore blob."""
        c, cmds = self.config, [("DEL", restore_key(self.prefix, npc_id, player_id))]
        if summaries:
            cmds += self._zadd_window("sum", npc_id, player_id, summaries, now, c.max_summaries)
        if emotions:
            cmds += self._zadd_window("emo", npc_id, player_id, emotions, now, c.max_emotion_points)
        return cmds

    def touch_cmds(self, npc_id: str, player_id: str) -> list[Command]:
        return [("PEXPIRE", key, self.idle_ms) for key in self.pair_keys(npc_id, player_id)]

    def outbox_cmd(self, event: OutboxEvent) -> Command:
        trim = ("MAXLEN", "~", self.config.outbox_maxlen) if self.config.outbox_maxlen else ()
        flat = [x for item in event.to_fields().items() for x in item]
        return ("XADD", self.outbox, *trim, "*", *flat)

    # ------------------------------------------------------------------------------------------- reads

    def queue_prefetch(self, pipe, npc_id: str, player_id: str, now: float) -> None:
        """Queues the PREFETCH_COMMANDS reads of one pair on a pipeline, in PAIR_KEY_KINDS order."""
        low = repr(self.cutoff(now))
        c = self.config
        pipe.execute_command("GET", self.key("rel", npc_id, player_id))
        pipe.execute_command("GET", self.key("quest", npc_id, player_id))
        pipe.execute_command("ZRANGE", self.key("turns", npc_id, player_id), low, "+inf", "BYSCORE")
        pipe.execute_command("ZRANGE", self.key("sum", npc_id, player_id), "+inf", low, "BYSCORE", "REV",
                             "LIMIT", 0, c.prefetch_summaries)
        pipe.execute_command("ZRANGE", self.key("facts", npc_id, player_id), low, "+inf", "BYSCORE")
        pipe.execute_command("ZRANGE", self.key("emo", npc_id, player_id), "+inf", low, "BYSCORE", "REV",
                             "LIMIT", 0, c.prefetch_emotion_points)
        pipe.execute_command("GET", restore_key(self.prefix, npc_id, player_id))

    def parse_prefetch(self, replies: Sequence, npc_id: str,
                       player_id: str) -> tuple[PairMemory, bytes | None]:
        """(the pair's memory, its raw restore blob or None)."""
        rel, quest, turns, summaries, facts, emotions, blob = replies
        entry = PairMemory(npc_id, player_id, relationship=self._card(rel, RelationshipCard),
                           quest=self._card(quest, QuestCard), turns=self._records(turns, Turn),
                           summaries=self._records(summaries, Summary), facts=self._records(facts, Fact),
                           emotions=self._records(emotions, EmotionPoint))
        entry.turns = sorted(entry.turns, key=lambda t: (t.ts, t.seq))[-self.config.turn_window_max:]
        entry.session_id = entry.turns[-1].session_id if entry.turns else None  # resume an open session
        return entry, blob

    async def prefetch(self, client: aioredis.Redis, pairs: Sequence[tuple[str, str]],
                       now: float) -> list[tuple[PairMemory, bytes | None]]:
        """Everything a conversation start needs for each pair, in ONE pipelined round trip: (memory,
        restore blob or None) per pair."""
        async with client.pipeline(transaction=False) as pipe:
            for npc_id, player_id in pairs:
                self.queue_prefetch(pipe, npc_id, player_id, now)
            replies = await pipe.execute()
        n = PREFETCH_COMMANDS
        return [self.parse_prefetch(replies[i * n:(i + 1) * n], npc, player)
                for i, (npc, player) in enumerate(pairs)]

    def parse_restore(self, raw: bytes, npc_id: str, player_id: str) -> RestoredMemory | None:
        """The records of a restore blob; None (counted as corrupt) when the blob itself is unusable. A bad
        entry inside is skipped and counted, the others are kept."""
        try:
            blob = json.loads(raw)
            if not isinstance(blob, dict) or blob.get("version") != RESTORE_VERSION:
                raise ValueError(f"not a version {RESTORE_VERSION} restore blob")
            if (blob.get("npc_id"), blob.get("player_id")) != (npc_id, player_id):
                raise ValueError(f"blob of {blob.get('npc_id')!r} x {blob.get('player_id')!r} under the key "
                                 f"of {npc_id!r} x {player_id!r}")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return self._corrupt("restore blob", e)
        cards = blob.get("cards") if isinstance(blob.get("cards"), dict) else {}
        return RestoredMemory(
            relationship=self._restored_card(cards.get("relationship"), RelationshipCard, npc_id, player_id),
            quest=self._restored_card(cards.get("quest"), QuestCard, npc_id, player_id),
            summaries=self._restored(blob.get("summaries"), Summary),
            facts=self._restored(blob.get("facts"), Fact),
            emotions=self._restored(blob.get("emotions"), EmotionPoint))

    def _restored(self, items: object, cls: type) -> list:
        # Items are {"ts": epoch s, "payload": the outbox payload, i.e. the record's dict}.
        records = []
        for item in items if isinstance(items, list) else []:
            try:
                records.append(cls.from_dict(item["payload"]))
            except (ValueError, TypeError, KeyError) as e:
                self._corrupt(f"restored {cls.__name__}", e)
        return records

    def _restored_card(self, item: object, cls: type, npc_id: str, player_id: str):
        if item is None:
            return None
        try:
            card = card_from_dict(item["payload"]["card"])
            if not isinstance(card, cls) or (card.npc_id, card.player_id) != (npc_id, player_id):
                raise ValueError(f"a {type(card).__name__} of {card.npc_id!r} x {card.player_id!r}")
        except (ValueError, TypeError, KeyError) as e:  # CardError is a ValueError
            return self._corrupt(f"restored {cls.CARD_TYPE} card", e)
        return card

    def _card(self, raw: bytes | None, cls: type):
        if raw is None:
            return None
        try:
            card = deserialize_card(raw, self.config.max_card_bytes)
        except CardError as e:
            return self._corrupt(f"{cls.CARD_TYPE} card", e)
        return card if isinstance(card, cls) else self._corrupt(f"{cls.CARD_TYPE} card", type(card).__name__)

    def _records(self, members: Iterable[bytes], cls: type) -> list:
        records = []
        for member in members:
            try:
                records.append(cls.from_json(member))
            except (ValueError, TypeError) as e:
                self._corrupt(cls.__name__, e)
        return records

    def _corrupt(self, what: str, error: object) -> None:
        # Serving goes on without the entry; a later write of the same card or list replaces it.
        self.corrupt_entries += 1
        log.warning("skipping an unreadable %s in Redis: %s", what, error)
        return None


# ------------------------------------------------------------------------------------------- retention


def normalized(text: str) -> str:
    return _WHITESPACE.sub(" ", text.strip().lower())


def merge_facts(existing: Sequence[Fact], new: Sequence[Fact], max_facts: int,
                cutoff: float) -> tuple[list[Fact], list[Fact], list[Fact]]:
    """(kept, added, evicted) after learning `new`: the `max_facts` most important facts inside the window
    (by window_ts; newer first on ties, by ts). Of held facts with one text the later in `existing` wins; a
    new fact with the text of a held one replaces it, keeping the higher importance. `added` are the new
    facts kept; `evicted` the held facts to delete."""
    by_text = {normalized(f.text): f for f in existing if f.window_ts >= cutoff}
    for fact in new:
        held = by_text.get(normalized(fact.text))
        if held is not None and held.importance > fact.importance:
            fact = Fact(fact.text, held.importance, fact.ts, fact.fact_id, fact.source)
        by_text[normalized(fact.text)] = fact
    ranked = sorted(by_text.values(), key=lambda f: (f.importance, f.ts, f.fact_id), reverse=True)
    kept = ranked[:max_facts]
    kept_ids = {f.fact_id for f in kept}
    new_ids = {f.fact_id for f in new}
    added = [f for f in kept if f.fact_id in new_ids]
    evicted = [f for f in existing if f.fact_id not in kept_ids]
    return kept, added, evicted


# ---------------------------------------------------------------------------------------------- upkeep


async def delete_keys(client: aioredis.Redis, prefix: str) -> int:
    """Deletes every key under `prefix` (SCAN + DEL in batches; never KEYS). Returns how many."""
    if not prefix.endswith(":"):
        raise ValueError(f"prefix: must end with ':' so that it cannot match other prefixes, got {prefix!r}")
    deleted, batch = 0, []
    async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await client.delete(*batch)
            batch = []
    if batch:
        deleted += await client.delete(*batch)
    return deleted


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
