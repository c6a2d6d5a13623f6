"""SchedulerServer: the scheduler process core (asyncio) wiring the policy modules to memory and the worker.

    server = SchedulerServer(SchedulerConfig(), memory, worker, tokenizer, resident=worker_adapters)
    await server.start()                                   # the batch dispatcher task
    server.register_npc("npc-7", "vampire", "nosferatu", position=(0, 0, 0))
    server.update_positions(["npc-7"], np.array([[3.0, 0, 0]]))
    update = await server.tick({"player-1": (0.0, 0.0, 0.0)})   # re-tier; promotion to Gold prefetches
    async for item in server.talk("npc-7", "player-1", "Good evening."):
        if isinstance(item, TalkResult): ...               # last item: text, emotion, degraded, reason
        else: ...                                           # a str chunk of the streamed reply
    result = await server.act("npc-7", ActContext(world, "A player walks in."))   # a validated action
    await server.close()

What it does (the vertical slice of issue 7):
- one NpcActor per NPC (archetype, subfaction, name, adapter stacks per task, tier, a lock): every talk or
  act of an NPC runs under its lock, so an NPC's messages are handled one at a time, in arrival order
  (asyncio.Lock is FIFO);
- tick: TierState over all NPCs at once (numpy); `replying` holds the tier of NPCs in a reply, and a talk
  takes its tier once at its start, so a demotion never cuts a reply in progress; NPCs promoted to Gold
  get their memory prefetched (cards + turns) for the nearest player, in one pipelined round trip, and
  their prompt prefix warmed in the worker (background);
- talk: Gold/Silver build the DESIGN.md prompt from MemoryStore.prefetch's context (tier limits from
  SchedulerConfig), tokenized piece by piece, queued in tier_scheduler.queues (deadlines, shedding), sent
  in batches by the dispatcher, streamed back and detokenized incrementally; Bronze answers with a bark
  (no LLM). Every talk ends with a TalkResult, never with an exception for a missing adapter, a shed
  request or a lost worker: those answer with a bark and `degraded` True plus the reason. The player turn
  and the reply are then recorded with MemoryStore.record_turn;
- act: decoded in the worker under the archetype's JSON-schema grammar (targets limited to the ids of
  the game state sent), validated by tier_scheduler.actions against that game state; any failure gives
  the safe default with the reason. Bronze acts never reach the LLM (safe default, reason says so).

Emotion tag (rule-based, for voice / face): a keyword lexicon over the reply text first; failing a
match, the NPC's newest emotion point towards the player (memory's trajectory: valence / arousal);
failing that "neutral". Bronze: the same lexicon over the bark. Tags: EMOTIONS.

Promotion to Gold also warms the NPC's prompt prefix (persona .. turn window, for the nearest player, on
the stack its talk would use) in the worker's prefix cache, as a background WARM_PREFIX message (it
bypasses the queues' Bronze lane, which has no background work wired yet).

Not here yet (see the closing note of the slice): chains (several adapters
per turn), relationship / quest overrides of tiers, hordes, registry-resolved stacks (stacks are given at
registration, default `<archetype>.<task>`), the game-facing network protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tier_scheduler import actions, barks, prompts
from tier_scheduler.adapters import Availability, choose_stack
from tier_scheduler.config import ARCHETYPES, SchedulerConfig, Tier
from tier_scheduler.queues import Outcome, RequestQueues
from tier_scheduler.queues import Request as QueuedRequest
from tier_scheduler.tiers import TierState, TierUpdate

log = logging.getLogger("npc-scheduler")

EMOTIONS = ("neutral", "happy", "angry", "afraid", "sad", "hungry")
# Checked in this order; the first tag with a word in the text wins (anger before joy: "I'll kill you,
# gladly" is a threat).
_LEXICON: tuple[tuple[str, frozenset[str]], ...] = tuple((tag, frozenset(words.split())) for tag, words in (
    ("angry", "kill die fool foolish kneel rage raaaagh grrraaah roars hiss hate tear burn"),
    ("afraid", "afraid fear run flee help back cower scared don't"),
    ("hungry", "blood hungry meat feed brains braaains fresh fressshh meal sweet"),
    ("sad", "alone sorry lost sigh tiresome dull brief"),
    ("happy", "welcome glad friend thank thanks pleasure delighted smile"),
))
_WORD = re.compile(r"[a-z']+")


@dataclass(frozen=True)
class ServerConfig:
    """The process's own settings (the policy's are in SchedulerConfig)."""

    talk_temperature: float = 0.8
    act_temperature: float = 1.0
    top_p: float = 0.95
    worker_timeout_s: float = 30.0  # longest wait for a submit ack or an act result
    bark_seed: int = 0
    warm_on_promotion: bool = True  # prefill a Gold promotion's prompt prefix in the worker (background)
    default_position: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        for name in ("talk_temperature", "act_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"ServerConfig.{name} must be a finite number >= 0, got {value!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"ServerConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not self.worker_timeout_s > 0:
            raise ValueError(f"ServerConfig.worker_timeout_s must be > 0, got {self.worker_timeout_s!r}")
        if len(self.default_position) != 3:
            raise ValueError(f"ServerConfig.default_position must have 3 coordinates, got "
                             f"{self.default_position!r}")


@dataclass(frozen=True)
class TalkResult:
    """The last item of a talk stream."""

    npc_id: str
    text: str  # the whole reply, on one line
    emotion: str  # one of EMOTIONS
    degraded: bool  # not the full answer: a smaller adapter stack, no memory, or a bark instead of the LLM
    reason: str  # "" when not degraded; else why
    tier: str  # the tier the reply was made at ("gold", "silver", "bronze")
    bark: bool = False  # the text is a bark (Bronze, or a fallback)
    emote: str = ""  # the bark's animation tag
    finish_reason: str = ""  # the worker's ("stop", "length", ...); "" for a bark


@dataclass(frozen=True)
class ActContext:
    """What the game sends with an act: its own game state (the only thing the validator trusts) and a
    short description of the situation for the prompt."""

    world: Mapping[str, actions.Entity]
    situation: str = "Nothing happens."


@dataclass(frozen=True)
class ActResult:
    action: actions.Action
    valid: bool  # the model's action passed validation; False: `action` is the safe default
    reason: str  # why the model's action was rejected (or why no model was asked)
    raw: str = ""  # what the model decoded


@dataclass(eq=False)
class NpcActor:
    """One NPC's state. Touched only by the event loop; `lock` orders its talk / act calls."""

    npc_id: str
    archetype: str
    subfaction: str | None
    name: str
    stacks: dict[str, tuple[str, ...]]  # task -> wanted adapter stack, base first
    tier: Tier = Tier.BRONZE
    replying: int = 0  # talks in progress (a talk holds the lock: 0 or 1)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SchedulerServer:
    def __init__(self, config: SchedulerConfig, memory, worker, tokenizer, *,
                 server_config: ServerConfig | None = None, resident: Collection[str] = ()):
        self.config = config
        self.server_config = server_config or ServerConfig()
        self.memory = memory  # memory.store.MemoryStore
        self.worker = worker  # gpu_worker.client.WorkerClient (connected)
        self.tokenizer = tokenizer  # encode(text) / decode(ids); the worker's model's tokenizer
        self.pieces = prompts.PieceTokenizer(tokenizer)
        self.queues = RequestQueues(config)
        self.tiers = TierState(config, 0)
        self.barks = barks.BarkDecks(self.server_config.bark_seed)
        self._resident = set(resident)
        self._actors: dict[str, NpcActor] = {}
        self._ids: list[str] = []  # row -> NPC id, the order of TierState and _positions
        self._row: dict[str, int] = {}
        self._positions = np.zeros((0, 3), dtype=np.float64)
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.counters = dict.fromkeys(("talks", "acts", "barks", "degraded", "shed", "invalid_actions",
                                       "worker_errors", "prefetches", "warmed"), 0)

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="npc-dispatcher")

    async def close(self) -> None:
        """Stops the dispatcher; queued requests get a "shed" outcome (their talks answer with a bark)."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        self._resolve_outcomes(self.queues.drain("the scheduler is shutting down"))
        for task in list(self._background):
            task.cancel()

    def mark_resident(self, names: Iterable[str], resident: bool = True) -> None:
        """Adapters the worker holds (loaded at its start or by load_adapter): only those are used."""
        (self._resident.update if resident else self._resident.difference_update)(names)

    # ------------------------------------------------------------------------------------ registry

    def register_npc(self, npc_id: str, archetype: str, subfaction: str | None = None, *,
                     position: Sequence[float] | None = None, name: str | None = None,
                     stacks: Mapping[str, Sequence[str]] | None = None) -> NpcActor:
        """A new NPC (Bronze until the next tick). stacks: task -> adapter stack (base first) where it is
        not just `<archetype>.<task>` (e.g. with a subfaction or an NPC delta)."""
        if not isinstance(npc_id, str) or not npc_id or len(npc_id) > actions.MAX_ID_CHARS:
            raise ValueError(f"npc_id: must be a non-empty string of <= {actions.MAX_ID_CHARS} characters, "
                             f"got {npc_id!r}")
        if npc_id in self._actors:
            raise ValueError(f"npc_id: {npc_id!r} is already registered")
        if archetype not in ARCHETYPES:
            raise ValueError(f"archetype: unknown {archetype!r}; expected one of {ARCHETYPES}")
        pos = np.asarray(self.server_config.default_position if position is None else position, float)
        if pos.shape != (3,) or not np.isfinite(pos).all():
            raise ValueError(f"position: expected 3 finite coordinates, got {position!r}")
        given = {task: tuple(stack) for task, stack in (stacks or {}).items()}
        actor = NpcActor(npc_id, archetype, subfaction, name or npc_id, given)
        self._actors[npc_id] = actor
        self._row[npc_id] = len(self._ids)
        self._ids.append(npc_id)
        self._positions = np.vstack([self._positions, pos[None]])
        self.tiers.resize(None, added=1)
        return actor

    def despawn(self, npc_ids: Iterable[str]) -> None:
        """Removes NPCs. A reply in progress finishes (its actor object lives on until it ends)."""
        gone = {npc_id for npc_id in npc_ids if npc_id in self._actors}
        if not gone:
            return
        keep = np.array([row for row, npc_id in enumerate(self._ids) if npc_id not in gone], dtype=np.int64)
        self.tiers.resize(keep)
        self._positions = self._positions[keep]
        self._ids = [self._ids[row] for row in keep]
        self._row = {npc_id: row for row, npc_id in enumerate(self._ids)}
        for npc_id in gone:
            del self._actors[npc_id]
            self.barks.forget(npc_id)

    def update_positions(self, npc_ids: Sequence[str], positions: np.ndarray) -> None:
        """Bulk position update: positions float [len(npc_ids), 3] in meters."""
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != (len(npc_ids), 3):
            raise ValueError(f"positions: expected shape [{len(npc_ids)}, 3], got {list(positions.shape)}")
        if not np.isfinite(positions).all():
            raise ValueError("positions: NaN or infinite coordinates (the game sent a bad position)")
        try:
            rows = np.fromiter((self._row[npc_id] for npc_id in npc_ids), dtype=np.int64, count=len(npc_ids))
        except KeyError as e:
            raise KeyError(f"update_positions: NPC {e.args[0]!r} is not registered") from None
        self._positions[rows] = positions

    def actor(self, npc_id: str) -> NpcActor:
        actor = self._actors.get(npc_id)
        if actor is None:
            raise KeyError(f"NPC {npc_id!r} is not registered")
        return actor

    # ----------------------------------------------------------------------------------------- tick

    async def tick(self, players: Mapping[str, Sequence[float]]) -> TierUpdate:
        """Re-tiers every NPC from the players' positions ({player_id: (x, y, z)}); NPCs promoted to Gold
        get their memory of the nearest player prefetched (one pipelined round trip for all of them)."""
        player_ids = list(players)
        player_pos = np.asarray([players[p] for p in player_ids], dtype=np.float64).reshape(-1, 3)
        replying = np.fromiter((self._actors[i].replying > 0 for i in self._ids), dtype=bool,
                               count=len(self._ids))
        update = self.tiers.tick(self._positions, player_pos, replying=replying)
        for row in np.concatenate([update.promoted, update.demoted]):
            self._actors[self._ids[row]].tier = Tier(int(update.tiers[row]))
        if len(update.promoted_gold) and player_ids:
            await self._prefetch_promoted(update.promoted_gold, player_ids, player_pos)
        return update

    async def _prefetch_promoted(self, rows: np.ndarray, player_ids: list[str],
                                 player_pos: np.ndarray) -> None:
        # A few promotions per tick: a Python loop over them only, the distance rows are [k, P].
        gaps = np.linalg.norm(self._positions[rows][:, None, :] - player_pos[None], axis=2)
        pairs = [(self._ids[row], player_ids[int(j)]) for row, j in zip(rows, gaps.argmin(axis=1))]
        try:
            contexts = await self.memory.prefetch_many(pairs)
            self.counters["prefetches"] += len(pairs)
        except Exception:  # a failed prefetch only costs the first turn a round trip: never fail a tick
            log.exception("prefetch of %d promoted NPCs failed", len(pairs))
            return
        if self.server_config.warm_on_promotion:
            # In the background: a tick must not wait for prefills. The player's first turn then finds
            # persona .. turn window of its own stack in the worker's prefix cache.
            # .get: an NPC may have been despawned while the prefetch was awaited.
            actors = [(self._actors.get(npc_id), c) for (npc_id, _), c in zip(pairs, contexts)]
            prefixes = [self._warm_prefix(actor, c) for actor, c in actors if actor is not None]
            if prefixes:
                self._spawn(self._warm(prefixes))

    def _warm_prefix(self, actor: NpcActor, context) -> tuple[list[int], tuple[str, ...]]:
        """The talk prompt up to the turn window (new_input None) and the stack a talk would use now."""
        prompt = prompts.build_from_context(
            self.config, Tier.GOLD, "talk", context, persona=prompts.PERSONAS[actor.archetype],
            identity=prompts.render_identity(actor.name, actor.archetype, actor.subfaction), new_input=None,
            facts=context.facts[:self.memory.config.prompt_facts])
        choice = choose_stack(self._stack(actor, "dialogue_style"), Availability(resident=self._resident))
        return self.pieces.encode(prompt), choice.adapters

    async def _warm(self, prefixes: list[tuple[list[int], tuple[str, ...]]]) -> None:
        try:
            await self.worker.warm_prefix(prefixes, timeout_s=self.server_config.worker_timeout_s)
            self.counters["warmed"] += len(prefixes)
        except Exception as e:  # only a cache miss later: log, never fail
            self.counters["worker_errors"] += 1
            log.warning("prefix warm-up of %d NPCs failed: %s", len(prefixes), e)

    # ----------------------------------------------------------------------------------------- talk

    async def talk(self, npc_id: str, player_id: str, text: str) -> AsyncIterator[str | TalkResult]:
        """Streams the reply: str chunks, then one TalkResult (always, see the module doc).

        Hazards: an async generator, so KeyError (unknown NPC) and ValueError (bad input) come at the
        first `anext`; it holds the NPC's lock until it ends, so a caller must read it to the end or
        close it (`aclose`, or leave an `async for`): a reply abandoned midway is aborted in the worker
        and not recorded."""
        actor = self.actor(npc_id)
        prompts.input_pieces("talk", text, self.config.max_input_chars)  # reject bad input before queuing
        async with actor.lock:
            actor.replying += 1
            tier = actor.tier  # fixed for the whole reply: a demotion meanwhile applies from the next turn
            try:
                self.counters["talks"] += 1
                if tier == Tier.BRONZE:
                    result = self._bark_result(actor, "idle", "", tier)
                    yield result.text
                else:
                    result = None
                    # aclosing: when the caller stops reading mid-reply, the inner generator's finally
                    # (which aborts the worker request) runs now, not whenever it is garbage collected.
                    async with contextlib.aclosing(self._llm_talk(actor, player_id, text, tier)) as replies:
                        async for item in replies:
                            if isinstance(item, TalkResult):
                                result = item
                            else:
                                yield item
                    if result.bark:  # a fallback: the bark is the reply, stream it as one chunk
                        yield result.text
                self.counters["degraded"] += result.degraded
                await self._record(actor, player_id, text, result.text)
                yield result
            finally:
                actor.replying -= 1

    async def _llm_talk(self, actor: NpcActor, player_id: str, text: str,
                        tier: Tier) -> AsyncIterator[str | TalkResult]:
        context = await self.memory.prefetch(actor.npc_id, player_id)
        prompt = prompts.build_from_context(
            self.config, tier, "talk", context, persona=prompts.PERSONAS[actor.archetype],
            identity=prompts.render_identity(actor.name, actor.archetype, actor.subfaction), new_input=text,
            facts=context.facts[:self.memory.config.prompt_facts])
        ids = self.pieces.encode(prompt)
        choice = choose_stack(self._stack(actor, "dialogue_style"), Availability(resident=self._resident))
        reasons = [r for r in (choice.reason, _memory_reason(context)) if r]
        params = _sampling(self.server_config, self.config.max_new_tokens(tier, "talk"),
                           self.server_config.talk_temperature, stop=("\n",))
        request = _worker_request(ids, choice.adapters, params, self._request_id(actor, "talk"))
        stream = await self._enqueue(actor, tier, "talk", request, len(ids))
        if isinstance(stream, str):  # shed / expired / refused / worker error: answer with a bark
            yield self._bark_result(actor, "alert", stream, tier)
            return
        decoder = StreamDecoder(self.tokenizer)
        finish = ""
        try:
            async for delta in stream:
                if delta.token_id is not None:
                    chunk = decoder.push(delta.token_id)
                    if chunk:
                        yield chunk
                finish = delta.finish_reason or finish
        except Exception as e:  # WorkerLost, an idle timeout, a rejected request
            self.counters["worker_errors"] += 1
            reasons.append(f"the reply broke off: {e}")
        finally:
            if not stream.done:  # the caller stopped reading (or we failed): free the worker's slot
                with contextlib.suppress(Exception):
                    await self.worker.abort([stream.request_id])
        reply = prompts.one_line(decoder.text)
        if not reply:
            yield self._bark_result(actor, "idle", "; ".join([*reasons, "the model returned an empty reply"]),
                                    tier)
            return
        yield TalkResult(actor.npc_id, reply, emotion_tag(reply, context.emotions), bool(reasons),
                         "; ".join(reasons), tier.name.lower(), finish_reason=finish)

    def _bark_result(self, actor: NpcActor, situation: str, reason: str, tier: Tier) -> TalkResult:
        bark = self.barks.next(actor.npc_id, actor.archetype, situation)
        self.counters["barks"] += 1
        # A Bronze NPC's bark is its full answer; a bark standing in for the LLM is a degraded one.
        return TalkResult(actor.npc_id, bark.text, emotion_tag(bark.text, ()), bool(reason), reason,
                          tier.name.lower(), bark=True, emote=bark.emote)

    async def _record(self, actor: NpcActor, player_id: str, text: str, reply: str) -> None:
        # Memory failures are the store's own business (it buffers through a Redis outage); an error here
        # (e.g. a too-long reply) must not turn a delivered reply into a failed talk.
        try:
            await self.memory.record_turn(actor.npc_id, player_id, "player", text)
            await self.memory.record_turn(actor.npc_id, player_id, "npc", reply)
        except Exception:
            log.exception("recording the turn of %s with %s failed", actor.npc_id, player_id)

    # ------------------------------------------------------------------------------------------ act

    async def act(self, npc_id: str, context: ActContext | Mapping) -> ActResult:
        """One validated action (see the module doc); never raises for a bad model output."""
        actor = self.actor(npc_id)
        if not isinstance(context, ActContext):
            context = ActContext(dict(context["world"]), context.get("situation", "Nothing happens."))
        world = context.world
        async with actor.lock:
            self.counters["acts"] += 1
            tier = actor.tier
            if tier == Tier.BRONZE:
                return ActResult(actions.safe_default(npc_id, world), False,
                                 "Bronze NPC: no LLM call on the hot path")
            raw, why = await self._decode_action(actor, tier, context)
            if why:
                return ActResult(actions.safe_default(npc_id, world), False, why, raw)
            action, reason = actions.action_or_default(npc_id, raw, world)
            self.counters["invalid_actions"] += bool(reason)
            return ActResult(action, not reason, reason, raw)

    async def _decode_action(self, actor: NpcActor, tier: Tier, context: ActContext) -> tuple[str, str]:
        """(decoded text, "") or ("" or partial text, why there is no usable output)."""
        from gpu_worker.grammar import Grammar  # torch: only a process that talks to a worker needs it

        targets = [entity_id for entity_id in context.world if entity_id != actor.npc_id]
        grammar = Grammar.from_json_schema(actions.action_schema(actor.archetype, targets))
        prompt = prompts.build_prompt(
            self.config, tier, "act", persona=prompts.PERSONAS[actor.archetype],
            identity=prompts.render_identity(actor.name, actor.archetype, actor.subfaction),
            new_input=context.situation)
        ids = self.pieces.encode(prompt)
        choice = choose_stack(self._stack(actor, "action_policy"), Availability(resident=self._resident))
        params = _sampling(self.server_config, self.config.max_new_tokens(tier, "act"),
                           self.server_config.act_temperature)
        request = _worker_request(ids, choice.adapters, params, self._request_id(actor, "act"), grammar)
        stream = await self._enqueue(actor, tier, "act", request, len(ids))
        if isinstance(stream, str):
            return "", stream
        try:
            result = await stream.result(self.server_config.worker_timeout_s)
        except Exception as e:
            self.counters["worker_errors"] += 1
            return "", f"the worker failed: {e}"
        raw = self.tokenizer.decode(list(result.steps[0].token_ids), skip_special_tokens=True)
        if result.finish_reason not in ("stop",):
            return raw, f"decoding ended with {result.finish_reason!r} before the action was complete"
        return raw, ""

    # ------------------------------------------------------------------------------------- queueing

    async def _enqueue(self, actor: NpcActor, tier: Tier, kind: str, request, tokens: int):
        """Queues a worker request; returns its RequestStream once a batch carried it, or the reason it
        never ran (an explicit outcome of the queues, or the worker refusing the batch)."""
        future = asyncio.get_running_loop().create_future()
        queued = QueuedRequest(request.request_id, actor.npc_id, tier, kind, tokens,
                               payload=(request, future))
        self._resolve_outcomes(self.queues.push(queued, time.monotonic()))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            self.queues.cancel(request.request_id)  # the caller went away before the batch left
            raise

    def _resolve_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.counters["shed"] += 1
            future = outcome.request.payload[1]
            if not future.done():
                future.set_result(f"{outcome.status}: {outcome.reason}")

    async def _dispatch_loop(self) -> None:
        """Waits for the batching window of tier_scheduler.queues, then submits one batch (Gold first)."""
        while True:
            wait = self.queues.wait_s(time.monotonic())
            if wait is None or wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            batch = self.queues.next_batch(time.monotonic())
            self._resolve_outcomes(batch.dropped)
            if batch.requests:
                await self._submit(batch.requests)

    async def _submit(self, requests: list[QueuedRequest]) -> None:
        try:
            streams = await self.worker.submit([r.payload[0] for r in requests],
                                               timeout_s=self.server_config.worker_timeout_s)
        except Exception as e:  # the whole batch refused, or the worker is gone: every request answers
            self.counters["worker_errors"] += 1
            for r in requests:
                if not r.payload[1].done():
                    r.payload[1].set_result(f"worker error: {e}")
            return
        for r, stream in zip(requests, streams):
            if not r.payload[1].done():
                r.payload[1].set_result(stream)
            else:  # its caller was cancelled meanwhile
                self._spawn(self.worker.abort([stream.request_id]))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------------------------------- misc

    def _stack(self, actor: NpcActor, task: str) -> tuple[str, ...]:
        return actor.stacks.get(task, (f"{actor.archetype}.{task}",))

    def _request_id(self, actor: NpcActor, kind: str) -> str:
        # Unique per process (the worker refuses a duplicate in flight); printable ASCII, no spaces.
        return f"{kind}-{next(self._seq)}-{actor.npc_id}"[:128].replace(" ", "_")

    def stats(self) -> dict:
        return {**self.counters, "npcs": len(self._ids), "tiers": _tier_counts(self.tiers.tiers),
                "queues": {**self.queues.counters, **self.queues.lane_sizes()},
                "prompt_pieces": {"hits": self.pieces.hits, "misses": self.pieces.misses},
                "memory": self.memory.stats()}


# ------------------------------------------------------------------------------------------- helpers


class StreamDecoder:
    """Incremental detokenization: decodes the ids so far and emits the new suffix, holding it back while
    it ends in U+FFFD (a UTF-8 character split across tokens), cutting at the first newline (the prompt
    layout keeps a reply on one line; the worker stops there too) and dropping control characters (a
    byte-level vocabulary can sample NUL, which ends a C string in the game and which the archive refuses)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.closed = False

    def push(self, token_id: int) -> str:
        if self.closed:
            return ""
        self.ids.append(int(token_id))
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""
        if "\n" in full:
            full, self.closed = full.split("\n", 1)[0], True
        full = prompts.drop_control_chars(full)
        if not self.text and not full.strip():
            return ""  # the leading space after "Me:" alone is not worth a chunk
        chunk = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full if full.startswith(self.text) else self.text
        return chunk


def emotion_tag(text: str, emotions: Sequence = ()) -> str:
    """Rule-based tag (see the module doc): lexicon over the text, else the newest emotion point."""
    words = set(_WORD.findall(text.lower()))
    for tag, lexicon in _LEXICON:
        if words & lexicon:
            return tag
    if emotions:
        point = emotions[0]  # newest first
        if point.valence <= -0.3:
            return "angry" if point.arousal >= 0.5 else "sad"
        if point.valence >= 0.3:
            return "happy"
    return "neutral"


def _memory_reason(context) -> str:
    return "memory unavailable (Redis down): replied without it" if context.source == "degraded" else ""


def _sampling(server_config: ServerConfig, max_tokens: int, temperature: float, stop: tuple[str, ...] = ()):
    from gpu_worker.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=server_config.top_p,
                          stop=stop)


def _worker_request(ids: list[int], adapters: tuple[str, ...], params, request_id: str, grammar=None):
    from gpu_worker.request import Request

    return Request(prompt=ids, adapters=adapters, params=params, request_id=request_id, grammar=grammar)


def _tier_counts(tiers: np.ndarray) -> dict[str, int]:
    counts = np.bincount(tiers, minlength=3) if len(tiers) else np.zeros(3, dtype=np.int64)
    return {tier.name.lower(): int(counts[tier]) for tier in Tier}
