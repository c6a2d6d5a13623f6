"""SchedulerServer: the scheduler process core (asyncio) wiring the policy modules to memory and the worker.

    server = SchedulerServer(SchedulerConfig(), memory, worker, tokenizer, resident=worker_adapters,
                             registry=adapter_registry)    # registry: optional (AdapterRegistry)
    await server.start()                                   # the batch dispatcher task
    server.register_npc("npc-7", "vampire", "nosferatu", position=(0, 0, 0))
    server.set_override("npc-7", forced="gold", relationship=62.0)   # floors of its tier; None clears
    server.update_positions(["npc-7"], np.array([[3.0, 0, 0]]))
    update = await server.tick({"player-1": (0.0, 0.0, 0.0)})   # re-tier; promotion to Gold prefetches
    async for item in server.talk("npc-7", "player-1", "Good evening."):
        if isinstance(item, TalkResult): ...               # last item: text, emotion, degraded, reason
        else: ...                                           # a str chunk of the streamed reply
    result = await server.act("npc-7", ActContext(world, "A player walks in."))   # a validated action
    server.hordes()                                        # {horde id: (leader id, member ids)}, per tick
    results = await server.act_horde(leader_id, ActContext(world, "..."))  # {member id: ActResult}
    await server.close()

What it does:
- one NpcActor per NPC (archetype, subfaction, name, adapter stacks per task, tier, a lock): every talk or
  act of an NPC runs under its lock, so an NPC's messages are handled one at a time, in arrival order
  (asyncio.Lock is FIFO);
- tick: TierState over all NPCs at once (numpy); `replying` holds the tier of NPCs in a reply, and a talk
  takes its tier once at its start, so a demotion never cuts a reply in progress; NPCs promoted to Gold
  get their memory prefetched (cards + turns) for the nearest player, in one pipelined round trip, and
  their prompt prefix warmed in the worker (background);
- session summaries: unless told otherwise (ServerConfig.worker_summaries) the server makes the memory
  store's end_session summaries the worker's: one "summary" request in the Bronze lane on the base model
  (summarize_turns); when it is shed, expires or fails, the store writes its extractive summary instead;
- talk: Gold/Silver build the DESIGN.md prompt from MemoryStore.prefetch's context (tier limits from
  SchedulerConfig), tokenized piece by piece, queued in tier_scheduler.queues (deadlines, shedding), sent
  in batches by the dispatcher, streamed back and detokenized incrementally; Bronze answers with a bark
  (no LLM). Every talk ends with a TalkResult, never with an exception for a missing adapter, a shed
  request or a lost worker: those answer with a bark and `degraded` True plus the reason. The player turn
  and the reply are then recorded with MemoryStore.record_turn;
- act: decoded in the worker under the archetype's JSON-schema grammar (targets limited to the ids of
  the game state sent), validated by tier_scheduler.actions against that game state; any failure gives
  the safe default with the reason. Bronze acts never reach the LLM (safe default, reason says so).

Tier overrides (`set_override`): a quest flag (`forced`, a Tier or its name) keeps an NPC at least at that
tier, a relationship score (-100..100, e.g. max of trust and affinity of its relationship card: the game
reads the card and sets the score, nothing here derives it) >= SchedulerConfig.keep_silver_score keeps it
at least Silver. Both persist for the NPC's registration (despawn forgets them) until set again; None
clears one, leaving the argument out keeps it. They are floors applied at the next tick (tiers.py rule 2):
clearing one lets distance and its hysteresis decide again from the next tick on.

Hordes: each tick clusters the zombie NPCs (tier_scheduler.hordes.cluster_hordes on their 3-D positions,
ServerConfig.horde_cell_m / horde_min_size); `hordes()` gives the last tick's, ids valid until the next
tick. `act_horde(leader, context)` (the leader's id, any member's id, or the horde id) makes ONE
action_policy decision for the leader, through the same worker / grammar / validation path as `act`, at
the best tier of the horde's members (Bronze everywhere: the leader's safe default, no LLM), under the
leader's lock; hordes.fan_out spreads it over the members (per-member variation, each validated against the
game state sent: a member missing from it idles). Every member's ActResult carries the decision's `valid`,
`reason` and `raw`. `follow_horde` needs the member's `horde_id` set in that game state (the validator
trusts only the game's own). A zombie in a horde may still `act` alone, as any NPC.

Chains (ServerConfig.talk_chain, on by default): a Gold talk whose NPC has its emotional_response stack
available (every adapter of it resident, not degraded) runs as one 2-step worker chain, in ONE worker
request: step 1 on the emotional_response stack reads the talk prompt up to the player's line, then
EMOTION_CUE, and answers one word of EMOTIONS (EBNF grammar); step 2 on the dialogue_style stack gets the
same prompt, EMOTION_CUE, step 1's output (OutputRef), a newline and the talk cue, and its deltas alone
stream to the game. The TalkResult's emotion is step 1's word. Silver talks, and NPCs without that stack,
run today's single step (not degraded for lacking the chain). The chain costs the next turn's prefix cache
the short emotion line (the turn window renders the reply right after the player's line).

Adapter stacks: given at registration (`stacks=`, task -> stack, base first) win; else, with a `registry`
(gpu_worker.lora.registry.AdapterRegistry), `registry.resolve_stack(npc_id, task)` (task adapter,
subfaction delta, NPC delta: one round trip), cached on the NPC's actor per task, re-resolved on
register_npc (background) and `refresh_stacks`; else `<archetype>.<task>`. A resolve never fails a turn:
UnknownNPC (no profile: set with registry.set_npc) or a registry error (e.g. Redis down, timeout
registry_timeout_s) keeps only `<archetype>.<task>` (its deltas dropped), UnknownAdapter (the task adapter
is not registered) the base model alone; the reply is degraded with the reason, and the failure is retried
after registry_retry_s. Then tier_scheduler.adapters.choose_stack keeps the best resident stack (dropping
the NPC delta, then the subfaction delta, then down to the base model); with `load_registered`, resolved
adapters that are registered but not resident are loaded into the worker in the background (from the
record's path) and used from the turn after their load.

Emotion tag (rule-based, for voice / face, when no chain named one): a keyword lexicon over the reply text
first; failing a match, the NPC's newest emotion point towards the player (memory's trajectory: valence /
arousal); failing that "neutral". Bronze: the same lexicon over the bark. Tags: EMOTIONS.

Promotion to Gold also warms the NPC's prompt prefix (persona .. turn window, for the nearest player, on
the stack its talk would use, and on its emotional_response stack when its talk would chain) in the
worker's prefix cache, as a background WARM_PREFIX message (it bypasses the queues' Bronze lane, which has
no background work wired yet).

Not here yet: the game-facing network protocol (plugin_bindings calls this object in process).
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
from dataclasses import dataclass, field, replace
from types import EllipsisType

import numpy as np

from memory.retrieval import retrieve_facts
from tier_scheduler import actions, barks, prompts
from tier_scheduler.adapters import Availability, StackChoice, choose_stack
from tier_scheduler.config import ARCHETYPES, SchedulerConfig, Tier
from tier_scheduler.hordes import Horde, cluster_hordes, fan_out
from tier_scheduler.queues import Outcome, RequestQueues
from tier_scheduler.queues import Request as QueuedRequest
from tier_scheduler.tiers import NO_OVERRIDE, TierState, TierUpdate

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

EMOTION_CUE = "My feeling:"  # a chain's step 1 answers " <one of EMOTIONS>" after it
# Step 1's grammar: one emotion word. Its max_tokens is the longest alternative in bytes: every token is at
# least one byte, so no tokenization of an alternative can be cut short.
EMOTION_EBNF = "root ::= " + " | ".join(f'" {tag}"' for tag in EMOTIONS)
EMOTION_MAX_TOKENS = max(len(f" {tag}".encode()) for tag in EMOTIONS)
RELATIONSHIP_RANGE = (-100.0, 100.0)  # relationship scores (trust / affinity on the cards)
STACK_TASKS = ("dialogue_style", "emotional_response", "action_policy")  # the tasks this server runs


MAX_SESSION_FACTS = 64  # players per NPC whose session facts are kept (LRU)


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
    talk_chain: bool = True  # Gold talks chain emotional_response -> dialogue_style (that stack resident)
    # Hordes (tier_scheduler.hordes): grid cell and smallest group, fan-out spread and variation.
    horde_cell_m: float = 8.0
    horde_min_size: int = 3
    horde_spread_m: float = 1.5
    horde_variant_rate: float = 0.15
    horde_ground_axes: tuple[int, ...] = (0, 1)  # the axes fan-out offsets move along (y-up games: (0, 2))
    horde_seed: int = 0
    # Registry-resolved stacks (with a registry): wait for a resolve at most this long; retry a failed one
    # after registry_retry_s; load registered but not resident adapters into the worker in the background.
    registry_timeout_s: float = 1.0
    registry_retry_s: float = 5.0
    load_registered: bool = True
    # Session summaries by the worker: the memory store's end_session asks for one low-priority "summary"
    # request (base model, no adapters; the Bronze lane, first shed under load) unless the store already
    # has a summarizer; without an answer in time it falls back to its extractive summary.
    worker_summaries: bool = True
    summary_temperature: float = 0.3
    summary_timeout_s: float = 10.0  # queue + generation; later, the store's extractive summary is written

    def __post_init__(self):
        for name in ("talk_temperature", "act_temperature", "summary_temperature"):
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
        for name in ("horde_cell_m", "registry_timeout_s", "registry_retry_s", "summary_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"ServerConfig.{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.horde_min_size, int) and self.horde_min_size >= 1):
            raise ValueError(f"ServerConfig.horde_min_size must be an int >= 1, got {self.horde_min_size!r}")
        if not 0 <= self.horde_variant_rate <= 1 or not self.horde_spread_m >= 0:
            raise ValueError(f"ServerConfig.horde_variant_rate must be in [0, 1] and horde_spread_m >= 0, "
                             f"got {self.horde_variant_rate!r}, {self.horde_spread_m!r}")
        if not self.horde_ground_axes or not set(self.horde_ground_axes) <= {0, 1, 2}:
            raise ValueError(f"ServerConfig.horde_ground_axes must be axes among 0, 1, 2, got "
                             f"{self.horde_ground_axes!r}")


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
    resolved: dict[str, ResolvedStack] = field(default_factory=dict)  # task -> the registry's answer
    # player -> (session id or None before its first turn, the facts its prompts show): see _session_facts
    session_facts: dict[str, tuple[str | None, tuple]] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedStack:
    """What the registry said of an NPC's stack for a task: the wanted stack (base first), the registered
    adapters' folders, and why it is not the registry's stack ("" when it is)."""

    wanted: tuple[str, ...]
    paths: Mapping[str, str]  # registered adapter name -> its PEFT folder
    reason: str
    expires: float  # monotonic time to resolve again (inf until a refresh)


@dataclass(frozen=True)
class HordeInfo:
    horde_id: int
    leader: str
    members: tuple[str, ...]  # the leader included, in registration order
    centroid: tuple[float, ...]


class SchedulerServer:
    def __init__(self, config: SchedulerConfig, memory, worker, tokenizer, *,
                 server_config: ServerConfig | None = None, resident: Collection[str] = (), registry=None):
        self.config = config
        self.server_config = server_config or ServerConfig()
        self.memory = memory  # memory.store.MemoryStore
        self.worker = worker  # gpu_worker.client.WorkerClient (connected)
        self.tokenizer = tokenizer  # encode(text) / decode(ids); the worker's model's tokenizer
        self.registry = registry  # gpu_worker.lora.registry.AdapterRegistry, or None
        self.pieces = prompts.PieceTokenizer(tokenizer)
        self.queues = RequestQueues(config)
        self.tiers = TierState(config, 0)
        self.barks = barks.BarkDecks(self.server_config.bark_seed)
        self._resident = set(resident)
        self._failed: dict[str, float] = {}  # adapter -> monotonic time until which its failed load counts
        self._loading: set[str] = set()
        self._actors: dict[str, NpcActor] = {}
        self._ids: list[str] = []  # row -> NPC id, the order of TierState and the arrays below
        self._row: dict[str, int] = {}
        self._positions = np.zeros((0, 3), dtype=np.float64)
        self._forced = np.zeros(0, dtype=np.int8)  # quest floor tier per row, NO_OVERRIDE for none
        self._relationship = np.zeros(0, dtype=np.float64)  # relationship score per row, NaN for none
        self._zombie = np.zeros(0, dtype=bool)
        self._hordes: dict[int, HordeInfo] = {}
        self._horde_of: dict[str, int] = {}  # member id -> horde id
        self._ticks = 0
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.counters = dict.fromkeys(("talks", "acts", "barks", "degraded", "shed", "invalid_actions",
                                       "worker_errors", "prefetches", "warmed", "worker_requests",
                                       "talk_chains", "horde_acts", "stack_resolves", "adapter_loads",
                                       "summaries", "summary_fallbacks"), 0)
        self._summarizes_memory = (self.server_config.worker_summaries and memory is not None
                                   and getattr(memory, "summarize", False) is None)
        if self._summarizes_memory:
            memory.summarize = self.summarize_turns

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
        if self._summarizes_memory:  # no dispatcher left to carry a summary request
            self.memory.summarize = None
            self._summarizes_memory = False

    def mark_resident(self, names: Iterable[str], resident: bool = True) -> None:
        """Adapters the worker holds (loaded at its start or by load_adapter): only those are used."""
        names = set(names)
        (self._resident.update if resident else self._resident.difference_update)(names)
        for name in names:
            self._failed.pop(name, None)

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
        self._forced = np.append(self._forced, np.int8(NO_OVERRIDE))
        self._relationship = np.append(self._relationship, np.nan)
        self._zombie = np.append(self._zombie, archetype == "zombie")
        self.tiers.resize(None, added=1)
        if self.registry is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: its first turn resolves them
                asyncio.get_running_loop()
                self._spawn(self._resolve_all(actor))
        return actor

    def despawn(self, npc_ids: Iterable[str]) -> None:
        """Removes NPCs. A reply in progress finishes (its actor object lives on until it ends)."""
        gone = {npc_id for npc_id in npc_ids if npc_id in self._actors}
        if not gone:
            return
        keep = np.array([row for row, npc_id in enumerate(self._ids) if npc_id not in gone], dtype=np.int64)
        self.tiers.resize(keep)
        self._positions = self._positions[keep]
        self._forced = self._forced[keep]
        self._relationship = self._relationship[keep]
        self._zombie = self._zombie[keep]
        self._ids = [self._ids[row] for row in keep]
        self._row = {npc_id: row for row, npc_id in enumerate(self._ids)}
        for npc_id in gone:
            del self._actors[npc_id]
            self.barks.forget(npc_id)
        self._forget_horde_members(gone)

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

    def npc_ids(self) -> tuple[str, ...]:
        """Registered NPC ids in row order: row i of a TierUpdate (tiers, promoted_gold ...) is npc_ids()[i],
        until the next register_npc or despawn."""
        return tuple(self._ids)

    def actor(self, npc_id: str) -> NpcActor:
        actor = self._actors.get(npc_id)
        if actor is None:
            raise KeyError(f"NPC {npc_id!r} is not registered")
        return actor

    # ------------------------------------------------------------------------------------ overrides

    def set_override(self, npc_id: str, *, forced: Tier | str | None | EllipsisType = ...,
                     relationship: float | None | EllipsisType = ...) -> None:
        """Tier floors of an NPC from the game (see the module doc), applied from the next tick.

        forced: a quest flag, the tier the NPC keeps at least (a Tier or "gold" / "silver" / "bronze");
        relationship: its relationship score in [-100, 100] (>= SchedulerConfig.keep_silver_score keeps it
        at least Silver). None clears one; leaving an argument out keeps its current value. KeyError for an
        unregistered NPC, ValueError for a bad value (then nothing changes)."""
        row = self._row.get(npc_id)
        if row is None:
            raise KeyError(f"set_override: NPC {npc_id!r} is not registered")
        tier = None if forced is ... else _parse_forced(forced)
        score = None if relationship is ... else _parse_relationship(relationship)
        if tier is not None:
            self._forced[row] = tier
        if score is not None:
            self._relationship[row] = score

    def override(self, npc_id: str) -> tuple[Tier | None, float | None]:
        """(forced tier, relationship score) set for the NPC; None where none is set."""
        row = self._row.get(npc_id)
        if row is None:
            raise KeyError(f"override: NPC {npc_id!r} is not registered")
        forced, score = int(self._forced[row]), float(self._relationship[row])
        return (None if forced == NO_OVERRIDE else Tier(forced)), (None if math.isnan(score) else score)

    # ----------------------------------------------------------------------------------------- tick

    async def tick(self, players: Mapping[str, Sequence[float]]) -> TierUpdate:
        """Re-tiers every NPC from the players' positions ({player_id: (x, y, z)}) and the overrides set
        (set_override); NPCs promoted to Gold get their memory of the nearest player prefetched (one
        pipelined round trip for all of them); the zombies are clustered into hordes (`hordes()`)."""
        player_ids = list(players)
        player_pos = np.asarray([players[p] for p in player_ids], dtype=np.float64).reshape(-1, 3)
        replying = np.fromiter((self._actors[i].replying > 0 for i in self._ids), dtype=bool,
                               count=len(self._ids))
        forced = self._forced if (self._forced != NO_OVERRIDE).any() else None
        relationship = self._relationship if (~np.isnan(self._relationship)).any() else None
        update = self.tiers.tick(self._positions, player_pos, forced=forced, relationship=relationship,
                                 replying=replying)
        for row in np.concatenate([update.promoted, update.demoted]):
            self._actors[self._ids[row]].tier = Tier(int(update.tiers[row]))
        self._ticks += 1
        self._cluster_hordes()
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
            # In the background: a tick must not wait for prefills (nor for stack resolves). The player's
            # first turn then finds persona .. turn window of its own stacks in the worker's prefix cache.
            # .get: an NPC may have been despawned while the prefetch was awaited.
            actors = [(actor, c) for (npc_id, _), c in zip(pairs, contexts)
                      if (actor := self._actors.get(npc_id)) is not None]
            if actors:
                self._spawn(self._warm(actors))

    async def _warm_prefixes(self, actor: NpcActor, context) -> list[tuple[list[int], tuple[str, ...]]]:
        """The talk prompt up to the turn window (new_input None) on each stack a Gold talk would use now
        (dialogue_style, and emotional_response when it would chain)."""
        prompt = prompts.build_from_context(
            self.config, Tier.GOLD, "talk", context, persona=prompts.PERSONAS[actor.archetype],
            identity=prompts.render_identity(actor.name, actor.archetype, actor.subfaction), new_input=None,
            facts=context.facts[:self.memory.config.prompt_facts])
        ids = self.pieces.encode(prompt)
        stacks = [(await self._choose(actor, "dialogue_style")).adapters]
        emotional = await self._chain_choice(actor, Tier.GOLD)
        if emotional is not None:
            stacks.append(emotional.adapters)
        return [(ids, stack) for stack in stacks]

    async def _warm(self, actors: list[tuple[NpcActor, object]]) -> None:
        try:
            prefixes = [p for actor, context in actors for p in await self._warm_prefixes(actor, context)]
            await self.worker.warm_prefix(prefixes, timeout_s=self.server_config.worker_timeout_s)
            self.counters["warmed"] += len(actors)
        except Exception as e:  # only a cache miss later: log, never fail
            self.counters["worker_errors"] += 1
            log.warning("prefix warm-up of %d NPCs failed: %s", len(actors), e)

    # --------------------------------------------------------------------------------------- hordes

    def _cluster_hordes(self) -> None:
        """The zombies' hordes of this tick (see the module doc)."""
        rows = np.flatnonzero(self._zombie)
        sc = self.server_config
        found = cluster_hordes(self._positions[rows], sc.horde_cell_m, sc.horde_min_size).hordes
        self._hordes, self._horde_of = {}, {}
        if not found:
            return
        zombie_ids = [self._ids[row] for row in rows.tolist()]
        for horde in found:
            members = tuple(map(zombie_ids.__getitem__, horde.members.tolist()))
            self._hordes[horde.horde_id] = HordeInfo(horde.horde_id, zombie_ids[horde.leader], members,
                                                     tuple(horde.centroid.tolist()))
            self._horde_of.update(dict.fromkeys(members, horde.horde_id))

    def _forget_horde_members(self, gone: set[str]) -> None:
        """Despawned members leave their horde; a horde without its leader dissolves until the next tick."""
        for horde_id in {self._horde_of[npc_id] for npc_id in gone if npc_id in self._horde_of}:
            info = self._hordes.pop(horde_id)
            members = tuple(m for m in info.members if m not in gone)
            for member in info.members:
                self._horde_of.pop(member, None)
            if info.leader not in gone:
                self._hordes[horde_id] = replace(info, members=members)
                self._horde_of.update(dict.fromkeys(members, horde_id))

    def hordes(self) -> dict[int, tuple[str, tuple[str, ...]]]:
        """The last tick's hordes: horde id -> (leader id, member ids, the leader included). Ids hold until
        the next tick (a tick re-clusters from the positions and numbers them again)."""
        return {horde_id: (info.leader, info.members) for horde_id, info in self._hordes.items()}

    def horde_of(self, npc_id: str) -> int | None:
        """The horde id of a zombie in a horde at the last tick; None for an NPC that acts alone."""
        return self._horde_of.get(npc_id)

    async def act_horde(self, leader_or_horde_id: str | int,
                        context: ActContext | Mapping) -> dict[str, ActResult]:
        """ONE action_policy decision for the horde's leader, fanned out to every member (see the module
        doc): {member id: ActResult}, the leader included. KeyError for an unknown horde or an NPC in none.
        Never raises for a bad model output."""
        info = self._find_horde(leader_or_horde_id)
        leader = self.actor(info.leader)
        context = _act_context(context)
        world = context.world
        async with leader.lock:
            self.counters["horde_acts"] += 1
            if info.leader not in world:
                reason = f"the horde's leader {info.leader!r} is not in the game state sent"
                return {m: ActResult(actions.safe_default(m, world), False, reason) for m in info.members}
            tiers = [self._actors[m].tier for m in info.members if m in self._actors]
            decision = await self._act_as(leader, min(tiers, default=leader.tier), context, "Bronze horde")
            sc = self.server_config
            horde = Horde(info.horde_id, info.members.index(info.leader), np.arange(len(info.members)),
                          np.asarray(info.centroid))
            fanned = fan_out(horde, decision.action, info.members, world, seed=sc.horde_seed,
                             tick=self._ticks, spread_m=sc.horde_spread_m, variant_rate=sc.horde_variant_rate,
                             ground_axes=sc.horde_ground_axes)
        return {action.npc_id: ActResult(action, decision.valid, decision.reason, decision.raw)
                for action in fanned}

    def _find_horde(self, key: str | int) -> HordeInfo:
        if isinstance(key, str):
            horde_id = self._horde_of.get(key)
            if horde_id is None:
                known = "registered" if key in self._actors else "not registered"
                raise KeyError(f"act_horde: NPC {key!r} ({known}) is in no horde at the last tick")
            return self._hordes[horde_id]
        if isinstance(key, int | np.integer) and not isinstance(key, bool) and int(key) in self._hordes:
            return self._hordes[int(key)]
        raise KeyError(f"act_horde: no horde {key!r} at the last tick (hordes: {sorted(self._hordes)})")

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
            facts=self._session_facts(actor, player_id, context, text))
        choice = await self._choose(actor, "dialogue_style")
        emotional = await self._chain_choice(actor, tier)
        reasons = [r for r in (choice.reason, _memory_reason(context)) if r]
        params = _sampling(self.server_config, self.config.max_new_tokens(tier, "talk"),
                           self.server_config.talk_temperature, stop=("\n",))
        request_id = self._request_id(actor, "talk")
        if emotional is None:
            ids = self.pieces.encode(prompt)
            request = _worker_request(ids, choice.adapters, params, request_id)
            tokens, last_step = len(ids), 0
        else:
            request, tokens = self._talk_chain(prompt, emotional.adapters, choice.adapters, params,
                                               request_id)
            last_step = len(request.steps) - 1
            self.counters["talk_chains"] += 1
        stream = await self._enqueue(actor.npc_id, tier, "talk", request, tokens)
        if isinstance(stream, str):  # shed / expired / refused / worker error: answer with a bark
            yield self._bark_result(actor, "alert", stream, tier)
            return
        decoder = StreamDecoder(self.tokenizer)
        finish, feeling = "", []
        try:
            async for delta in stream:
                if delta.token_id is not None:
                    if delta.step == last_step:  # only the last step's deltas go to the game
                        chunk = decoder.push(delta.token_id)
                        if chunk:
                            yield chunk
                    elif delta.step == 0:
                        feeling.append(delta.token_id)
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
        named = self.tokenizer.decode(feeling, skip_special_tokens=True).strip() if feeling else ""
        emotion = named if named in EMOTIONS else emotion_tag(reply, context.emotions)
        yield TalkResult(actor.npc_id, reply, emotion, bool(reasons), "; ".join(reasons), tier.name.lower(),
                         finish_reason=finish)

    def _session_facts(self, actor: NpcActor, player_id: str, context, text: str) -> tuple:
        """The salient facts a conversation's prompts show: retrieved once per session (recency x importance
        x relevance to the session's first input, memory.retrieval) and then kept, so the memory piece and
        the prefix cache after it stay put turn after turn. A session is the pair's current turn window: a
        new one (after end_session, or the first ever) retrieves again."""
        session = context.turns[0].session_id if context.turns else None
        kept = actor.session_facts.get(player_id)
        if kept is not None and kept[0] in (session, None):
            facts = kept[1]
        else:
            facts = tuple(retrieve_facts(context.facts, text, self.memory.clock(), self.memory.config,
                                         embedder=self.memory.embedder))
        actor.session_facts.pop(player_id, None)
        actor.session_facts[player_id] = (session, facts)
        while len(actor.session_facts) > MAX_SESSION_FACTS:  # the longest-unseen players go first
            del actor.session_facts[next(iter(actor.session_facts))]
        return facts

    def _talk_chain(self, prompt: prompts.Prompt, emotional: tuple[str, ...], dialogue: tuple[str, ...],
                    params, request_id: str):
        """(ChainRequest, prompt tokens for the batch budget): step 1 names the emotion on the
        emotional_response stack, step 2 replies on the dialogue_style stack with it in its prompt."""
        from gpu_worker.chains import ChainRequest, ChainStep, OutputRef
        from gpu_worker.grammar import Grammar

        if prompt.pieces[-1] != prompts.TALK_CUE:
            raise ValueError(f"a talk prompt ends with {prompts.TALK_CUE!r}, got {prompt.pieces[-1]!r}")
        head = self.pieces.encode(prompt.pieces[:-1]) + list(self.pieces.piece_ids(EMOTION_CUE))
        tail = [*self.pieces.piece_ids("\n"), *self.pieces.piece_ids(prompts.TALK_CUE)]
        feel = _sampling(self.server_config, EMOTION_MAX_TOKENS, self.server_config.talk_temperature)
        chain = ChainRequest([
            ChainStep(head, emotional, feel, Grammar("ebnf", EMOTION_EBNF)),
            ChainStep([*head, OutputRef(0), *tail], dialogue, params),
        ], request_id=request_id)
        return chain, 2 * len(head) + EMOTION_MAX_TOKENS + len(tail)

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
        context = _act_context(context)
        async with actor.lock:
            self.counters["acts"] += 1
            return await self._act_as(actor, actor.tier, context, "Bronze NPC")

    async def _act_as(self, actor: NpcActor, tier: Tier, context: ActContext, who: str) -> ActResult:
        """One decision of `actor` at `tier` (the caller holds its lock)."""
        world = context.world
        if tier == Tier.BRONZE:
            return ActResult(actions.safe_default(actor.npc_id, world), False,
                             f"{who}: no LLM call on the hot path")
        raw, why = await self._decode_action(actor, tier, context)
        if why:
            return ActResult(actions.safe_default(actor.npc_id, world), False, why, raw)
        action, reason = actions.action_or_default(actor.npc_id, raw, world)
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
        choice = await self._choose(actor, "action_policy")
        params = _sampling(self.server_config, self.config.max_new_tokens(tier, "act"),
                           self.server_config.act_temperature)
        request = _worker_request(ids, choice.adapters, params, self._request_id(actor, "act"), grammar)
        stream = await self._enqueue(actor.npc_id, tier, "act", request, len(ids))
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

    async def _enqueue(self, npc_id: str, tier: Tier, kind: str, request, tokens: int):
        """Queues a worker request; returns its RequestStream once a batch carried it, or the reason it
        never ran (an explicit outcome of the queues, or the worker refusing the batch)."""
        future = asyncio.get_running_loop().create_future()
        queued = QueuedRequest(request.request_id, npc_id, tier, kind, tokens, payload=(request, future))
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
        self.counters["worker_requests"] += len(requests)
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
        """The stack without a registry: as given at registration, else `<archetype>.<task>`."""
        return actor.stacks.get(task, (f"{actor.archetype}.{task}",))

    async def _choose(self, actor: NpcActor, task: str) -> StackChoice:
        """The stack a turn of `task` uses now (see the module doc): degraded, with the reasons, when it is
        not the NPC's whole stack."""
        failed = {name for name, until in self._failed.items() if until > time.monotonic()}
        if task in actor.stacks or self.registry is None:
            return choose_stack(self._stack(actor, task), Availability(self._resident, failed=failed))
        resolved = actor.resolved.get(task)
        if resolved is None or resolved.expires <= time.monotonic():
            resolved = await self._resolve(actor, task)
        if self.server_config.load_registered:
            self._load_missing(resolved)
        choice = choose_stack(resolved.wanted, Availability(self._resident, resolved.paths, failed))
        if not resolved.reason:
            return choice
        reason = "; ".join(r for r in (resolved.reason, choice.reason) if r)
        return replace(choice, degraded=True, reason=reason)

    async def _chain_choice(self, actor: NpcActor, tier: Tier) -> StackChoice | None:
        """The emotional_response stack when a talk at `tier` runs as a chain; else None."""
        if not self.server_config.talk_chain or tier != Tier.GOLD:
            return None
        choice = await self._choose(actor, "emotional_response")
        return None if choice.degraded or not choice.adapters else choice

    async def _resolve(self, actor: NpcActor, task: str) -> ResolvedStack:
        """Asks the registry for the NPC's stack; never raises (a failure degrades, see the module doc)."""
        from gpu_worker.lora.registry import UnknownAdapter, UnknownNPC

        self.counters["stack_resolves"] += 1
        task_adapter = (f"{actor.archetype}.{task}",)
        retry = time.monotonic() + self.server_config.registry_retry_s
        try:
            records = await asyncio.wait_for(self.registry.resolve_stack(actor.npc_id, task),
                                             self.server_config.registry_timeout_s)
        except UnknownNPC as e:
            resolved = ResolvedStack(task_adapter, {}, f"registry: {e}: its deltas were dropped", retry)
        except UnknownAdapter as e:
            resolved = ResolvedStack((), {}, f"registry: {e}: base model alone", retry)
        except Exception as e:  # Redis down, a timeout, inconsistent records: never fail a turn for it
            why = str(e) or type(e).__name__
            resolved = ResolvedStack(task_adapter, {}, f"registry unavailable ({why}): deltas dropped", retry)
        else:
            resolved = ResolvedStack(tuple(r.name for r in records), {r.name: r.path for r in records}, "",
                                     math.inf)
        actor.resolved[task] = resolved
        return resolved

    async def _resolve_all(self, actor: NpcActor) -> None:
        tasks = [task for task in STACK_TASKS if task not in actor.stacks]
        resolved = await asyncio.gather(*(self._resolve(actor, task) for task in tasks))
        if self.server_config.load_registered:
            for stack in resolved:
                self._load_missing(stack)

    async def refresh_stacks(self, npc_ids: Iterable[str] | None = None) -> None:
        """Resolves the registry stacks of these NPCs (all: None) again, e.g. after new adapter versions or
        NPC profiles. Without a registry: nothing to do. KeyError for an unregistered NPC."""
        if self.registry is None:
            return
        actors = list(self._actors.values()) if npc_ids is None else [self.actor(i) for i in npc_ids]
        await asyncio.gather(*(self._resolve_all(actor) for actor in actors))

    def _load_missing(self, resolved: ResolvedStack) -> None:
        """Loads the stack's registered adapters that the worker lacks, in the background (a turn uses an
        adapter once it is resident: this one degrades)."""
        now = time.monotonic()
        for name, path in resolved.paths.items():
            if name in self._resident or name in self._loading or self._failed.get(name, 0.0) > now:
                continue
            self._loading.add(name)
            self._spawn(self._load_adapter(name, path))

    async def _load_adapter(self, name: str, path: str) -> None:
        try:
            await self.worker.load_adapter(name, path, timeout_s=self.server_config.worker_timeout_s)
        except Exception as e:  # a bad file, a lost worker: the turns keep degrading, retried later
            self._failed[name] = time.monotonic() + self.server_config.registry_retry_s
            self.counters["worker_errors"] += 1
            log.warning("loading adapter %s from %s failed: %s", name, path, e)
        else:
            self._resident.add(name)
            self._failed.pop(name, None)
            self.counters["adapter_loads"] += 1
        finally:
            self._loading.discard(name)

    def _request_id(self, actor: NpcActor | str, kind: str) -> str:
        # Unique per process (the worker refuses a duplicate in flight); printable ASCII, no spaces.
        owner = actor if isinstance(actor, str) else actor.npc_id
        return f"{kind}-{next(self._seq)}-{owner}"[:128].replace(" ", "_")

    # ------------------------------------------------------------------------------ session summaries

    async def summarize_turns(self, turns: Sequence) -> str:
        """A session summary written by the worker (the memory store's `summarize` when this server set
        it): one "summary" request in the Bronze lane, on the base model, prompt
        prompts.summary_pieces. Raises when it does not run or finish within summary_timeout_s (shed,
        expired, worker error, too slow; counted in `summary_fallbacks`): the store then falls back to its
        extractive summary, well before a game's END_SESSION request times out."""
        if not turns:
            return ""
        try:
            return await asyncio.wait_for(self._summarize(turns), self.server_config.summary_timeout_s)
        except BaseException:
            self.counters["summary_fallbacks"] += 1
            raise

    async def _summarize(self, turns: Sequence) -> str:
        max_tokens = self.config.summary_max_tokens
        hello = self.worker.worker  # the worker's HELLO reply (None while reconnecting): its context length
        limit = hello.max_model_len if hello is not None else 0
        budget = prompts.SUMMARY_TRANSCRIPT_CHARS
        ids = self.pieces.encode(prompts.summary_pieces(turns, budget))
        while limit and len(ids) + max_tokens > limit and budget > 500:  # fewer (older) lines until it fits
            budget //= 2
            ids = self.pieces.encode(prompts.summary_pieces(turns, budget))
        params = _sampling(self.server_config, max_tokens, self.server_config.summary_temperature)
        request = _worker_request(ids, (), params, self._request_id("memory", "summary"))
        stream = await self._enqueue("memory", Tier.BRONZE, "summary", request, len(ids))
        if isinstance(stream, str):
            raise RuntimeError(f"the summary request did not run: {stream}")
        try:
            result = await stream.result()
        except asyncio.CancelledError:  # too slow: nobody will read it, free the worker's slot
            self._spawn(self.worker.abort([stream.request_id]))
            raise
        except Exception:
            self.counters["worker_errors"] += 1
            raise
        self.counters["summaries"] += 1
        text = self.tokenizer.decode(list(result.steps[0].token_ids), skip_special_tokens=True)
        return prompts.drop_control_chars(text)

    def stats(self) -> dict:
        return {**self.counters, "npcs": len(self._ids), "tiers": _tier_counts(self.tiers.tiers),
                "queues": {**self.queues.counters, **self.queues.lane_sizes()},
                "prompt_pieces": {"hits": self.pieces.hits, "misses": self.pieces.misses},
                "memory": self.memory.stats()}


# ------------------------------------------------------------------------------------------- helpers


class StreamDecoder:
    """Incremental detokenization: emits the new text of each token, holding it back while it ends in U+FFFD
    (a UTF-8 character split across tokens), cutting at the first newline (the prompt layout keeps a reply
    on one line; the worker stops there too) and dropping control characters (a byte-level vocabulary can
    sample NUL, which ends a C string in the game and which the archive refuses).

    Linear in the reply's length: each push decodes only the tokens since the last emitted boundary (the
    window's start is kept one step back, so a token that merges with the one before it decodes right)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.closed = False
        self._prefix = 0  # ids[_prefix:_read] decoded to what was emitted last
        self._read = 0
        self._pending = ""  # leading whitespace, held until the reply says something

    def push(self, token_id: int) -> str:
        if self.closed:
            return ""
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if after.endswith("\ufffd") or not after.startswith(before):
            return ""  # an incomplete character (or a window that re-decodes differently): wait
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        if "\n" in delta:
            delta, self.closed = delta.split("\n", 1)[0], True
        delta = prompts.drop_control_chars(delta)
        if not self.text:
            delta = self._pending + delta
            if not delta.strip():  # the leading space after "Me:" alone is not worth a chunk
                self._pending = delta
                return ""
            self._pending = ""
        self.text += delta
        return delta


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


def _act_context(context: ActContext | Mapping) -> ActContext:
    if isinstance(context, ActContext):
        return context
    return ActContext(dict(context["world"]), context.get("situation", "Nothing happens."))


def _parse_forced(forced: object) -> int:
    """A quest floor as a tier value (NO_OVERRIDE for None); ValueError names what is accepted."""
    if forced is None:
        return NO_OVERRIDE
    if isinstance(forced, Tier):
        return int(forced)
    if isinstance(forced, str) and forced.strip().upper() in Tier.__members__:
        return int(Tier[forced.strip().upper()])
    raise ValueError(f"forced: expected a Tier, one of {[t.name.lower() for t in Tier]} or None, "
                     f"got {forced!r}")


def _parse_relationship(score: object) -> float:
    """A relationship score (NaN for None); ValueError outside [-100, 100] or not a finite number."""
    if score is None:
        return math.nan
    low, high = RELATIONSHIP_RANGE
    if (isinstance(score, bool) or not isinstance(score, int | float | np.integer | np.floating)
            or not math.isfinite(score) or not low <= score <= high):
        raise ValueError(f"relationship: expected a finite score in [{low:g}, {high:g}] or None, "
                         f"got {score!r}")
    return float(score)


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
