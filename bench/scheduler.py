"""Scheduler policy costs: re-tiering a region per tick, and the per-request overhead of queueing, batching
and prompt assembly. Plain Python/numpy on the CPU, no model, no worker.

    python -m bench.scheduler            # rich table
    python -m bench.scheduler --json     # one JSON object on the last line of stdout
    python -m bench.scheduler --quick    # fewer ticks and requests, a smoke run

  retier     one tick of TierState.tick for 1,000 NPCs and 64 players on a 600 m x 600 m region: nearest-
             player distance, hysteresis, quest and relationship overrides (2% and 10% of NPCs), replies in
             progress (5%), Gold/Silver caps. Players walk (1.5 m per tick, a new heading now and then)
             so tiers change from tick to tick. Median and p99 over `ticks` ticks, in ms.
  overhead   per request, in microseconds: build_prompt (Gold: persona, identity, two memory cards, 5 facts,
             a summary, a 12-turn window; Silver: cards and a few turns) + PieceTokenizer.encode with a
             TRIVIAL tokenizer (UTF-8 bytes; the cost of a real tokenizer is excluded: the per-piece cache
             means a turn only encodes its new pieces) + RequestQueues.push + next_batch packing (64
             requests per batch). Gold 1/3, Silver 2/3 of the requests.
  hordes     cluster_hordes on 500 zombies (ms), and fan_out + validation per horde member (us).
`load_avg_1m` records how busy the machine was: on a shared 2-core machine, other work shows in p99.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from bench.common import emit, log, median, parse_args, percentile
from memory.cards import Mark, Promise, Quest, QuestCard, RelationshipCard
from memory.records import Fact, Summary, new_id
from tier_scheduler.actions import Entity, validate_action
from tier_scheduler.config import SchedulerConfig, Tier
from tier_scheduler.hordes import cluster_hordes, fan_out
from tier_scheduler.prompts import PERSONAS, Line, PieceTokenizer, build_prompt, render_identity
from tier_scheduler.queues import Request, RequestQueues
from tier_scheduler.tiers import TierState

TARGETS = {"retier_1000_ms": "<= 1"}
NOW = 1_700_000_000.0


@dataclass(frozen=True)
class Sizes:
    npcs: int = 1000
    players: int = 64
    region_m: float = 600.0
    ticks: int = 3000
    requests: int = 20_000
    conversations: int = 256
    zombies: int = 500


QUICK = Sizes(ticks=300, requests=2_000)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    sizes = QUICK if args.quick else Sizes()
    result = {**retier_section(sizes), **overhead_section(sizes), **horde_section(sizes),
              "load_avg_1m": os.getloadavg()[0], "tokenizer": "trivial (utf-8 bytes), cached per piece",
              **asdict(sizes), "targets": TARGETS}
    emit(result, args, title="bench.scheduler (tiers, queues, prompts, hordes)")
    return result


# ---------------------------------------------------------------------------------------------- retier


def retier_section(sizes: Sizes) -> dict:
    log(f"re-tiering {sizes.npcs} NPCs x {sizes.players} players for {sizes.ticks} ticks")
    rng = np.random.default_rng(0)
    config = SchedulerConfig()
    npcs = rng.uniform(0, sizes.region_m, (sizes.npcs, 3)).astype(np.float32)
    npcs[:, 2] = 0.0
    players = rng.uniform(0, sizes.region_m, (sizes.players, 3)).astype(np.float32)
    players[:, 2] = 0.0
    heading = rng.uniform(0, 2 * np.pi, sizes.players)
    forced = np.where(rng.random(sizes.npcs) < 0.02, rng.integers(0, 2, sizes.npcs), -1)
    relationship = np.where(rng.random(sizes.npcs) < 0.10, 80, 0)
    state = TierState(config, sizes.npcs)
    times, transitions, counts = [], [], {}
    for _ in range(sizes.ticks):
        heading += np.where(rng.random(sizes.players) < 0.05, rng.normal(0, 1.5, sizes.players), 0.0)
        players[:, 0] = np.clip(players[:, 0] + 1.5 * np.cos(heading), 0, sizes.region_m)
        players[:, 1] = np.clip(players[:, 1] + 1.5 * np.sin(heading), 0, sizes.region_m)
        replying = rng.random(sizes.npcs) < 0.05
        start = time.perf_counter()
        update = state.tick(npcs, players, forced=forced, relationship=relationship, replying=replying)
        times.append(time.perf_counter() - start)
        transitions.append(len(update.promoted) + len(update.demoted))
        counts = update.counts()
    warm = times[len(times) // 10:]  # the first ticks pay numpy's and the allocator's warm-up
    ms = [t * 1000 for t in warm]
    return {"retier_1000_ms": median(ms), "retier_1000_p99_ms": percentile(ms, 99),
            "retier_transitions_per_tick": float(np.mean(transitions[len(transitions) // 10:])),
            "tier_counts": counts}


# -------------------------------------------------------------------------------------------- overhead


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def conversation_inputs(sizes: Sizes) -> list[dict]:
    """Per NPC: the memory a prompt shows (cards, facts, summary) and a 12-turn window."""
    out = []
    for i in range(sizes.conversations):
        npc = f"npc-{i}"
        relationship = RelationshipCard(npc, "player-1", trust=30, affinity=10,
                                        promises=(Promise("find the amulet", NOW),),
                                        gifts=(Mark("a silver ring", NOW),), last_interaction=NOW, revision=4)
        quest = QuestCard(npc, "player-1", quests=(Quest("q1", "The lost amulet", NOW,
                                                         (Mark("found the crypt", NOW),)),), revision=2)
        facts = [Fact(f"The player told me fact number {k} about the old crypt.", 5, NOW) for k in range(5)]
        turns = [Line("player" if k % 2 == 0 else "npc", f"Line {k} of our talk about the amulet.")
                 for k in range(12)]
        out.append(dict(persona=PERSONAS["vampire"], identity=render_identity(f"Npc {i}", "vampire", "old"),
                        relationship=relationship, quest=quest, facts=facts,
                        summary=Summary("We spoke about the amulet. " * 12, NOW, new_id(), 12), turns=turns))
    return out


def overhead_section(sizes: Sizes) -> dict:
    log(f"{sizes.requests} requests: prompt + trivial tokenization + push + pack")
    config = SchedulerConfig()
    inputs = conversation_inputs(sizes)
    pieces = PieceTokenizer(ByteTokenizer())
    queues = RequestQueues(config)
    times = {"prompt": 0.0, "tokenize": 0.0, "queue": 0.0}
    now = 0.0
    for i in range(sizes.requests):
        tier = Tier.GOLD if i % 3 == 0 else Tier.SILVER
        context = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        prompt = build_prompt(config, tier, "talk", new_input=f"What about question {i}?", **context)
        t1 = time.perf_counter()
        ids = pieces.encode(prompt)
        t2 = time.perf_counter()
        queues.push(Request(f"r{i}", f"npc-{i % len(inputs)}", tier, "talk", len(ids), payload=ids), now)
        if len(queues) >= config.batch_max_requests:
            queues.next_batch(now)
        t3 = time.perf_counter()
        times["prompt"] += t1 - t0
        times["tokenize"] += t2 - t1
        times["queue"] += t3 - t2
        now += 0.0001
    per = {k: v / sizes.requests * 1e6 for k, v in times.items()}
    return {"overhead_us_per_request": sum(per.values()), "prompt_us": per["prompt"],
            "tokenize_trivial_us": per["tokenize"], "queue_us": per["queue"],
            "piece_cache_hit_rate": pieces.hits / max(pieces.hits + pieces.misses, 1)}


# ---------------------------------------------------------------------------------------------- hordes


def horde_section(sizes: Sizes) -> dict:
    log(f"hordes of {sizes.zombies} zombies")
    rng = np.random.default_rng(1)
    centres = rng.uniform(0, sizes.region_m, (25, 2))
    positions = centres[rng.integers(0, 25, sizes.zombies)] + rng.normal(0, 6, (sizes.zombies, 2))
    cluster_ms = [t * 1000 for t in _repeat(lambda: cluster_hordes(positions, 8.0, 3), 50)]
    hordes = cluster_hordes(positions, 8.0, 3)
    ids = [f"z{i}" for i in range(sizes.zombies)]
    world = {ids[i]: Entity(ids[i], "npc", tuple(positions[i]), archetype="zombie", state="hunting",
                            horde_id=int(hordes.labels[i])) for i in range(sizes.zombies)}
    members = sum(len(h.members) for h in hordes.hordes)
    start = time.perf_counter()
    for horde in hordes.hordes:
        leader = ids[horde.leader]
        decision = validate_action(leader, {"action": "follow_horde", "target": "none"}, world).action
        fan_out(horde, decision, ids, world, seed=0, tick=1)
    fan_out_us = (time.perf_counter() - start) / max(members, 1) * 1e6
    return {"hordes_500_ms": median(cluster_ms), "hordes": len(hordes.hordes),
            "fan_out_us_per_member": fan_out_us}


def _repeat(fn, n: int) -> list[float]:
    fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


if __name__ == "__main__":
    main()
