"""MemoryStore: the facade the scheduler uses (hot cache in front of the Redis window, outbox on every write).

    client = connect()                                    # redis.asyncio client with outage-friendly timeouts
    store = MemoryStore(client, MemoryConfig(), clock=time.time, summarize=worker_summarize)
    ctx = await store.prefetch("npc-7", "player-1")       # hot hit: no I/O; miss: ONE pipelined round trip
    text = await store.prompt_memory("npc-7", "player-1", query="Did you find my amulet?")
    await store.record_turn("npc-7", "player-1", "player", "Did you find my amulet?")
    await store.apply_event("npc-7", "player-1", GameEvent("gift", "a silver ring"))
    outcome = await store.end_session("npc-7", "player-1")  # summary + facts + emotion point

Writes go to the hot entry first, then to Redis as one MULTI that also holds their outbox XADDs (a turn and
its outbox event land together or not at all). PostgreSQL is never touched here: the archiver drains the
outbox.

Redis outage: a write that fails with a connection error or timeout marks Redis down; from then on writes wait
in a bounded in-process buffer (in order; when full, the oldest is dropped and counted, never silently) and a
background task retries every `retry_interval_s`, flushing the buffer in order, chunk by chunk, before marking
Redis up. While Redis is down (or the buffer is not yet drained) prefetch serves the hot entry, or an empty
"degraded" context when there is none. Card transitions need the current cards: on an entry built without
Redis (`loaded` False) `apply_event`/`get_card` raise MemoryUnavailable rather than overwrite unknown cards.

Cold restore (a pair unseen for longer than the 30-day window has nothing left in Redis): a prefetch whose
round trip finds the pair empty serves that empty context at once, and asks the restore job for the pair's
archived history with one XADD sent in the background (`npc-restore`, memory/restore.py; PostgreSQL is read
there, never here). Every pair, known to the game or not, is asked for on its first empty prefetch: a first
meeting costs one XADD and one indexed archive lookup off the hot path, and the job answers "nothing" with an
empty blob. While the request is open (`restore_wait_s` on the store clock, and Redis up) the pair's
prefetches skip the hot cache and go to Redis, whose one round trip also GETs the blob; once it is there its
facts, summaries, emotion points and cards are merged into the hot entry and into the Redis keys, and the
blob is deleted, in one MULTI (a second round trip, once per restore). Re-scoring: restored records keep
their own `ts` (prompt dates and retrieval recency stay true) and get window times (`restored_at`, their
Redis scores) 1 ms apart, in their original order, just below the oldest record of that kind the pair
already holds (or the restore time): inside the window, before anything written since, and they age out 30
days after the restore unless the pair is seen again. A card written while the request was open wins over
the archived one (SET NX); archived turns and game events are not restored (ended sessions live on in their
summaries, events in the cards and facts they changed).

Session end awaits the worker's summary (seconds, at low priority): run `end_session` as a task beside the
NPC's actor, not on its hot path; it detaches the turns first, so a conversation may resume meanwhile.

Ownership: one scheduler process owns an NPC and its actor awaits each call, so an entry is never written
concurrently; two processes writing the same NPC x player would race (last write wins in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memory.cards import (
    Card,
    CardTooLarge,
    QuestCard,
    RelationshipCard,
    apply_game_event,
    card_to_dict,
    render_quest,
    render_relationship,
    serialize_card,
)
from memory.config import MemoryConfig
from memory.events import GAME_EVENT_EFFECTS, GameEvent, OutboxEvent
from memory.hot_cache import HotCache, PairKey, PairMemory
from memory.nearline import Command, Nearline, RestoredMemory, merge_facts, restamp, restore_request_cmd
from memory.records import EmotionPoint, Fact, Summary, Turn, check_id, new_id
from memory.retrieval import Embedder, MiniLMEmbedder, retrieve_facts
from memory.services import redis_url
from memory.session import (
    SessionOutcome,
    Summarizer,
    fact_candidates,
    select_candidates,
    session_emotion,
    session_length,
    summarize_session,
)

log = logging.getLogger(__name__)

# What "Redis is unreachable" looks like from the client; anything else (ResponseError...) is a bug to raise.
REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


class MemoryUnavailable(RuntimeError):
    """The operation needs state that only Redis holds, and Redis is down."""


def connect(url: str | None = None, config: MemoryConfig | None = None) -> aioredis.Redis:
    """A redis.asyncio client for the store: short timeouts and a single immediate retry (redis-py's default
    of 10 retries with backoff would hold a hot-path call for seconds before the store can fall back)."""
    timeout = (config or MemoryConfig()).redis_timeout_s
    return aioredis.Redis.from_url(url or redis_url(), socket_timeout=timeout, socket_connect_timeout=timeout,
                                   retry=Retry(NoBackoff(), 1))


@dataclass(frozen=True)
class MemoryContext:
    """A snapshot of what an NPC remembers of a player. source: "hot" (served from the hot cache), "redis"
    (loaded in one round trip) or "degraded" (Redis down: whatever the hot cache had, possibly nothing).
    restore_pending: the pair had nothing in Redis and its archived history was asked for (cold restore);
    this context may be missing what a later one will hold."""

    npc_id: str
    player_id: str
    relationship: RelationshipCard | None
    quest: QuestCard | None
    turns: tuple[Turn, ...]  # oldest first
    summaries: tuple[Summary, ...]  # newest first
    facts: tuple[Fact, ...]
    emotions: tuple[EmotionPoint, ...]  # newest first
    source: str
    restore_pending: bool = False


@dataclass(frozen=True)
class EventOutcome:
    relationship: RelationshipCard
    quest: QuestCard
    fact: Fact
    emotion: EmotionPoint


@dataclass
class _Write:
    cmds: list[Command]
    events: int  # outbox events among cmds (what an overflow loses)


class MemoryStore:
    def __init__(self, client: aioredis.Redis, config: MemoryConfig | None = None, *,
                 clock: Callable[[], float] = time.time, summarize: Summarizer | None = None,
                 embedder: Embedder | None = None):
        self.client = client
        self.config = config or MemoryConfig()
        self.clock = clock  # epoch seconds; every timestamp, TTL and window cutoff of the package uses it
        self.summarize = summarize  # the worker's low-priority summarization request, when one is connected
        self.embedder = embedder or (MiniLMEmbedder() if self.config.embeddings else None)
        self.nearline = Nearline(self.config)
        self.hot = HotCache(self.config.hot_max_entries, self.config.hot_ttl_s)
        self._buffer: deque[_Write] = deque()
        self._down = False
        self._flusher: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # restore requests in flight (held: tasks are weak refs)
        self.counters = dict.fromkeys(("dropped_writes", "dropped_events", "flushed_writes", "write_errors",
                                       "redis_errors", "degraded_prefetches", "redis_prefetches",
                                       "restores_requested", "restores_merged", "restores_abandoned"), 0)

    # --------------------------------------------------------------------------------------------- reads

    async def prefetch(self, npc_id: str, player_id: str) -> MemoryContext:
        """Everything a conversation start needs: the hot entry when it is there, else ONE pipelined round
        trip to Redis (cards, turn window, newest summaries, facts, emotion points)."""
        return (await self.prefetch_many([(npc_id, player_id)]))[0]

    async def prefetch_many(self, pairs: Sequence[tuple[str, str]]) -> list[MemoryContext]:
        """prefetch for many NPC x player pairs (a scheduler tick's conversation starts): all hot misses share
        ONE pipelined round trip."""
        now = self.clock()
        for npc_id, player_id in pairs:
            _check_pair(npc_id, player_id)
        entries = {key: self.hot.get(key, now) for key in dict.fromkeys(pairs)}
        contexts = {key: self._context(e, "hot") for key, e in entries.items() if self._hot_ready(e, now)}
        missing = [key for key in entries if key not in contexts]
        loaded = await self._load(missing, now) if missing and not self._down else {}
        for key in missing:
            if key in loaded:
                contexts[key] = self._context(loaded[key], "redis")
            else:
                self.counters["degraded_prefetches"] += 1
                contexts[key] = self._context(self._degraded_entry(key, now), "degraded")
        return [contexts[key] for key in pairs]

    async def get_card(self, npc_id: str, player_id: str, card_type: str) -> Card | None:
        """The "relationship" or "quest" card; None when the pair has none yet."""
        if card_type not in ("relationship", "quest"):
            raise ValueError(f"card_type: must be 'relationship' or 'quest', got {card_type!r}")
        entry = await self._loaded_entry(npc_id, player_id)
        return entry.relationship if card_type == "relationship" else entry.quest

    async def prompt_memory(self, npc_id: str, player_id: str, query: str = "") -> str:
        """The memory part of a prompt, in the prompt layout's order (see render_memory), with the facts
        chosen for `query` by recency x importance x relevance."""
        context = await self.prefetch(npc_id, player_id)
        facts = retrieve_facts(context.facts, query, self.clock(), self.config, embedder=self.embedder)
        return render_memory(context, facts)

    def _hot_ready(self, entry: PairMemory | None, now: float) -> bool:
        """Whether a hot entry answers a prefetch without Redis: it must hold the pair's Redis state, and a
        cold restore it asked for must be answered, given up on (restore_wait_s), or unreachable (Redis down:
        the hot entry is then the best there is)."""
        if entry is None or not entry.loaded:
            return False
        if entry.restore_requested is None or self._down:
            return True
        if now - entry.restore_requested <= self.config.restore_wait_s:
            return False
        # npc-restore is down or backed up: stop a round trip per start. Its blob, when it comes, is merged at
        # this pair's next hot miss (the prefetch pipeline always GETs it).
        entry.restore_requested = None
        self.counters["restores_abandoned"] += 1
        return True

    def _context(self, entry: PairMemory, source: str) -> MemoryContext:
        return MemoryContext(entry.npc_id, entry.player_id, entry.relationship, entry.quest,
                             tuple(entry.turns), tuple(entry.summaries), tuple(entry.facts),
                             tuple(entry.emotions), source, entry.restore_requested is not None)

    async def _load(self, keys: list[PairKey], now: float) -> dict[PairKey, PairMemory]:
        """Loads pairs from Redis into the hot cache (merged with their partial entries and with a restore
        blob found beside them); {} when down. Upkeep that must reach Redis (restored records, facts over
        the cap) is one awaited MULTI; restore requests go out in the background."""
        try:
            loaded = await self.nearline.prefetch(self.client, keys, now)
        except REDIS_DOWN_ERRORS as e:
            self._mark_down(e)
            return {}
        self.counters["redis_prefetches"] += 1
        out, upkeep, requests = {}, [], []
        for entry, blob in loaded:
            empty = entry.is_empty()
            # Read the hot entry after the await: a write may have created one while the reads were out.
            upkeep += self._install(entry, self.hot.peek(entry.key, now), now)
            if blob is not None:
                upkeep += self._merge_restore(entry, blob, now)
            elif empty and entry.restore_requested is None and self.config.cold_restore:
                entry.restore_requested = now
                requests.append(restore_request_cmd(self.config.key_prefix, *entry.key))
            out[entry.key] = entry
        if requests:
            self.counters["restores_requested"] += len(requests)
            self._spawn(self._write(requests, events=0))
        if upkeep:
            await self._write(upkeep, events=0)
        return out

    def _install(self, loaded: PairMemory, partial: PairMemory | None, now: float) -> list[Command]:
        """Puts a loaded entry in the hot cache, merged with a partial entry built while Redis was out of
        reach (its writes are in Redis or still buffered, in order, so the union is what Redis will hold).
        Returns the commands that bring Redis in line (facts over the cap)."""
        if partial is not None:
            _merge_partial(loaded, partial, self.config.turn_window_max)
        # Facts written by degraded session ends may exceed the cap: apply retention now and delete extras.
        kept, _, evicted = merge_facts(loaded.facts, [], self.config.max_facts, self.nearline.cutoff(now))
        loaded.facts = kept
        self.hot.put(loaded, now)
        return self.nearline.facts_cmds(*loaded.key, [], evicted, now) if evicted else []

    def _merge_restore(self, entry: PairMemory, blob: bytes, now: float) -> list[Command]:
        """Merges a restore blob into the entry (see the module doc for the re-scoring); returns the Redis
        commands that write the restored records and delete the blob."""
        entry.restore_requested = None
        restored = self.nearline.parse_restore(blob, *entry.key) or RestoredMemory()
        self.counters["restores_merged"] += 1
        # A record archived after the request (a session that ended meanwhile) is held already: skip it.
        summaries = restamp(_not_held(restored.summaries, entry.summaries, "summary_id"),
                            self._restore_below(entry.summaries, now))
        emotions = restamp(_not_held(restored.emotions, entry.emotions, "point_id"),
                           self._restore_below(entry.emotions, now))
        cmds = self.nearline.restored_cmds(*entry.key, summaries, emotions, now)
        entry.summaries = _newest_first([*entry.summaries, *summaries])[:self.config.prefetch_summaries]
        entry.emotions = _newest_first([*entry.emotions, *emotions])[:self.config.prefetch_emotion_points]
        return cmds + self._restore_facts(entry, restored.facts, now) + self._restore_cards(entry, restored)

    def _restore_below(self, held: Sequence, now: float) -> float:
        """Window time below which restored records go: the oldest held record's (or now), kept at least 1 s
        inside the window (room for a thousand RESTORE_SPACING_S steps; a blob holds a few dozen records)."""
        below = min([now, *(r.window_ts for r in held)])
        return max(below, self.nearline.cutoff(now) + 1.0)

    def _restore_facts(self, entry: PairMemory, facts: Sequence[Fact], now: float) -> list[Command]:
        # Held facts come last, so a held fact wins over a restored one of the same text.
        restored = restamp(facts, self._restore_below(entry.facts, now))
        kept, _, evicted = merge_facts([*restored, *entry.facts], [], self.config.max_facts,
                                       self.nearline.cutoff(now))
        restored_ids = {f.fact_id for f in restored}
        added = [f for f in kept if f.fact_id in restored_ids]
        dropped = [f for f in evicted if f.fact_id not in restored_ids]  # held facts the restored outrank
        entry.facts = kept
        return self.nearline.facts_cmds(*entry.key, added, dropped, now) if added or dropped else []

    def _restore_cards(self, entry: PairMemory, restored: RestoredMemory) -> list[Command]:
        cmds: list[Command] = []
        if entry.relationship is None and restored.relationship is not None:
            entry.relationship = restored.relationship
            cmds += self._restored_card_cmds(restored.relationship)
        if entry.quest is None and restored.quest is not None:
            entry.quest = restored.quest
            cmds += self._restored_card_cmds(restored.quest)
        return cmds

    def _restored_card_cmds(self, card: Card) -> list[Command]:
        # A card over today's limit (a lowered max_card_bytes) stays in the hot entry only.
        try:
            data = serialize_card(card, self.config.max_card_bytes)
        except CardTooLarge as e:
            log.warning("restored card not written back to Redis: %s", e)
            return []
        return self.nearline.card_cmds(card, data, only_new=True)

    def _degraded_entry(self, key: PairKey, now: float) -> PairMemory:
        entry = self.hot.peek(key, now)
        if entry is None:
            entry = PairMemory(*key, loaded=False)
            self.hot.put(entry, now)
        return entry

    async def _loaded_entry(self, npc_id: str, player_id: str) -> PairMemory:
        """The pair's hot entry with its Redis state known (loading it on a miss); MemoryUnavailable when
        Redis is down and the hot cache does not know the cards."""
        await self.prefetch(npc_id, player_id)
        entry = self.hot.get((npc_id, player_id), self.clock())
        if entry is None or not entry.loaded:
            raise MemoryUnavailable(f"memory of npc {npc_id!r} x player {player_id!r} is not in the hot "
                                    "cache and Redis is unreachable; retry when Redis is back")
        return entry

    def _entry(self, npc_id: str, player_id: str, now: float) -> PairMemory:
        """The hot entry, or a new partial one: writes never wait for a read."""
        _check_pair(npc_id, player_id)
        entry = self.hot.get((npc_id, player_id), now)
        if entry is None:
            entry = PairMemory(npc_id, player_id, loaded=False)
            self.hot.put(entry, now)
        return entry

    # -------------------------------------------------------------------------------------------- writes

    async def record_turn(self, npc_id: str, player_id: str, speaker: str, text: str, *,
                          valence: float | None = None, arousal: float | None = None) -> Turn:
        """Appends a turn to the pair's window (hot + Redis, compacted 20 -> 12) and to the outbox."""
        if isinstance(text, str) and len(text) > self.config.max_turn_chars:
            raise ValueError(f"text: {len(text)} characters, more than max_turn_chars "
                             f"({self.config.max_turn_chars})")
        if isinstance(text, str) and "\x00" in text:  # refused here rather than dead-lettered by the archiver
            raise ValueError("text: contains NUL (U+0000), which the PostgreSQL archive cannot store")
        now = self.clock()
        entry = self._entry(npc_id, player_id, now)
        session_id = entry.session_id or new_id()
        seq = entry.turns[-1].seq + 1 if entry.turns and entry.session_id else 0
        turn = Turn(speaker, text, now, session_id, seq=seq, valence=valence, arousal=arousal)
        entry.session_id = session_id
        compacted = entry.append_turn(turn, self.config.turn_window_max, self.config.turn_window_min)
        if compacted:
            # The summary at session end sees the window only: keep what compacted turns said that matters.
            found = fact_candidates(compacted, now, self.config.max_facts)
            entry.candidates = select_candidates([*entry.candidates, *found], self.config.max_facts)
        event = OutboxEvent("turn", npc_id, player_id, now, turn.to_dict(), event_id=turn.turn_id)
        cmds = self.nearline.turn_cmds(npc_id, player_id, turn, compacted, now)
        await self._write([*cmds, self.nearline.outbox_cmd(event)], events=1)
        return turn

    async def put_card(self, card: Card) -> None:
        """Stores a card as given (hot + Redis + outbox); CardTooLarge before anything is written."""
        data = serialize_card(card, self.config.max_card_bytes)
        now = self.clock()
        entry = self._entry(card.npc_id, card.player_id, now)
        if isinstance(card, RelationshipCard):
            entry.relationship = card
        else:
            entry.quest = card
        event = self.nearline.outbox_cmd(self._card_event(card, now))
        touch = self.nearline.touch_cmds(card.npc_id, card.player_id)
        await self._write([*self.nearline.card_cmds(card, data), *touch, event], events=1)

    async def apply_event(self, npc_id: str, player_id: str, event: GameEvent | Mapping) -> EventOutcome:
        """Applies a game event: card transitions, a salient fact, an emotion point; all written in one
        MULTI with their outbox events. CardTooLarge (nothing written) when a card would outgrow the limit."""
        event = event if isinstance(event, GameEvent) else GameEvent.from_dict(event)
        entry = await self._loaded_entry(npc_id, player_id)
        now = self.clock()
        trust, affinity, importance, valence, arousal = GAME_EVENT_EFFECTS[event.type]
        old_relationship = entry.relationship or RelationshipCard(npc_id, player_id)
        old_quest = entry.quest or QuestCard(npc_id, player_id)
        relationship, quest, fact_text = apply_game_event(old_relationship, old_quest, event, now,
                                                          (trust, affinity))
        changed = [relationship] + ([quest] if quest is not old_quest else [])
        blobs = [serialize_card(card, self.config.max_card_bytes) for card in changed]  # raises before writes
        fact = Fact(fact_text, importance, now, source=event.type)
        point = EmotionPoint(valence, arousal, now, source=event.type)
        cmds = [c for card, data in zip(changed, blobs) for c in self.nearline.card_cmds(card, data)]
        cmds += self._learn(entry, [fact], now)[0] + self._emotion_cmds(entry, point, now)
        cmds += self.nearline.touch_cmds(npc_id, player_id)
        payload = {"event": event.to_dict(), "fact_id": fact.fact_id}
        events = [OutboxEvent("event", npc_id, player_id, now, payload),
                  *[self._card_event(card, now) for card in changed],
                  OutboxEvent("fact", npc_id, player_id, now, fact.to_dict()),
                  OutboxEvent("emotion", npc_id, player_id, now, point.to_dict())]
        entry.relationship, entry.quest = relationship, quest
        await self._write(cmds + [self.nearline.outbox_cmd(e) for e in events], events=len(events))
        return EventOutcome(relationship, quest, fact, point)

    async def end_session(self, npc_id: str, player_id: str) -> SessionOutcome:
        """Folds the open session's turns into a summary (the worker's when `summarize` is set, else
        extractive), salient facts and an emotion point; clears the turn window. The turns are detached
        before the summary is awaited, so turns of a session that starts meanwhile are kept."""
        await self.prefetch(npc_id, player_id)  # a hot miss loads the open session's turns from Redis
        now = self.clock()
        entry = self._entry(npc_id, player_id, now)
        turns, earlier = entry.turns, entry.candidates
        entry.turns, entry.candidates, entry.session_id = [], [], None
        if not turns:
            return SessionOutcome(None, "none", (), (), None)
        c = self.config
        text, method = await summarize_session(turns, c.summary_min_chars, c.summary_max_chars,
                                               self.summarize, c.summarize_timeout_s)
        summary = Summary(text, now, turns[-1].session_id, session_length(turns), method=method)
        candidates = select_candidates([*fact_candidates(turns, now, c.max_facts), *earlier], c.max_facts)
        point = session_emotion(turns, now)
        learn_cmds, added, evicted = self._learn(entry, candidates, now)
        nearline = self.nearline
        cmds = [*nearline.summary_cmds(npc_id, player_id, summary, now), *learn_cmds,
                *self._emotion_cmds(entry, point, now), *nearline.drop_turns_cmds(npc_id, player_id, turns),
                *nearline.touch_cmds(npc_id, player_id)]
        entry.summaries = [summary, *entry.summaries][:c.prefetch_summaries]
        events = [OutboxEvent("summary", npc_id, player_id, now, summary.to_dict()),
                  *[OutboxEvent("fact", npc_id, player_id, now, f.to_dict()) for f in candidates],
                  OutboxEvent("emotion", npc_id, player_id, now, point.to_dict())]
        await self._write(cmds + [self.nearline.outbox_cmd(e) for e in events], events=len(events))
        return SessionOutcome(text, method, tuple(added), tuple(evicted), point)

    def _learn(self, entry: PairMemory, facts: Sequence[Fact],
               now: float) -> tuple[list[Command], list[Fact], list[Fact]]:
        """Merges facts into the entry's retained set: (Redis commands, facts added, facts evicted)."""
        cutoff = self.nearline.cutoff(now)
        kept, added, evicted = merge_facts(entry.facts, facts, self.config.max_facts, cutoff)
        entry.facts = kept
        return self.nearline.facts_cmds(entry.npc_id, entry.player_id, added, evicted, now), added, evicted

    def _emotion_cmds(self, entry: PairMemory, point: EmotionPoint, now: float) -> list[Command]:
        entry.emotions = [point, *entry.emotions][:self.config.prefetch_emotion_points]
        return self.nearline.emotion_cmds(entry.npc_id, entry.player_id, point, now)

    def _card_event(self, card: Card, now: float) -> OutboxEvent:
        payload = {"card_type": card.CARD_TYPE, "card": card_to_dict(card)}
        return OutboxEvent("card", card.npc_id, card.player_id, now, payload)

    # ------------------------------------------------------------------------------- Redis, outage buffer

    async def _write(self, cmds: list[Command], events: int) -> bool:
        """Runs one write batch as a MULTI; buffers it while Redis is down. True when it reached Redis now."""
        batch = _Write(cmds, events)
        if not self._down and not self._buffer:
            try:
                await self._execute([batch])
                return True
            except REDIS_DOWN_ERRORS as e:
                self._mark_down(e)
        self._enqueue(batch)
        return False

    async def _execute(self, batches: Sequence[_Write]) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            for batch in batches:
                for cmd in batch.cmds:
                    pipe.execute_command(*cmd)
            await pipe.execute()

    def _enqueue(self, batch: _Write) -> None:
        self._buffer.append(batch)
        self._drop_overflow()
        self._ensure_flusher()

    def _drop_overflow(self) -> None:
        # Dropping the oldest keeps the newest state (cards, window) for when Redis returns; the archive
        # loses these events for good, hence the counters and the log line.
        while len(self._buffer) > self.config.buffer_max_writes:
            dropped = self._buffer.popleft()
            self.counters["dropped_writes"] += 1
            self.counters["dropped_events"] += dropped.events
            if self.counters["dropped_writes"] == 1 or self.counters["dropped_writes"] % 1000 == 0:
                log.error("Redis outage buffer full (%d writes): dropped %d writes / %d outbox events so far",
                          self.config.buffer_max_writes, self.counters["dropped_writes"],
                          self.counters["dropped_events"])

    def _mark_down(self, error: BaseException) -> None:
        self.counters["redis_errors"] += 1
        if not self._down:
            log.warning("Redis unreachable (%r): serving from the hot cache, buffering writes", error)
        self._down = True
        self._ensure_flusher()

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while not await self.flush():
            await asyncio.sleep(self.config.retry_interval_s)

    async def flush(self) -> bool:
        """Tries to drain the buffer in order (chunks of flush_chunk writes per MULTI). True once Redis
        answered and the buffer is empty, which is when Redis counts as up again."""
        try:
            if not self._buffer:
                await self.client.ping()
            while self._buffer:
                size = min(self.config.flush_chunk, len(self._buffer))
                chunk = [self._buffer.popleft() for _ in range(size)]
                try:
                    await self._execute(chunk)
                except REDIS_DOWN_ERRORS:
                    self._buffer.extendleft(reversed(chunk))  # back in front, order kept
                    self._drop_overflow()
                    raise
                except ResponseError as e:
                    # MULTI has no rollback: the chunk's other commands ran. A bad command is a bug; say so.
                    self.counters["write_errors"] += 1
                    log.error("a buffered write failed in Redis (%s); its chunk's other commands ran", e)
                self.counters["flushed_writes"] += len(chunk)
        except REDIS_DOWN_ERRORS as e:
            self.counters["redis_errors"] += 1
            self._down = True
            log.debug("Redis still unreachable: %r", e)
            return False
        if self._down:
            log.warning("Redis is back: buffered writes flushed")
        self._down = False  # no await since the buffer was seen empty: nothing slipped in between
        return True

    def _spawn(self, write) -> None:
        """Runs a write coroutine off the caller's path (it buffers through an outage like any write)."""
        task = asyncio.get_running_loop().create_task(write)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counters["write_errors"] += 1
            log.error("a background write failed: %r", task.exception())

    async def drain(self) -> None:
        """Waits for the background writes started so far (restore requests) to reach Redis or the buffer."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def aclose(self, flush_timeout_s: float = 2.0) -> None:
        """Stops the flusher after one last flush attempt (bounded); the client stays the caller's."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), flush_timeout_s)
        if self._buffer:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flush(), flush_timeout_s)
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._buffer:
            log.error("closing with %d writes (%d outbox events) still buffered: Redis never came back",
                      len(self._buffer), sum(b.events for b in self._buffer))

    @property
    def redis_down(self) -> bool:
        return self._down

    def stats(self) -> dict:
        return {"redis_down": self._down, "buffered_writes": len(self._buffer),
                "buffered_events": sum(b.events for b in self._buffer), **self.counters,
                "corrupt_entries": self.nearline.corrupt_entries, "hot": self.hot.stats()}


# ----------------------------------------------------------------------------------------------- helpers


def _check_pair(npc_id: str, player_id: str) -> None:
    check_id(npc_id, "npc_id")
    check_id(player_id, "player_id")


def _union(first: Sequence, second: Sequence, key: Callable) -> list:
    return list({key(x): x for x in itertools.chain(first, second)}.values())


def _newest_first(records: Sequence) -> list:
    """Newest first by window time: the order of the Redis scores."""
    return sorted(records, key=lambda r: (r.window_ts, r.ts), reverse=True)


def _not_held(records: Sequence, held: Sequence, id_field: str) -> list:
    ids = {getattr(r, id_field) for r in held}
    return [r for r in records if getattr(r, id_field) not in ids]


def _merge_partial(loaded: PairMemory, partial: PairMemory, window: int) -> None:
    turns = _union(loaded.turns, partial.turns, lambda t: t.turn_id)
    loaded.turns = sorted(turns, key=lambda t: (t.ts, t.seq))[-window:]
    loaded.session_id = partial.session_id or loaded.session_id
    loaded.summaries = _newest_first(_union(loaded.summaries, partial.summaries, lambda s: s.summary_id))
    loaded.facts = _union(loaded.facts, partial.facts, lambda f: f.fact_id)
    loaded.emotions = _newest_first(_union(loaded.emotions, partial.emotions, lambda p: p.point_id))
    loaded.candidates = partial.candidates
    loaded.restore_requested = partial.restore_requested
    loaded.relationship = partial.relationship or loaded.relationship
    loaded.quest = partial.quest or loaded.quest


# ---------------------------------------------------------------------------------------------- rendering


def render_memory(context: MemoryContext, facts: Sequence[Fact]) -> str:
    """Relationship card | quest card | salient facts + last session summary | recent turns: the memory
    part of the prompt layout, stable parts first. Deterministic for a given context and fact choice."""
    parts = []
    if context.relationship is not None:
        parts.append(render_relationship(context.relationship))
    if context.quest is not None:
        parts.append(render_quest(context.quest))
    if facts:
        lines = [f"- {f.text} ({time.strftime('%Y-%m-%d', time.gmtime(f.ts))})" for f in facts]
        parts.append("\n".join(["[What I remember about the player]", *lines]))
    if context.summaries:
        parts.append(f"[Last time we spoke]\n{context.summaries[0].text}")
    if context.turns:
        lines = [f"{'Player' if t.speaker == 'player' else 'Me'}: {t.text}" for t in context.turns]
        parts.append("\n".join(["[Recent conversation]", *lines]))
    return "\n\n".join(parts)
