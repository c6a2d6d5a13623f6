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
from memory.nearline import Command, Nearline, merge_facts
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
    (loaded in one round trip) or "degraded" (Redis down: whatever the hot cache had, possibly nothing)."""

    npc_id: str
    player_id: str
    relationship: RelationshipCard | None
    quest: QuestCard | None
    turns: tuple[Turn, ...]  # oldest first
    summaries: tuple[Summary, ...]  # newest first
    facts: tuple[Fact, ...]
    emotions: tuple[EmotionPoint, ...]  # newest first
    source: str


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
        self.counters = dict.fromkeys(("dropped_writes", "dropped_events", "flushed_writes", "write_errors",
                                       "redis_errors", "degraded_prefetches", "redis_prefetches"), 0)

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
        contexts = {key: self._context(e, "hot") for key, e in entries.items() if e is not None and e.loaded}
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

    def _context(self, entry: PairMemory, source: str) -> MemoryContext:
        return MemoryContext(entry.npc_id, entry.player_id, entry.relationship, entry.quest,
                             tuple(entry.turns), tuple(entry.summaries), tuple(entry.facts),
                             tuple(entry.emotions), source)

    async def _load(self, keys: list[PairKey], now: float) -> dict[PairKey, PairMemory]:
        """Loads pairs from Redis into the hot cache (merged with their partial entries); {} when down."""
        try:
            loaded = await self.nearline.prefetch(self.client, keys, now)
        except REDIS_DOWN_ERRORS as e:
            self._mark_down(e)
            return {}
        self.counters["redis_prefetches"] += 1
        out = {}
        for entry in loaded:
            # Read the hot entry after the await: a write may have created one while the reads were out.
            out[entry.key] = await self._install(entry, self.hot.peek(entry.key, now), now)
        return out

    async def _install(self, loaded: PairMemory, partial: PairMemory | None, now: float) -> PairMemory:
        """Puts a loaded entry in the hot cache, merged with a partial entry built while Redis was out of
        reach (its writes are in Redis or still buffered, in order, so the union is what Redis will hold)."""
        if partial is not None:
            _merge_partial(loaded, partial, self.config.turn_window_max)
        # Facts written by degraded session ends may exceed the cap: apply retention now and delete extras.
        kept, _, evicted = merge_facts(loaded.facts, [], self.config.max_facts, self.nearline.cutoff(now))
        loaded.facts = kept
        self.hot.put(loaded, now)
        if evicted:
            await self._write(self.nearline.facts_cmds(*loaded.key, [], evicted, now), events=0)
        return loaded

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
        await self._write([*self.nearline.card_cmds(card, data), event], events=1)

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

    async def aclose(self, flush_timeout_s: float = 2.0) -> None:
        """Stops the flusher after one last flush attempt (bounded); the client stays the caller's."""
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


def _merge_partial(loaded: PairMemory, partial: PairMemory, window: int) -> None:
    turns = _union(loaded.turns, partial.turns, lambda t: t.turn_id)
    loaded.turns = sorted(turns, key=lambda t: (t.ts, t.seq))[-window:]
    loaded.session_id = partial.session_id or loaded.session_id
    loaded.summaries = sorted(_union(loaded.summaries, partial.summaries, lambda s: s.summary_id),
                              key=lambda s: s.ts, reverse=True)
    loaded.facts = _union(loaded.facts, partial.facts, lambda f: f.fact_id)
    loaded.emotions = sorted(_union(loaded.emotions, partial.emotions, lambda p: p.point_id),
                             key=lambda p: p.ts, reverse=True)
    loaded.candidates = partial.candidates
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
