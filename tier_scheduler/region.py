"""A region of NPCs with moving players, driven through the game client's methods: `make demo`'s main part,
`bench.region`'s workload and tests/test_region.py's subject.

    report = await run_region(game, RegionConfig(npcs=500, duration_s=60), count_tokens=len_of_tokens)
    print(format_report(report)); plot_latency(report, ".run/region-latency.png")

    async with LocalStack(model_dir, adapters_dir, MemoryConfig(key_prefix="npc-region:..."),
                          archive_schema="npc_region_...") as stack:       # worker + scheduler + archiver
        report = await run_region(stack.client, config, count_tokens=stack.count_tokens)

    python -m tier_scheduler.region [--duration 60] [--npcs 500] [--players 4] [--plot PATH]
    python -m tier_scheduler.region --inprocess                         # the scheduler in this process
    python -m tier_scheduler.region --remote ipc:///path/sched.sock     # a running `npc-scheduler serve`

`make demo` (run_local, LocalStack) starts the worker, the scheduler and the archiver with their embedded
defaults, each a process of its own as deployed: `npc-worker serve` (torch threads = cores - 1),
`npc-scheduler serve` (its SchedulerConfig given with --config; the game reaches it over ipc:// through
plugin_bindings.remote.AsyncRemoteGameClient) and `npc-archiver`; this process is the game. `--inprocess`
runs the scheduler here instead (SchedulerServer behind plugin_bindings.AsyncGameClient).

The simulation (`run_region`) only uses the game client's method set (register_npc, update_positions, tick,
talk, act, event, stats, despawn; a method may be plain or a coroutine), so the same code drives the
in-process `plugin_bindings.AsyncGameClient` and the networked `plugin_bindings.remote.AsyncRemoteGameClient`
(LocalStack's default and `run_remote`; its tick reports the NPCs whose tier changed, by id, which the
simulation applies).

The region: `npcs` vampires and zombies (`zombie_fraction`), most of them around lairs (zombie hordes,
vampire courts), the rest scattered over a `size_m` square; zombies shamble (a random walk). `players`
walk from lair to lair. Every tick (`tick_hz`, 10 Hz): positions go to the server (update_positions), the
server re-tiers (tick) and the simulation starts requests, each NPC at a Poisson rate per second that
depends on its tier:
- talk (the nearest player says a line): Gold and Silver NPCs reach the LLM; Bronze NPCs answer with a
  bark (the server never sends a Bronze talk to the worker);
- act (Gold and Silver): a structured action over a small game state (the NPC, its nearest player, the two
  nearest other NPCs, a body at its feet), decoded under the archetype's grammar and validated;
- event (Gold): a gift / help / insult from the nearest player to memory (cards, facts, emotions).
An NPC has at most one request in flight, and at most `max_inflight` run at once (bounded concurrency: a
request that would exceed it is not started and is counted as `throttled`).

Measured: per tier and request type the latency (talk: the first chunk, what a player waits for before the
line starts, and the whole reply; act and event: the call), p50 / p95 / p99; generated tokens (replies and
actions as delivered, re-tokenized with `count_tokens`) and requests per second; tier counts over time;
errors (an exception out of a client call, a request past `request_timeout_s`, the server's
`worker_errors` counter: a lost worker, a refused batch, a failed prefix warm-up, and a scheduler subprocess
that does not exit 0 on SIGTERM: all must be 0 in a healthy run); degraded replies (a bark instead of the
LLM, a smaller adapter stack, no memory) and actions that never reached a decision (shed, expired, decoding
cut short), each with its reasons aggregated; actions the validator rejected (the random model's action out
of range, wrong target...: the safe default was used).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from tier_scheduler import actions
from tier_scheduler.config import Tier
from tier_scheduler.server import ActContext, TalkResult

TIERS = ("gold", "silver", "bronze")
LLM_CATEGORIES = ("gold.talk", "silver.talk", "gold.act", "silver.act", "gold.horde_act",
                  "silver.horde_act")  # what reaches the worker
REPO = Path(__file__).resolve().parent.parent
RANDOM_WEIGHTS_NOTE = ("The demo model has RANDOM weights (a tiny Qwen2 built locally, nothing downloaded) "
                       "until a trained one exists: its lines are gibberish and its actions are random picks "
                       "that the grammar and the validator keep legal. This run shows the serving path and "
                       "its latencies, not dialogue quality.")
# Adapters of the demo region (name -> rank), PEFT folders with random weights (the shapes are real).
# emotional_response makes a Gold talk a 2-step chain in the worker (ServerConfig.talk_chain).
REGION_ADAPTERS = {"vampire.dialogue_style": 8, "vampire.action_policy": 4, "vampire.emotional_response": 4,
                   "vampire.sub.nosferatu": 4, "zombie.dialogue_style": 8, "zombie.action_policy": 8,
                   "zombie.emotional_response": 4}
VAMPIRE_NAMES = ("Mirela", "Vlad", "Ilona", "Radu", "Sorin", "Anca", "Dorin", "Elisabeta", "Lucian", "Oana")
PLAYER_LINES = ("Good evening.", "Have you seen my brother? He went to the crypt.", "What do you want?",
                "Stay back!", "I brought you a silver ring.", "Which way to the old chapel?",
                "Why is the village so quiet?", "Can you help me find the lost amulet?", "Who rules here?",
                "I mean you no harm.", "Tell me about the bloodline.", "Do you remember me?")
EVENTS = (("gift", "a silver ring"), ("help", "carried water to the crypt"), ("insult", "called it a corpse"),
          ("life_saved", "pulled it from the burning mill"), ("attack", "struck it with a torch"))


@dataclass(frozen=True)
class RegionConfig:
    npcs: int = 500
    players: int = 4
    zombie_fraction: float = 0.6  # the rest are vampires
    size_m: float = 300.0  # the region is a size_m x size_m square
    lairs: int = 10  # clusters (hordes, courts) holding `clustered` of the NPCs
    clustered: float = 0.7
    lair_radius_m: float = 18.0
    duration_s: float = 60.0  # traffic time; in-flight requests then finish (up to drain_timeout_s)
    tick_hz: float = 10.0
    player_speed_mps: float = 2.5
    zombie_speed_mps: float = 0.4
    # Requests per NPC per second, by the NPC's tier at the tick.
    gold_talk_rate: float = 0.06
    silver_talk_rate: float = 0.02
    bronze_talk_rate: float = 0.01
    gold_act_rate: float = 0.06
    silver_act_rate: float = 0.02
    gold_event_rate: float = 0.005
    # A zombie of a horde (as the scheduler clusters them) asks for its horde: one decision of the leader
    # fanned out to every member (act_horde), at most once per horde per horde_act_interval_s.
    horde_act_interval_s: float = 2.0
    max_inflight: int = 64
    request_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    samples: int = 3  # NPC lines kept per tier (and actions) for the report
    seed: int = 0
    id_prefix: str = ""  # before every NPC id (a run of its own on a shared scheduler)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "id_prefix":
                if not isinstance(value, str):
                    raise ValueError(f"RegionConfig.id_prefix must be a string, got {value!r}")
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"RegionConfig.{f.name} must be a finite number >= 0, got {value!r}")
        for name in ("npcs", "players", "max_inflight", "tick_hz", "size_m"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RegionConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("zombie_fraction", "clustered"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"RegionConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass
class Sample:
    at_s: float  # since the traffic started
    category: str  # "<tier>.<kind>": gold.talk, silver.act, bronze.talk, gold.event ...
    first_ms: float  # talk: the first chunk; otherwise equal to total_ms
    total_ms: float


@dataclass
class RegionReport:
    config: RegionConfig
    zombies: int = 0  # the rest are vampires
    duration_s: float = 0.0  # traffic start to the last request's end
    ticks: int = 0
    late_ticks: int = 0  # ticks that started more than one tick period late
    tick_ms: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    timeline: list[tuple[float, int, int, int]] = field(default_factory=list)  # (s, gold, silver, bronze)
    tokens: int = 0
    requests: Counter = field(default_factory=Counter)  # category -> completed requests
    errors: int = 0  # exceptions and timeouts seen by the game (server worker_errors added in `summary`)
    error_messages: Counter = field(default_factory=Counter)
    degraded: int = 0
    degraded_reasons: Counter = field(default_factory=Counter)
    invalid_actions: int = 0
    invalid_reasons: Counter = field(default_factory=Counter)
    throttled: int = 0  # requests not started: max_inflight were running
    horde_members: int = 0  # actions that horde acts returned (one per member, the leader included)
    lines: list[str] = field(default_factory=list)  # a few NPC lines and actions
    tier_counts: dict[str, int] = field(default_factory=dict)  # after the last tick
    server: dict = field(default_factory=dict)  # the client's stats() at the end

    # ------------------------------------------------------------------------------------- summaries

    def latencies(self) -> dict[str, dict[str, float]]:
        """category -> count and p50 / p95 / p99 (ms) of the first chunk (talk) and of the whole call."""
        out = {}
        for category in sorted({s.category for s in self.samples}):
            rows = [s for s in self.samples if s.category == category]
            first = [s.first_ms for s in rows]
            total = [s.total_ms for s in rows]
            out[category] = {"n": len(rows), **{f"p{q}_ms": _pct(first, q) for q in (50, 95, 99)},
                             **{f"total_p{q}_ms": _pct(total, q) for q in (50, 95, 99)}}
        return out

    def total_errors(self) -> int:
        return self.errors + int(self.server.get("worker_errors", 0) or 0)

    def summary(self) -> dict:
        """A flat dict for JSON (bench.region): headline keys first, then per tier and type."""
        lat = self.latencies()
        cat = {c: lat.get(c, {}) for c in ("gold.talk", "silver.talk")}
        llm_acts = [s.total_ms for s in self.samples
                    if s.category in ("gold.act", "silver.act", "gold.horde_act", "silver.horde_act")]
        llm = [s.first_ms for s in self.samples if s.category in LLM_CATEGORIES]
        duration = max(self.duration_s, 1e-9)
        out = {
            "npcs": self.config.npcs, "zombies": self.zombies, "players": self.config.players,
            "errors": self.total_errors(), "degraded": self.degraded,
            "gold_p95_ms": cat["gold.talk"].get("p95_ms"), "silver_p95_ms": cat["silver.talk"].get("p95_ms"),
            "act_p95_ms": _pct(llm_acts, 95), "llm_p95_ms": _pct(llm, 95),
            "tokens_per_s": self.tokens / duration, "requests_per_s": sum(self.requests.values()) / duration,
            "llm_requests_per_s": sum(n for c, n in self.requests.items() if c in LLM_CATEGORIES) / duration,
            "tokens": self.tokens, "requests": dict(sorted(self.requests.items())),
        }
        for category, row in lat.items():
            key = category.replace(".", "_")
            for q in (50, 95, 99):
                out[f"{key}_p{q}_ms"] = row[f"p{q}_ms"]
            if category.endswith(".talk"):
                out[f"{key}_total_p95_ms"] = row["total_p95_ms"]
        timeline = np.array([row[1:] for row in self.timeline] or [[0, 0, 0]], dtype=float)
        out.update({
            "tier_counts": self.tier_counts,
            "tier_counts_mean": {t: float(timeline[:, i].mean()) for i, t in enumerate(TIERS)},
            "tick_p95_ms": _pct(self.tick_ms, 95), "ticks": self.ticks, "late_ticks": self.late_ticks,
            "throttled": self.throttled, "invalid_actions": self.invalid_actions,
            "horde_acts": sum(n for c, n in self.requests.items() if c.endswith(".horde_act")),
            "horde_members": self.horde_members,
            "server_worker_errors": int(self.server.get("worker_errors", 0) or 0),
            "shed": int(self.server.get("shed", 0) or 0),
            "server_counters": {k: v for k, v in self.server.items() if isinstance(v, int)},
            "degraded_reasons": dict(self.degraded_reasons.most_common(8)),
            "invalid_reasons": dict(self.invalid_reasons.most_common(5)),
            "error_messages": dict(self.error_messages.most_common(5)),
            "duration_s": self.duration_s, "traffic_s": self.config.duration_s,
        })
        return out


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _bucket(reason: str) -> str:
    """A reason without its ids and numbers, so that reasons aggregate."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    return re.sub(r"\d+(\.\d+)?", "N", reason)[:160]


async def _maybe(value):
    return await value if inspect.isawaitable(value) else value


# -------------------------------------------------------------------------------------------- simulation


class _Region:
    def __init__(self, game, config: RegionConfig, count_tokens: Callable[[str], int] | None):
        self.game = game
        self.config = config
        self.count_tokens = count_tokens or (lambda text: 0)
        self.rng = np.random.default_rng(config.seed)
        self.report = RegionReport(config)
        self._place()
        self.report.zombies = int(self.is_zombie.sum())
        self.busy: set[int] = set()
        self.tasks: set[asyncio.Task] = set()
        self.t0 = 0.0
        self.nearest = np.zeros(config.npcs, dtype=np.int64)
        self.distance = np.full(config.npcs, np.inf)
        self.kept_lines: Counter = Counter()
        self.horde_of: dict[int, int] = {}  # row -> the scheduler's horde id, refreshed each tick
        self.horde_leader: dict[int, str] = {}  # horde id -> its leader's NPC id
        self.horde_members: dict[int, tuple[str, ...]] = {}
        self.horde_acted: dict[str, float] = {}  # leader id -> when its horde last acted

    def _place(self) -> None:
        c, rng = self.config, self.rng
        n = c.npcs
        margin = min(c.lair_radius_m * 2, c.size_m / 4)
        self.lairs = rng.uniform(margin, c.size_m - margin, (max(c.lairs, 1), 2))
        self.is_zombie = rng.random(n) < c.zombie_fraction
        clustered = rng.random(n) < c.clustered
        lair = rng.integers(0, len(self.lairs), n)
        pos = rng.uniform(0, c.size_m, (n, 3))
        pos[:, 2] = 0.0
        offsets = rng.normal(0, c.lair_radius_m / 2, (n, 2))
        pos[clustered, :2] = np.clip(self.lairs[lair[clustered]] + offsets[clustered], 0, c.size_m)
        self.pos = pos
        self.horde = np.where(clustered & self.is_zombie, lair, -1)
        self.ids = [f"{c.id_prefix}{'zombie' if z else 'vampire'}-{i:04d}"
                    for i, z in enumerate(self.is_zombie)]
        self.row = {npc_id: i for i, npc_id in enumerate(self.ids)}
        self.tiers = np.full(n, int(Tier.BRONZE), dtype=np.int64)  # registered NPCs are Bronze until a tick
        self.archetype = ["zombie" if z else "vampire" for z in self.is_zombie]
        self.player_ids = [f"player-{k + 1}" for k in range(c.players)]
        start = self.lairs[rng.integers(0, len(self.lairs), c.players)]
        self.players = np.column_stack([start + rng.normal(0, 5, (c.players, 2)), np.zeros(c.players)])
        self.goals = self.lairs[rng.integers(0, len(self.lairs), c.players)]

    async def register(self) -> None:
        for i, npc_id in enumerate(self.ids):
            kwargs = {"position": tuple(self.pos[i])}
            subfaction = None
            if self.archetype[i] == "vampire":
                kwargs["name"] = f"{VAMPIRE_NAMES[i % len(VAMPIRE_NAMES)]} {i}"
                if i % 2:  # half the vampires stack their subfaction's delta on the dialogue adapter
                    subfaction = "nosferatu"
                    kwargs["stacks"] = {"dialogue_style": ("vampire.dialogue_style", "vampire.sub.nosferatu")}
            await _maybe(self.game.register_npc(npc_id, self.archetype[i], subfaction, **kwargs))

    # -------------------------------------------------------------------------------------- movement

    def _move(self, dt: float) -> None:
        c, rng = self.config, self.rng
        gap = self.goals - self.players[:, :2]
        dist = np.linalg.norm(gap, axis=1)
        arrived = dist < 3.0
        if arrived.any():
            self.goals[arrived] = self.lairs[rng.integers(0, len(self.lairs), int(arrived.sum()))]
        step = np.minimum(c.player_speed_mps * dt, dist)[:, None] * gap / np.maximum(dist, 1e-9)[:, None]
        self.players[:, :2] = np.clip(self.players[:, :2] + step, 0, c.size_m)
        shamble = rng.normal(0, c.zombie_speed_mps * dt, (c.npcs, 2)) * self.is_zombie[:, None]
        self.pos[:, :2] = np.clip(self.pos[:, :2] + shamble, 0, c.size_m)
        gaps = np.linalg.norm(self.pos[:, None, :2] - self.players[None, :, :2], axis=2)  # [N, P]
        self.nearest = gaps.argmin(axis=1)
        self.distance = gaps[np.arange(c.npcs), self.nearest]

    # ----------------------------------------------------------------------------------------- loop

    async def run(self) -> RegionReport:
        c, report = self.config, self.report
        dt = 1.0 / c.tick_hz
        self.t0 = time.monotonic()
        next_tick = self.t0
        while time.monotonic() - self.t0 < c.duration_s:
            self._move(dt)
            try:
                await _maybe(self.game.update_positions(self.ids, self.pos.copy()))
                started = time.perf_counter()
                players = {p: tuple(map(float, self.players[k])) for k, p in enumerate(self.player_ids)}
                update = await _maybe(self.game.tick(players))
                report.tick_ms.append((time.perf_counter() - started) * 1000)
                tiers = self._apply_tick(update)
                await self._refresh_hordes()
            except Exception as e:  # a failed tick is an error; the region goes on
                self._error(e)
                tiers = None
            report.ticks += 1
            if tiers is not None:
                counts = np.bincount(tiers, minlength=3)
                report.timeline.append((time.monotonic() - self.t0, *map(int, counts[:3])))
                report.tier_counts = {t: int(counts[i]) for i, t in enumerate(TIERS)}
                self._launch(tiers, dt)
            next_tick += dt
            now = time.monotonic()
            if now - next_tick > dt:  # fell behind by more than a tick: do not try to catch up
                report.late_ticks += 1
                next_tick = now
            await asyncio.sleep(max(0.0, next_tick - now))
        if self.tasks:
            done, pending = await asyncio.wait(self.tasks, timeout=c.drain_timeout_s)
            for task in pending:
                task.cancel()
                self._error(TimeoutError(f"still running {c.drain_timeout_s:g} s after the traffic stopped"))
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        report.duration_s = time.monotonic() - self.t0
        try:
            report.server = dict(await _maybe(self.game.stats()))
            await _maybe(self.game.despawn(self.ids))  # the players left; a shared scheduler forgets them
        except Exception as e:
            self._error(e)
        return report

    def _apply_tick(self, update) -> np.ndarray:
        """The tier of every NPC of the region after a tick: an in-process TierUpdate carries all of them
        (array in registration order), a remote TickResult those that changed ({npc_id: tier name})."""
        tiers = update.get("tiers") if isinstance(update, Mapping) else getattr(update, "tiers", None)
        if isinstance(tiers, Mapping):
            for npc_id, tier in tiers.items():
                row = self.row.get(npc_id)  # a shared scheduler may report NPCs of others
                if row is not None:
                    self.tiers[row] = Tier[tier.upper()] if isinstance(tier, str) else int(tier)
            return self.tiers
        if tiers is None:
            raise TypeError(f"tick returned {type(update).__name__} without tiers")
        tiers = np.asarray(tiers, dtype=np.int64)
        if tiers.shape != (self.config.npcs,) or ((tiers < Tier.GOLD) | (tiers > Tier.BRONZE)).any():
            raise ValueError(f"tick returned tiers of shape {tiers.shape} (expected ({self.config.npcs},)) "
                             "or out of range")
        self.tiers = tiers
        return tiers

    async def _refresh_hordes(self) -> None:
        """The scheduler's hordes after its tick (a client without hordes(): none)."""
        hordes = getattr(self.game, "hordes", None)
        if hordes is None:
            return
        self.horde_of.clear()
        self.horde_leader.clear()
        self.horde_members.clear()
        for horde_id, (leader, members) in (await _maybe(hordes())).items():
            rows = [self.row[m] for m in members if m in self.row]  # a shared scheduler has others too
            if leader in self.row:
                self.horde_leader[horde_id], self.horde_members[horde_id] = leader, tuple(members)
                self.horde_of.update((r, horde_id) for r in rows)

    def _launch(self, tiers: np.ndarray, dt: float) -> None:
        c = self.config
        rates = {
            "talk": np.array([c.gold_talk_rate, c.silver_talk_rate, c.bronze_talk_rate]),
            "act": np.array([c.gold_act_rate, c.silver_act_rate, 0.0]),
            "event": np.array([c.gold_event_rate, 0.0, 0.0]),
        }
        chosen = []
        for kind, rate in rates.items():
            fire = np.flatnonzero(self.rng.random(c.npcs) < rate[tiers] * dt)
            chosen += [(int(i), kind) for i in fire]
        self.rng.shuffle(chosen)
        for i, kind in chosen:
            if i in self.busy:
                continue
            if len(self.tasks) >= c.max_inflight:
                self.report.throttled += 1
                continue
            horde_id = self.horde_of.get(i) if kind == "act" else None
            if horde_id is not None:
                leader, now = self.horde_leader[horde_id], time.monotonic()
                if now - self.horde_acted.get(leader, -math.inf) < c.horde_act_interval_s:
                    continue  # its horde acted a moment ago: this zombie follows that decision
                self.horde_acted[leader] = now
            self.busy.add(i)
            tier = TIERS[int(tiers[i])]
            player = self.player_ids[int(self.nearest[i])]
            if horde_id is not None:
                coro = self._act_horde(i, horde_id, player, tier)
            else:
                coro = {"talk": self._talk, "act": self._act, "event": self._event}[kind](i, player, tier)
            task = asyncio.create_task(self._guard(i, coro))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _guard(self, i: int, coro) -> None:
        try:
            await asyncio.wait_for(coro, self.config.request_timeout_s)
        except TimeoutError:
            self._error(TimeoutError(f"a request took more than {self.config.request_timeout_s:g} s"))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._error(e)
        finally:
            self.busy.discard(i)

    def _error(self, e: BaseException) -> None:
        self.report.errors += 1
        self.report.error_messages[f"{type(e).__name__}: {_bucket(str(e))}"] += 1

    def _record(self, start: float, category: str, first: float | None, end: float) -> None:
        total = (end - start) * 1000
        first_ms = total if first is None else (first - start) * 1000
        self.report.samples.append(Sample(start - self.t0, category, first_ms, total))
        self.report.requests[category] += 1

    # ------------------------------------------------------------------------------------- requests

    async def _talk(self, i: int, player: str, tier: str) -> None:
        text = PLAYER_LINES[int(self.rng.integers(len(PLAYER_LINES)))]
        start = time.monotonic()
        first, result = None, None
        stream = self.game.talk(self.ids[i], player, text)
        closing = contextlib.aclosing(stream) if hasattr(stream, "aclose") else contextlib.nullcontext(stream)
        async with closing as items:
            async for item in items:
                if isinstance(item, TalkResult) or not isinstance(item, str):
                    result = item
                elif first is None:
                    first = time.monotonic()
        end = time.monotonic()
        if result is None:
            raise RuntimeError("the talk stream ended without a result")
        tier = getattr(result, "tier", tier) or tier  # the tier the reply was made at
        self._record(start, f"{tier}.talk", first, end)
        if result.degraded:
            self.report.degraded += 1
            self.report.degraded_reasons[f"talk: {_bucket(result.reason)}"] += 1
        if not result.bark:
            self.report.tokens += self.count_tokens(result.text)
        if self.kept_lines[tier] < self.config.samples and not result.degraded:
            self.kept_lines[tier] += 1
            who = f"{self.ids[i]}" + (" (bark)" if result.bark else "")
            self.report.lines.append(f"[{tier}] {who} to {player}: {text!r} -> {result.text[:100]!r} "
                                     f"[{result.emotion}]")

    async def _act(self, i: int, player: str, tier: str) -> None:
        world, situation = self._world(i, player)
        start = time.monotonic()
        result = await _maybe(self.game.act(self.ids[i], ActContext(world, situation)))
        end = time.monotonic()
        self._record(start, f"{tier}.act", None, end)
        self._count_decision("act", result)
        if self.kept_lines["act"] < self.config.samples and result.raw:
            self.kept_lines["act"] += 1
            a = result.action
            verdict = "valid" if result.valid else f"rejected ({result.reason[:70]}), safe default"
            self.report.lines.append(f"[{tier}] {self.ids[i]} acts: {a.name}"
                                     f"{' -> ' + a.target if a.target else ''} ({verdict}; model said "
                                     f"{(result.raw or '')[:60]!r})")

    def _count_decision(self, kind: str, result) -> None:
        """Tokens of an action decision, and why it was not valid: no decision from the model (shed, expired,
        cut short: degraded) or one the validator rejected (the safe default was used)."""
        self.report.tokens += self.count_tokens(result.raw or "")
        if result.valid:
            return
        if not result.raw or result.reason.startswith("decoding ended"):
            self.report.degraded += 1
            self.report.degraded_reasons[f"{kind}: {_bucket(result.reason)}"] += 1
        else:
            self.report.invalid_actions += 1
            self.report.invalid_reasons[_bucket(result.reason)] += 1

    async def _act_horde(self, i: int, horde_id: int, player: str, tier: str) -> None:
        leader = self.horde_leader[horde_id]
        members = [self.row[m] for m in self.horde_members[horde_id] if m in self.row]
        world, situation = self._world(self.row[leader], player)
        world.update((self.ids[j], self._entity(j)) for j in members)
        start = time.monotonic()
        results = await _maybe(self.game.act_horde(leader, ActContext(world, situation)))
        end = time.monotonic()
        self._record(start, f"{tier}.horde_act", None, end)
        self.report.horde_members += len(results)
        decision = results.get(leader)
        if decision is not None:
            self._count_decision("horde_act", decision)
        if self.kept_lines["horde"] < self.config.samples and decision is not None and decision.raw:
            self.kept_lines["horde"] += 1
            names = Counter(r.action.name for r in results.values())
            self.report.lines.append(f"[{tier}] horde of {leader} ({len(results)} zombies) acts: "
                                     + ", ".join(f"{n} x{k}" for n, k in names.most_common()))

    async def _event(self, i: int, player: str, tier: str) -> None:
        kind, text = EVENTS[int(self.rng.integers(len(EVENTS)))]
        start = time.monotonic()
        await _maybe(self.game.event(self.ids[i], player, kind, text=text))
        self._record(start, f"{tier}.event", None, time.monotonic())

    def _world(self, i: int, player: str) -> tuple[dict[str, actions.Entity], str]:
        """The game state an act carries: the NPC, its nearest player, its two nearest NPCs, a body."""
        k = self.player_ids.index(player)
        gaps = np.linalg.norm(self.pos[:, :2] - self.pos[i, :2], axis=1)
        gaps[i] = np.inf
        neighbours = np.argsort(gaps)[:2]
        entities = [self._entity(i), actions.Entity(player, "player", tuple(map(float, self.players[k])))]
        entities += [self._entity(int(j)) for j in neighbours if np.isfinite(gaps[j])]
        body = tuple(map(float, self.pos[i] + np.array([1.0, 0.5, 0.0])))
        entities.append(actions.Entity(f"body-{i}", "npc", body, alive=False, archetype="ghoul"))
        world = {e.entity_id: e for e in entities}
        situation = (f"{player} is {self.distance[i]:.0f} m away. A body lies at your feet. "
                     f"{len(neighbours)} of your kind are near.")
        return world, situation

    def _entity(self, j: int) -> actions.Entity:
        zombie = bool(self.is_zombie[j])
        return actions.Entity(self.ids[j], "npc", tuple(map(float, self.pos[j])), archetype=self.archetype[j],
                              state="hunting" if zombie else "idle",
                              horde_id=int(self.horde[j]) if self.horde[j] >= 0 else None)


async def run_region(game, config: RegionConfig | None = None, *,
                     count_tokens: Callable[[str], int] | None = None) -> RegionReport:
    """Registers the region's NPCs on `game` (an AsyncGameClient or a client with the same methods), runs
    the traffic for config.duration_s, waits for the requests in flight and returns what was measured."""
    region = _Region(game, config or RegionConfig(), count_tokens)
    await region.register()
    return await region.run()


# ---------------------------------------------------------------------------------------------- output


def format_report(report: RegionReport) -> str:
    s = report.summary()
    c = report.config
    out = [f"region: {c.npcs} NPCs ({report.zombies} zombies, the rest vampires), "
           f"{c.players} players, {report.ticks} ticks in {s['traffic_s']:.0f} s of traffic "
           f"({report.late_ticks} late), {s['duration_s']:.1f} s with the drain"]
    out.append("latency (ms)      n   first p50   p95   p99 |  whole p50   p95   p99")
    for category, row in report.latencies().items():
        out.append(f"  {category:12s} {row['n']:5d}  {_ms(row['p50_ms'])} {_ms(row['p95_ms'])} "
                   f"{_ms(row['p99_ms'])} | {_ms(row['total_p50_ms'])} {_ms(row['total_p95_ms'])} "
                   f"{_ms(row['total_p99_ms'])}")
    out.append(f"  tick (re-tier + prefetch of promotions): p95 {_ms(s['tick_p95_ms'])}")
    out.append(f"throughput: {s['tokens_per_s']:.0f} tokens/s generated ({s['tokens']} tokens), "
               f"{s['requests_per_s']:.1f} requests/s ({s['llm_requests_per_s']:.1f}/s through the LLM)")
    mean = s["tier_counts_mean"]
    out.append(f"tiers: now {report.tier_counts}; mean gold {mean['gold']:.0f}, silver {mean['silver']:.0f}, "
               f"bronze {mean['bronze']:.0f}")
    out.append(f"errors: {s['errors']} (exceptions/timeouts {report.errors}, server worker errors "
               f"{s['server_worker_errors']})" + _counted(s["error_messages"]))
    out.append(f"degraded: {report.degraded}" + _counted(s["degraded_reasons"]))
    out.append(f"actions rejected by the validator (safe default used): {report.invalid_actions}"
               + _counted(s["invalid_reasons"]))
    out.append(f"hordes: {s['horde_acts']} horde acts (one decision of the leader each) gave "
               f"{s['horde_members']} zombie actions")
    out.append(f"throttled (max {c.max_inflight} in flight): {report.throttled}; "
               f"shed by the queues: {s['shed']}")
    counters = s["server_counters"]
    if counters:
        out.append("server counters: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    out.append("a few NPC lines (random weights: gibberish):")
    out += [f"  {line}" for line in report.lines]
    return "\n".join(out)


def _counted(reasons: dict[str, int]) -> str:
    return "".join(f"\n  {n} x {reason}" for reason, n in reasons.items())


def _ms(value: float | None) -> str:
    return "    -" if value is None else f"{value:5.0f}" if value >= 10 else f"{value:5.1f}"


def plot_latency(report: RegionReport, path: str | Path) -> Path:
    """A PNG: latency of every request over time (log scale), p50/p95/p99 per tier and type, tier counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = {"gold": "#d4a017", "silver": "#7f8c8d", "bronze": "#a0522d"}
    markers = {"talk": "o", "act": "s", "event": "^"}
    fig, (ax_time, ax_pct, ax_tiers) = plt.subplots(1, 3, figsize=(17, 5))
    for category in sorted({s.category for s in report.samples}):
        tier, kind = category.split(".", 1)
        rows = [s for s in report.samples if s.category == category]
        ax_time.scatter([s.at_s for s in rows], [max(s.first_ms, 0.01) for s in rows], s=8, alpha=0.5,
                        color=colors.get(tier, "k"), marker=markers.get(kind, "x"), label=category)
    ax_time.set(yscale="log", xlabel="seconds since start", ylabel="latency, ms (talk: first chunk)",
                title="every request")
    ax_time.legend(fontsize=7, markerscale=2)
    lat = report.latencies()
    names = list(lat)
    x = np.arange(len(names))
    for k, q in enumerate((50, 95, 99)):
        ax_pct.bar(x + (k - 1) * 0.27, [lat[n][f"p{q}_ms"] or 0 for n in names], 0.27, label=f"p{q}")
    ax_pct.set(xticks=x, yscale="log", ylabel="ms", title="p50 / p95 / p99 (talk: first chunk)")
    ax_pct.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax_pct.legend(fontsize=8)
    if report.timeline:
        t = np.array(report.timeline, dtype=float)
        for i, tier in enumerate(TIERS):
            ax_tiers.plot(t[:, 0], t[:, i + 1], color=colors[tier], label=tier)
    ax_tiers.set(xlabel="seconds since start", ylabel="NPCs", title="tiers")
    ax_tiers.legend(fontsize=8)
    s = report.summary()
    fig.suptitle(f"region of {report.config.npcs} NPCs, {report.config.players} players: "
                 f"{s['tokens_per_s']:.0f} tokens/s, {s['requests_per_s']:.1f} requests/s, "
                 f"errors {s['errors']}, degraded {s['degraded']} (demo model: random weights, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ local stack


def prepare_demo_model() -> tuple[Path, Path]:
    """The demo model (gpu_worker.demo's tiny random Qwen2 under .run/demo-model) and the region's random
    adapters (.run/region-adapters/<name>), built once."""
    from gpu_worker.demo import demo_model
    from gpu_worker.testing import build_adapter
    from memory.services import resolve_run_dir

    model = demo_model()
    folder = resolve_run_dir() / "region-adapters"
    for i, (name, rank) in enumerate(REGION_ADAPTERS.items()):
        if not (folder / name / "adapter_model.safetensors").is_file():
            tmp = folder / f".{name}.{os.getpid()}"
            build_adapter(model, tmp, r=rank, alpha=2 * rank, seed=100 + i)
            shutil.rmtree(folder / name, ignore_errors=True)
            os.replace(tmp, folder / name)
    return model, folder


SCHEDULER_MODES = ("process", "inprocess")


class LocalStack:
    """The whole stack on this host, torn down on exit: an npc-worker subprocess, the scheduler, memory on
    Redis and optionally npc-archiver (a subprocess) into PostgreSQL, in a 0700 temp folder of its own.

    scheduler="process" (the default: `make demo`, bench.region): an `npc-scheduler serve` subprocess on
    ipc://<folder>/scheduler.sock, given scheduler_config / server_config as a `--config` JSON file (the
    fields that differ from the defaults), its stderr in <log_dir>/region-scheduler.log, driven through
    plugin_bindings.remote.AsyncRemoteGameClient: game, scheduler and worker are three processes, as when
    deployed. scheduler="inprocess": SchedulerServer in this process behind plugin_bindings.AsyncGameClient,
    with its WorkerClient and MemoryStore here (tests reach into its state and counters).

    Attributes once entered: client (the game client), tokenizer, worker_ready; process: scheduler_proc,
    scheduler_ready, scheduler_endpoint; inprocess: server, worker (WorkerClient), memory.
    On exit, in this order: the client says GOODBYE (inprocess: the server closes); the scheduler gets
    SIGTERM, drains and exits (`scheduler_exit`: its exit code, 0 when clean); the worker is stopped; the
    archiver is given up to `archive_drain_s` to empty the outbox, then stopped (`archived`: its stats,
    `archived_rows`: the rows in <schema>.events); with `cleanup` the Redis keys of the prefix are deleted
    and the archive schema dropped."""

    def __init__(self, model_dir: str | Path, adapters_dir: str | Path, memory_config, *,
                 archive_schema: str | None = None, cleanup: bool = True, scheduler_config=None,
                 server_config=None, heartbeat_timeout_s: float = 5.0, archive_drain_s: float = 20.0,
                 log_dir: str | Path | None = None, worker_threads: int | None = None,
                 scheduler: str = "process", max_in_flight: int = 256, scheduler_drain_s: float = 20.0):
        if scheduler not in SCHEDULER_MODES:
            raise ValueError(f"scheduler must be one of {SCHEDULER_MODES}, got {scheduler!r}")
        if scheduler == "process":
            from memory.config import MemoryConfig

            given = replace(MemoryConfig(), key_prefix=memory_config.key_prefix,
                            cold_restore=memory_config.cold_restore)
            if memory_config != given:  # npc-scheduler serve takes --key-prefix and --no-cold-restore only
                raise ValueError("scheduler='process' passes only key_prefix and cold_restore of the "
                                 "MemoryConfig to npc-scheduler serve: use scheduler='inprocess' for others")
        self.model_dir, self.adapters_dir = Path(model_dir), Path(adapters_dir)
        self.memory_config = memory_config
        self.archive_schema = archive_schema
        self.cleanup = cleanup
        self.scheduler_config = scheduler_config
        self.server_config = server_config
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.archive_drain_s = archive_drain_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.scheduler = scheduler
        self.max_in_flight = max_in_flight  # process: the scheduler's bound on one client's requests
        self.scheduler_drain_s = scheduler_drain_s
        # torch threads of the worker (npc-worker serve --threads): all cores but one. The last core is left
        # to the scheduler and the game (here: this process; with scheduler="process" two processes, each
        # one asyncio thread mostly waiting on sockets), Redis and the archiver. Processes whose threads
        # together exceed the cores make torch's spinning threads 5-20x slower.
        self.worker_threads = worker_threads or max(1, (os.cpu_count() or 2) - 1)
        self.archived: dict = {}
        self.archived_rows: int | None = None
        self.scheduler_exit: int | None = None
        self._procs: list[subprocess.Popen] = []

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if text else 0

    async def __aenter__(self) -> LocalStack:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        from transformers import AutoTokenizer

        from memory.store import connect

        self._folder = tempfile.mkdtemp(prefix="npc-region-")
        os.chmod(self._folder, 0o700)
        self.worker_endpoint = f"ipc://{self._folder}/worker.sock"
        self.worker_proc = await asyncio.to_thread(self._start_worker, self.worker_endpoint)
        if self.archive_schema:
            self.archiver_proc = self._start_archiver()
        if self.scheduler == "process":
            self.scheduler_proc = self._spawn_scheduler()  # starts while this process loads its tokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.redis = connect(config=self.memory_config)  # archiver drain, cleanup (inprocess: memory)
        if self.scheduler == "process":
            from plugin_bindings.remote import AsyncRemoteGameClient

            self.scheduler_ready = await asyncio.to_thread(self._scheduler_ready_line)
            self.client = AsyncRemoteGameClient(self.scheduler_endpoint, timeout_s=60.0)
        else:
            from gpu_worker.client import ClientConfig, WorkerClient
            from memory.store import MemoryStore
            from plugin_bindings.client import AsyncGameClient
            from tier_scheduler.config import SchedulerConfig
            from tier_scheduler.server import SchedulerServer

            self.memory = MemoryStore(self.redis, self.memory_config)
            config = ClientConfig(heartbeat_timeout_s=self.heartbeat_timeout_s)
            self.worker = WorkerClient(self.worker_endpoint, config=config)
            await self.worker.connect()
            kwargs = {"server_config": self.server_config} if self.server_config else {}
            self.server = SchedulerServer(self.scheduler_config or SchedulerConfig(), self.memory,
                                          self.worker, self.tokenizer, resident=self._adapter_names(),
                                          **kwargs)
            self.client = AsyncGameClient(self.server)
        await self.client.__aenter__()

    def _adapter_names(self) -> list[str]:
        return sorted(p.name for p in self.adapters_dir.iterdir() if (p / "adapter_config.json").is_file())

    def _start_worker(self, endpoint: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "gpu_worker.worker", "serve", "--model", str(self.model_dir),
               "--endpoint", endpoint, "--adapters-dir", str(self.adapters_dir), "--log-level", "WARNING",
               "--threads", str(self.worker_threads)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        self._procs.append(proc)
        line = proc.stdout.readline()  # "npc-worker ready <endpoint> adapters=[...]" once it serves
        if not line.startswith("npc-worker ready"):
            raise RuntimeError(f"npc-worker did not start (exit code {proc.poll()}): {line!r}")
        self.worker_ready = line.strip()
        return proc

    def scheduler_settings(self) -> dict:
        """The `--config` JSON of the scheduler subprocess: the SchedulerConfig and ServerConfig fields that
        differ from their defaults."""
        from tier_scheduler.config import SchedulerConfig
        from tier_scheduler.server import ServerConfig

        out = {}
        for config, default in ((self.scheduler_config, SchedulerConfig()),
                                (self.server_config, ServerConfig())):
            for f in fields(default) if config is not None else ():
                if getattr(config, f.name) != getattr(default, f.name):
                    out[f.name] = getattr(config, f.name)
        return out

    def _spawn_scheduler(self) -> subprocess.Popen:
        from memory.services import redis_url

        folder = Path(self._folder)
        (folder / "scheduler.json").write_text(json.dumps(self.scheduler_settings(), indent=1) + "\n")
        self.scheduler_endpoint = f"ipc://{folder}/scheduler.sock"
        cmd = [sys.executable, "-m", "tier_scheduler.service", "serve", "--worker", self.worker_endpoint,
               "--endpoint", self.scheduler_endpoint, "--model", str(self.model_dir),
               "--redis-url", redis_url(), "--key-prefix", self.memory_config.key_prefix,
               "--config", str(folder / "scheduler.json"), "--max-in-flight", str(self.max_in_flight),
               "--drain-timeout", f"{self.scheduler_drain_s:g}",
               "--worker-heartbeat-timeout", f"{self.heartbeat_timeout_s:g}", "--log-level", "INFO",
               "--adapters", *self._adapter_names()]
        if not self.memory_config.cold_restore:
            cmd.append("--no-cold-restore")
        self.scheduler_log = (self.log_dir or folder) / "region-scheduler.log"
        # One asyncio thread does the scheduler's work: no library thread pools beside it (its tokenizer
        # imports torch).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.scheduler_log, "w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        self._procs.append(proc)
        return proc

    def _scheduler_ready_line(self) -> str:
        proc = self.scheduler_proc
        line = proc.stdout.readline()  # "npc-scheduler ready <endpoint> resident=[...]" once it serves
        if not line.startswith("npc-scheduler ready"):
            with contextlib.suppress(OSError):
                proc.wait(5)
            tail = ""
            with contextlib.suppress(OSError):
                tail = " | ".join(self.scheduler_log.read_text().strip().splitlines()[-3:])
            raise RuntimeError(f"npc-scheduler did not start (exit code {proc.poll()}): {line!r} {tail}")
        return line.strip()

    def _start_archiver(self) -> subprocess.Popen:
        from memory.services import database_url, redis_url

        cmd = [sys.executable, "-m", "memory.archiver", "--run", "--prefix", self.memory_config.key_prefix,
               "--schema", self.archive_schema, "--redis-url", redis_url(), "--database-url", database_url(),
               "--workers", "2"]
        if self.log_dir is None:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True)
        else:
            with open(self.log_dir / "region-archiver.log", "w") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        self._procs.append(proc)
        return proc

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            if getattr(self, "client", None) is not None:
                await self.client.__aexit__(None, None, None)  # remote: GOODBYE; inprocess: server.close()
        if getattr(self, "scheduler_proc", None) is not None:  # SIGTERM: it drains, closes, exits 0
            self.scheduler_exit = await asyncio.to_thread(_stop_process, self.scheduler_proc,
                                                          self.scheduler_drain_s + 15)
        if getattr(self, "memory", None) is not None:
            await self.memory.aclose()
        if getattr(self, "worker", None) is not None:
            with contextlib.suppress(Exception):
                await self.worker.close()
        if getattr(self, "worker_proc", None) is not None:
            await asyncio.to_thread(_stop_process, self.worker_proc)
        if getattr(self, "archiver_proc", None) is not None and getattr(self, "redis", None) is not None:
            await self._stop_archiver()
        if getattr(self, "redis", None) is not None:
            if self.cleanup:
                with contextlib.suppress(Exception):
                    keys = [k async for k in self.redis.scan_iter(match=self.memory_config.key_prefix + "*",
                                                                  count=1000)]
                    for chunk in range(0, len(keys), 1000):
                        await self.redis.delete(*keys[chunk:chunk + 1000])
            await self.redis.aclose()
        for proc in self._procs:  # whatever is left (a start that failed half-way)
            await asyncio.to_thread(_stop_process, proc)
        if getattr(self, "_folder", None):
            shutil.rmtree(self._folder, ignore_errors=True)

    async def _stop_archiver(self) -> None:
        from memory.events import outbox_stream

        stream = outbox_stream(self.memory_config.key_prefix)
        deadline = time.monotonic() + self.archive_drain_s
        with contextlib.suppress(Exception):
            while await self.redis.xlen(stream) and time.monotonic() < deadline \
                    and self.archiver_proc.poll() is None:
                await asyncio.sleep(0.1)
        proc = self.archiver_proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
            self.archived = json.loads(out.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
            self.archived = {}
        with contextlib.suppress(Exception):
            self.archived["outbox_left"] = int(await self.redis.xlen(stream))
        self.archived_rows = await self._archive_rows()

    async def _archive_rows(self) -> int | None:
        import asyncpg

        from memory.services import database_url

        try:
            conn = await asyncpg.connect(database_url(), timeout=5)
        except Exception:
            return None
        try:
            rows = await conn.fetchval(f"SELECT count(*) FROM {self.archive_schema}.events")
            if self.cleanup:
                await conn.execute(f"DROP SCHEMA IF EXISTS {self.archive_schema} CASCADE")
            return int(rows)
        except Exception:
            return None
        finally:
            await conn.close()


def _stop_process(proc: subprocess.Popen, wait_s: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after wait_s; its exit code (None: it could not be reaped)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def run_names() -> tuple[str, str]:
    """A Redis key prefix and a PostgreSQL schema of this run's own."""
    tag = uuid.uuid4().hex[:12]
    return f"npc-region:{tag}:", f"npc_region_{tag}"


def demo_scheduler_config():
    """SchedulerConfig's defaults, but 64 tokens for every act: a random model pads an action's JSON with
    whitespace (the grammar allows up to 8 characters between elements), so with the default 48 / 32 many
    of its actions would end on the length limit; a trained model writes the ~20 tokens an action needs."""
    from tier_scheduler.config import SchedulerConfig

    return SchedulerConfig(gold_act_max_tokens=64, silver_act_max_tokens=64)


async def run_local(config: RegionConfig, *, archive: bool = True, cleanup: bool = True,
                    scheduler: str = "process", worker_threads: int | None = None,
                    say: Callable[[str], None] = print) -> tuple[RegionReport, LocalStack]:
    """The whole stack on this host with the demo model: worker, scheduler (an `npc-scheduler serve`
    subprocess, or with scheduler="inprocess" a SchedulerServer here), memory, archiver; the region."""
    from memory.config import MemoryConfig
    from memory.services import resolve_run_dir

    model, adapters = await asyncio.to_thread(prepare_demo_model)
    prefix, schema = run_names()
    memory_config = MemoryConfig(key_prefix=prefix, cold_restore=False)  # no npc-restore runs here
    stack = LocalStack(model, adapters, memory_config, archive_schema=schema if archive else None,
                       cleanup=cleanup, scheduler_config=demo_scheduler_config(), log_dir=resolve_run_dir(),
                       scheduler=scheduler, max_in_flight=config.max_inflight + 16,
                       worker_threads=worker_threads)
    async with stack:
        say(f"worker: {stack.worker_ready} ({stack.worker_threads} torch threads)")
        if scheduler == "process":
            say(f"scheduler: {stack.scheduler_ready} (npc-scheduler serve, --config "
                f"{json.dumps(stack.scheduler_settings())}; log {stack.scheduler_log})")
        else:
            say("scheduler: SchedulerServer in this process (plugin_bindings.AsyncGameClient)")
        say(f"memory: Redis key prefix {prefix}" + (f"; npc-archiver -> PostgreSQL schema {schema}"
                                                    if archive else ""))
        say(f"simulating {config.npcs} NPCs and {config.players} players for {config.duration_s:g} s ...")
        report = await run_region(stack.client, config, count_tokens=stack.count_tokens)
    if scheduler == "process" and stack.scheduler_exit != 0:  # SIGTERM -> drain -> exit 0
        report.errors += 1
        report.error_messages[f"npc-scheduler exited with code {stack.scheduler_exit} on SIGTERM "
                              f"(see {stack.scheduler_log})"] += 1
    return report, stack


async def run_remote(endpoint: str, config: RegionConfig, *,
                     say: Callable[[str], None] = print) -> RegionReport:
    """The region against a running `npc-scheduler serve` (plugin_bindings.remote.AsyncRemoteGameClient):
    its worker, memory and archiver are whatever that scheduler was started with (its worker should hold
    REGION_ADAPTERS, or the stacks degrade and say so). NPC ids get a prefix of this run's own and are
    despawned at the end. Tokens are counted with the demo model's tokenizer when it is built here."""
    from plugin_bindings.remote import AsyncRemoteGameClient

    if not config.id_prefix:
        config = replace(config, id_prefix=f"r{uuid.uuid4().hex[:6]}-")
    count_tokens = None
    with contextlib.suppress(Exception):
        from memory.services import resolve_run_dir

        if (resolve_run_dir() / "demo-model" / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(resolve_run_dir() / "demo-model"))
            count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    async with AsyncRemoteGameClient(endpoint) as game:
        # The scheduler refuses a client's requests beyond its max_in_flight (OVERLOADED): leave room for
        # the tick and position updates that run beside the requests.
        limit = ((game.server_info or {}).get("limits") or {}).get("max_in_flight")
        if limit and config.max_inflight > limit - 4:
            config = replace(config, max_inflight=max(1, limit - 4))
        say(f"scheduler: {endpoint} (remote, {config.max_inflight} requests in flight at most); "
            f"NPC ids {config.id_prefix}*")
        say(f"simulating {config.npcs} NPCs and {config.players} players for {config.duration_s:g} s ...")
        return await run_region(game, config, count_tokens=count_tokens)


def archive_line(stack: LocalStack, kept: bool) -> str:
    a = stack.archived
    return (f"archive: npc-archiver wrote {a.get('archived', '?')} events ({stack.archived_rows} rows in "
            f"PostgreSQL, {a.get('outbox_left', '?')} left in the outbox)"
            + ("" if kept else "; the run's schema was dropped"))


# ------------------------------------------------------------------------------------------------- CLI


def add_region_arguments(parser: argparse.ArgumentParser, duration_s: float) -> None:
    parser.add_argument("--duration", type=float, default=duration_s, help="seconds of traffic")
    parser.add_argument("--npcs", type=int, default=RegionConfig.npcs)
    parser.add_argument("--players", type=int, default=RegionConfig.players)
    parser.add_argument("--max-inflight", type=int, default=RegionConfig.max_inflight,
                        help="requests in flight at most (bounded concurrency)")
    parser.add_argument("--seed", type=int, default=RegionConfig.seed)
    parser.add_argument("--no-archive", action="store_true", help="do not run npc-archiver")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's Redis keys and archive schema (default: removed at the end)")
    parser.add_argument("--remote", metavar="ENDPOINT", default=None,
                        help="drive a running `npc-scheduler serve` at ENDPOINT through the networked client "
                             "instead of starting worker + scheduler + archiver here")
    parser.add_argument("--inprocess", action="store_true",
                        help="run the scheduler in this process (SchedulerServer behind AsyncGameClient) "
                             "instead of an `npc-scheduler serve` subprocess")
    parser.add_argument("--worker-threads", type=int, default=None,
                        help="torch threads of the npc-worker subprocess (default: cores - 1, at least 1)")


def scheduler_mode(args: argparse.Namespace) -> str:
    return "inprocess" if args.inprocess else "process"


def config_from_args(args: argparse.Namespace, **overrides) -> RegionConfig:
    return RegionConfig(**{"npcs": args.npcs, "players": args.players, "duration_s": args.duration,
                           "max_inflight": args.max_inflight, "seed": args.seed, **overrides})


@contextlib.contextmanager
def services(say: Callable[[str], None]):
    """REDIS_URL / DATABASE_URL answer for the block (memory.services: the server already at the URL, else an
    embedded one, started here and stopped at the end unless KEEP_SERVICES=1)."""
    from memory import services as svc

    result = svc.ensure_services(report=say)
    os.environ["REDIS_URL"], os.environ["DATABASE_URL"] = result["REDIS_URL"], result["DATABASE_URL"]
    try:
        yield result
    finally:
        if result["started"] and os.environ.get("KEEP_SERVICES") != "1":
            svc.stop_embedded(names=result["started"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tier_scheduler.region",
                                     description=__doc__.splitlines()[0])
    add_region_arguments(parser, 60.0)
    parser.add_argument("--plot", type=Path, default=None,
                        help="where to write the latency PNG (default .run/region-latency.png)")
    args = parser.parse_args(argv)
    from memory.services import resolve_run_dir

    config = config_from_args(args)
    print("== region: npc-worker + npc-scheduler + memory (Redis) + npc-archiver (PostgreSQL), NPCs and "
          "players" + (" (the scheduler in this process)" if args.inprocess and not args.remote else ""))
    print(f"NOTE: {RANDOM_WEIGHTS_NOTE}")
    stack = None
    if args.remote:
        report = asyncio.run(run_remote(args.remote, config))
    else:
        with services(print):
            report, stack = asyncio.run(run_local(config, archive=not args.no_archive, cleanup=not args.keep,
                                                  scheduler=scheduler_mode(args),
                                                  worker_threads=args.worker_threads))
    print(format_report(report))
    if stack is not None and not args.no_archive:
        print(archive_line(stack, args.keep))
    plot = plot_latency(report, args.plot or resolve_run_dir() / "region-latency.png")
    print(f"latency plot: {plot}")
    print("NOTE: random weights (see above). DESIGN.md's p95 targets (150 ms for 100 Gold NPCs, 250 ms for "
          "500 NPCs) are for a GPU with a 7B model; these figures are the tiny CPU model's, on this machine.")
    errors = report.total_errors()
    print(f"region: {'done, 0 errors' if errors == 0 else f'{errors} ERRORS'}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
