"""Redis outage and recovery, on a Redis server this test starts, stops and restarts itself (never the shared
one): the hot path keeps serving from the hot cache, writes wait in a bounded buffer (overflow counted) and
reach Redis in order when it returns.

The embedded server keeps no data across a restart (no RDB/AOF), so after recovery Redis holds exactly what
the store flushed from its buffer: that makes "everything buffered arrived, in order" directly checkable.
"""

import asyncio
import os
import shutil
import tempfile

import pytest

from memory import services
from memory.cards import RelationshipCard
from memory.config import MemoryConfig
from memory.events import GameEvent, OutboxEvent, outbox_stream
from memory.store import MemoryStore, MemoryUnavailable, connect
from memory.testing import DIALOGUE, FakeClock

PREFIX = "npc-test:outage:"


@pytest.fixture
def own_redis():
    # Not pytest's tmp_path: keep the run dir world-traversable as services expects (mkdtemp is 0700).
    run_dir = tempfile.mkdtemp(prefix="npc-mem-outage-", dir="/tmp")
    os.chmod(run_dir, 0o755)
    server = {"run_dir": run_dir, "record": services.start_redis(run_dir)}
    try:
        yield server
    finally:
        services.stop_redis(server["record"])
        shutil.rmtree(run_dir, ignore_errors=True)


async def stop(server):
    await asyncio.to_thread(services.stop_redis, server["record"])


async def restart(server):
    port = server["record"]["port"]
    server["record"] = await asyncio.to_thread(services.start_redis, server["run_dir"], port)


async def until_up(store, timeout_s=10.0):
    for _ in range(int(timeout_s / 0.02)):
        if not store.redis_down:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the store never saw Redis come back: {store.stats()}")


def run(server, body, **config_kwargs):
    async def main():
        config = MemoryConfig(key_prefix=PREFIX, retry_interval_s=0.05, **config_kwargs)
        client = connect(server["record"]["url"], config)
        store = MemoryStore(client, config, clock=FakeClock())
        try:
            return await body(store, client)
        finally:
            await store.aclose()
            await client.aclose()

    return asyncio.run(main())


async def turns(store, npc, lines):
    return [await store.record_turn(npc, "p1", speaker, text) for speaker, text in lines]


def test_outage_serves_hot_buffers_writes_and_flushes_them_in_order(own_redis):
    async def body(store, client):
        await store.prefetch("vlad", "p1")  # the conversation start loads the pair into the hot cache
        await turns(store, "vlad", DIALOGUE[:4])
        await store.put_card(RelationshipCard("vlad", "p1", trust=20))
        await stop(own_redis)

        # The first write finds Redis gone; it and every later write wait in the buffer.
        during = await turns(store, "vlad", DIALOGUE[4:8])
        assert store.redis_down and store.stats()["buffered_writes"] == 4
        hot = await store.prefetch("vlad", "p1")
        assert hot.source == "hot" and [t.text for t in hot.turns] == [text for _, text in DIALOGUE[:8]]
        assert hot.relationship.trust == 20
        memory_text = await store.prompt_memory("vlad", "p1", "the dagger")
        assert "Trust: +20/100" in memory_text and DIALOGUE[7][1] in memory_text

        # A pair the hot cache does not hold: served empty ("degraded"), and its cards are not guessed.
        cold = await store.prefetch("ghoul", "p1")
        assert cold.source == "degraded" and cold.turns == () and cold.relationship is None
        with pytest.raises(MemoryUnavailable, match="Redis is unreachable"):
            await store.apply_event("ghoul", "p1", GameEvent("gift", "bread"))
        during += await turns(store, "ghoul", [("player", "Anyone there?")])

        # Memory events of the loaded pair still apply (its cards are known) and are buffered with the rest.
        outcome = await store.apply_event("vlad", "p1", GameEvent("gift", "a silver ring"))
        ended = await store.end_session("vlad", "p1")
        assert ended.method == "extractive" and ended.summary_text
        stats = store.stats()
        assert stats["buffered_writes"] == 7 and stats["dropped_events"] == 0
        assert stats["buffered_events"] >= 5 + 4 + 2  # turns; event, card, fact, emotion; summary, emotion
        assert stats["degraded_prefetches"] == 2  # the ghoul prefetch, and apply_event's attempt
        buffered_events = stats["buffered_events"]

        await restart(own_redis)
        await until_up(store)
        stats = store.stats()
        assert stats["buffered_writes"] == 0 and stats["flushed_writes"] == 7 and stats["dropped_events"] == 0

        # Everything buffered arrived, in the order it was written.
        events = [OutboxEvent.from_fields(f) for _, f in await client.xrange(outbox_stream(PREFIX))]
        assert len(events) == buffered_events
        assert [e.event_id for e in events if e.kind == "turn"] == [t.turn_id for t in during]
        assert [e.kind for e in events[:10]] == ["turn"] * 5 + ["event", "card", "fact", "emotion", "summary"]
        assert events[-1].kind == "emotion" and events[-1].payload == ended.emotion.to_dict()
        assert (await store.get_card("vlad", "p1", "relationship")) == outcome.relationship
        assert await client.zcard(f"{PREFIX}turns:vlad:p1") == 0  # the session end folded them
        assert await client.zcard(f"{PREFIX}sum:vlad:p1") == 1

        # The degraded pair loads from Redis now that it is back, with the turn recorded during the outage.
        store.hot.clear()
        ghoul = await store.prefetch("ghoul", "p1")
        assert ghoul.source == "redis" and [t.text for t in ghoul.turns] == ["Anyone there?"]

    run(own_redis, body)


def test_buffer_overflow_drops_the_oldest_and_counts_it(own_redis):
    async def body(store, client):
        await store.prefetch("vlad", "p1")
        await stop(own_redis)
        lines = [("player", f"Message {i}.") for i in range(8)]
        written = await turns(store, "vlad", lines)
        stats = store.stats()
        assert (stats["buffered_writes"], stats["dropped_writes"], stats["dropped_events"]) == (5, 3, 3)

        await restart(own_redis)
        await until_up(store)
        events = [OutboxEvent.from_fields(f) for _, f in await client.xrange(outbox_stream(PREFIX))]
        assert [e.event_id for e in events] == [t.turn_id for t in written[3:]]  # the newest 5, in order
        assert store.stats()["dropped_events"] == 3  # still reported after recovery

    run(own_redis, body, buffer_max_writes=5)


def test_a_read_discovers_the_outage_and_a_ping_ends_it(own_redis):
    async def body(store, client):
        await stop(own_redis)
        context = await store.prefetch("vlad", "p1")
        assert context.source == "degraded" and store.redis_down
        await restart(own_redis)
        await until_up(store)  # nothing was buffered: the flusher's PING alone brings Redis back
        assert (await store.prefetch("vlad", "p1")).source == "redis"
        assert store.stats()["redis_errors"] >= 1 and store.stats()["flushed_writes"] == 0

    run(own_redis, body)
