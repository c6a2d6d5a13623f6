"""Memory tiers: conversation-start prefetch for 1,000 NPCs, Redis round trips, hot-cache lookups.

    python -m bench.memory            # rich table
    python -m bench.memory --json     # one JSON object on the last line of stdout
    python -m bench.memory --quick    # 200 NPCs, fewer rounds

Against the Redis at REDIS_URL, under a key prefix of its own (npc-bench:<uuid>:, deleted at the end):
  seed       one player and N NPCs, each pair holding a full 30-day window: both cards, a 16-turn open
             session, 3 summaries of 600 chars, 10 facts, 8 emotion points (written straight through the
             Nearline command builders in large pipelines, not timed).
  prefetch   a conversation start per NPC on an empty hot cache: MemoryStore.prefetch, ONE pipelined round
             trip of 6 reads; `rounds` passes over the N NPCs (hot cache cleared before each), per-call ms.
             Also prefetch_many of all N at once (one round trip) as a scheduler tick would.
  redis      per-call ms of a turn write (record_turn on a hot entry: one MULTI of ZADD, trims, PEXPIRE and
             the outbox XADD) and of a read (the prefetch misses above); redis_p95_ms is the worse p95.
  hot        per-call ms of prefetch on a hot hit (no I/O), random NPCs among the N.
  unseen     per-call ms of prefetch for N pairs Redis has nothing of (players the NPCs never met, or met
             more than 30 days ago): the same one round trip, plus a cold-restore request XADDed in the
             background; the conversation start never waits for it (or for PostgreSQL).
  archive    merged in from bench/memory_archive.py (`archive_results(args) -> dict`) when that module exists.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time
import uuid
from dataclasses import asdict, dataclass

from bench.common import emit, log, parse_args, summarize_ms
from memory.cards import Mark, Promise, Quest, QuestCard, RelationshipCard, serialize_card
from memory.config import MemoryConfig
from memory.nearline import Nearline, delete_keys
from memory.records import EmotionPoint, Fact, Summary, Turn, new_id
from memory.services import redis_url
from memory.store import MemoryStore, connect

TARGETS = {"prefetch_p95_ms": "<= 10", "redis_p95_ms": "<= 5", "hot_p99_ms": "<= 1"}
PLAYER = "p1"


@dataclass(frozen=True)
class Sizes:
    npcs: int = 1000
    rounds: int = 3  # passes of cold prefetches over all NPCs
    writes: int = 3000  # timed record_turn calls
    hot_lookups: int = 100_000
    warmup: int = 100


QUICK = Sizes(npcs=200, rounds=2, writes=500, hot_lookups=20_000, warmup=20)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    sizes = QUICK if args.quick else Sizes()
    result = {"redis_url": redis_url()} | asyncio.run(memory_results(sizes))
    archive = archive_results(args)
    targets = {**TARGETS, **archive.pop("targets", {})}
    result |= archive | asdict(sizes) | {"targets": targets}
    emit(result, args, title="bench.memory (hot cache, Redis window)")
    return result


def archive_results(args) -> dict:
    """The archive half (archive_events_per_s, lost_events) from bench/memory_archive.py, when present."""
    if importlib.util.find_spec("bench.memory_archive") is None:
        log("bench/memory_archive.py not found: no archive keys")
        return {}
    from bench import memory_archive

    return memory_archive.archive_results(args) | {"targets": memory_archive.TARGETS}


async def memory_results(sizes: Sizes) -> dict:
    config = MemoryConfig(key_prefix=f"npc-bench:{uuid.uuid4().hex}:", hot_max_entries=2 * sizes.npcs)
    client = connect(config=config)
    store = MemoryStore(client, config)
    npcs = [f"npc{i:05d}" for i in range(sizes.npcs)]
    try:
        await client.ping()
        log(f"seeding {len(npcs)} NPC x player windows under {config.key_prefix}")
        await seed(client, config, npcs, store.clock())
        result = await prefetch_section(store, npcs, sizes)
        result |= await write_section(store, npcs, sizes, result.pop("_read_seconds"))
        result |= await hot_section(store, npcs, sizes)
        result |= await unseen_section(store, npcs)
    finally:
        await store.aclose()
        await delete_keys(client, config.key_prefix)
        await client.aclose()
    return result


# -------------------------------------------------------------------------------------------------- seed


def pair_window(npc: str, now: float, rng: random.Random) -> tuple[list, dict]:
    """(cards, {kind: records}) of one full window: what a long-standing relationship holds."""
    day = 86_400.0
    promises = tuple(Promise(f"promise {i} about the old mill", now - i * day) for i in range(3))
    gifts = tuple(Mark(f"gift {i}: a carved wooden charm", now - i * day) for i in range(3))
    rel = RelationshipCard(npc, PLAYER, trust=rng.randint(-50, 80), affinity=rng.randint(-50, 80),
                           promises=promises, gifts=gifts, last_interaction=now - 3600)
    quest = QuestCard(npc, PLAYER, quests=(Quest("amulet", "Find the Moon Amulet", now - 5 * day,
                                                 milestones=(Mark("found the crypt", now - 2 * day),)),))
    session = new_id()
    records = {
        "turns": [Turn("player" if i % 2 == 0 else "npc", f"Turn {i} of an ongoing talk about the amulet, "
                       "the hunters and the river village.", now - 600 + 10 * i, session, seq=i)
                  for i in range(16)],
        "sum": [Summary("s" * 600, now - (i + 1) * 3 * day, new_id(), 14) for i in range(3)],
        "facts": [Fact(f"Fact {i}: the player mentioned the hunters' captain and the silver dagger.",
                       rng.randint(3, 9), now - i * day) for i in range(10)],
        "emo": [EmotionPoint(rng.uniform(-1, 1), rng.uniform(0, 1), now - i * day) for i in range(8)],
    }
    return [rel, quest], records


async def seed(client, config: MemoryConfig, npcs: list[str], now: float, chunk: int = 50) -> None:
    nearline, rng = Nearline(config), random.Random(0)
    for start in range(0, len(npcs), chunk):
        async with client.pipeline(transaction=False) as pipe:
            for npc in npcs[start:start + chunk]:
                for cmd in window_cmds(nearline, npc, now, rng):
                    pipe.execute_command(*cmd)
            await pipe.execute()


def window_cmds(nearline: Nearline, npc: str, now: float, rng: random.Random) -> list[tuple]:
    cards, records = pair_window(npc, now, rng)
    cmds = [c for card in cards for c in nearline.card_cmds(card, serialize_card(card))]
    for kind, items in records.items():
        key = nearline.key(kind, npc, PLAYER)
        cmds.append(("ZADD", key, *[x for r in items for x in (repr(r.ts), r.to_json())]))
        cmds.append(("PEXPIRE", key, nearline.idle_ms))
    return cmds


# ---------------------------------------------------------------------------------------------- sections


async def prefetch_section(store: MemoryStore, npcs: list[str], sizes: Sizes) -> dict:
    for npc in npcs[:sizes.warmup]:  # connections and code paths warm; not counted
        await store.prefetch(npc, PLAYER)
    seconds = []
    for _ in range(sizes.rounds):
        store.hot.clear()
        for npc in npcs:
            start = time.perf_counter()
            context = await store.prefetch(npc, PLAYER)
            seconds.append(time.perf_counter() - start)
            assert context.source == "redis" and len(context.turns) == 16 and len(context.facts) == 10
    store.hot.clear()
    start = time.perf_counter()
    contexts = await store.prefetch_many([(npc, PLAYER) for npc in npcs])
    batch_s = time.perf_counter() - start
    assert all(c.source == "redis" for c in contexts)
    ms = summarize_ms(seconds)
    log(f"prefetch: {len(seconds)} cold conversation starts, p95 {ms['p95']:.3f} ms")
    return {"prefetch_p50_ms": ms["p50"], "prefetch_p95_ms": ms["p95"], "prefetch_p99_ms": ms["p99"],
            "prefetch_many_ms": batch_s * 1000, "prefetch_many_per_npc_ms": batch_s * 1000 / len(npcs),
            "_read_seconds": seconds}


async def write_section(store: MemoryStore, npcs: list[str], sizes: Sizes, read_seconds: list[float]) -> dict:
    rng = random.Random(1)
    seconds = []
    for i in range(sizes.writes):
        npc = npcs[rng.randrange(len(npcs))]
        start = time.perf_counter()
        await store.record_turn(npc, PLAYER, "player" if i % 2 == 0 else "npc", f"Bench line {i}.")
        seconds.append(time.perf_counter() - start)
    assert store.stats()["buffered_writes"] == 0, "Redis went away during the benchmark"
    write, read = summarize_ms(seconds), summarize_ms(read_seconds)
    log(f"redis: write p95 {write['p95']:.3f} ms, read p95 {read['p95']:.3f} ms")
    return {"redis_write_p50_ms": write["p50"], "redis_write_p95_ms": write["p95"],
            "redis_read_p95_ms": read["p95"], "redis_p95_ms": max(write["p95"], read["p95"])}


async def hot_section(store: MemoryStore, npcs: list[str], sizes: Sizes) -> dict:
    """Hot hits: awaiting a prefetch that never suspends costs no event-loop round, as in an NPC actor."""
    rng = random.Random(2)
    order = [npcs[rng.randrange(len(npcs))] for _ in range(sizes.hot_lookups)]
    seconds = []
    for npc in order:
        start = time.perf_counter()
        context = await store.prefetch(npc, PLAYER)
        seconds.append(time.perf_counter() - start)
        if context.source != "hot":
            raise AssertionError(f"{npc} was not hot ({context.source})")
    ms = summarize_ms(seconds)
    log(f"hot: {len(seconds)} lookups, p99 {ms['p99'] * 1000:.1f} us")
    return {"hot_p50_ms": ms["p50"], "hot_p99_ms": ms["p99"], "hot_entries": len(store.hot)}


async def unseen_section(store: MemoryStore, npcs: list[str]) -> dict:
    """Conversation starts with a player Redis knows nothing of: each asks for a cold restore."""
    seconds = []
    for npc in npcs:
        start = time.perf_counter()
        context = await store.prefetch(npc, "stranger")
        seconds.append(time.perf_counter() - start)
        if not context.restore_pending:
            raise AssertionError(f"{npc} x stranger did not ask for a cold restore")
    await store.drain()
    ms = summarize_ms(seconds)
    log(f"unseen: {len(seconds)} starts asking for a restore, p95 {ms['p95']:.3f} ms")
    return {"prefetch_unseen_p95_ms": ms["p95"], "restores_requested": store.stats()["restores_requested"]}


if __name__ == "__main__":
    main()
