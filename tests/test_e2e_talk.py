"""End to end through real processes (issue 7): npc-worker subprocess on the tiny Qwen2 fixture, the scheduler
core in this process, MemoryStore on the real Redis (own key prefix), the archiver into the real PostgreSQL
(own schema). talk -> streamed reply -> turn in the hot cache and Redis -> archived row in PostgreSQL; act
returns only valid actions; Bronze barks without the worker; a demotion never cuts a reply.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import numpy as np
import pytest

from gpu_worker.client import ClientConfig, WorkerClient
from memory import services
from memory.archiver import Archiver, ArchiverConfig
from memory.config import MemoryConfig
from memory.store import MemoryStore, connect
from plugin_bindings import ActContext, AsyncGameClient, GameClient, TalkResult
from tests.test_worker import serve_adapters
from tier_scheduler import actions, prompts
from tier_scheduler.config import SchedulerConfig, Tier
from tier_scheduler.server import EMOTIONS, SchedulerServer, ServerConfig

PLAYER = "player-1"
NEAR, FAR = (0.0, 0.0, 0.0), (5_000.0, 0.0, 0.0)
# Registry-style names served by the worker, each a fixture adapter (random weights, the shapes are real).
ADAPTER_FILES = {"vampire.dialogue_style": "all_r8", "vampire.action_policy": "attn_r4",
                 "zombie.action_policy": "mlp_r16"}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def worker_endpoint(qwen2_dir, adapters, tmp_path_factory):
    yield from serve_adapters(qwen2_dir, adapters, tmp_path_factory.mktemp("e2e-adapters"), ADAPTER_FILES)


async def _sql(query: str, *args) -> list:
    conn = await asyncpg.connect(services.database_url())
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def _memory_config(prefix: str) -> MemoryConfig:
    # No cold restore: its open request would make prefetch skip the hot cache, which this test checks.
    return MemoryConfig(key_prefix=prefix, cold_restore=False)


async def _with_server(endpoint, tokenizer, prefix, fn, config: SchedulerConfig | None = None, *,
                       resident=frozenset(ADAPTER_FILES), **server_kwargs):
    """Runs fn(server, worker, memory) with everything connected, and closes it all afterwards (also used by
    tests/test_server_features.py)."""
    redis_client = connect(config=_memory_config(prefix))
    memory = MemoryStore(redis_client, _memory_config(prefix))
    # A generous heartbeat timeout: a loaded machine can be slow to schedule the worker at all.
    async with WorkerClient(endpoint, config=ClientConfig(heartbeat_timeout_s=5.0)) as worker:
        server = SchedulerServer(config or SchedulerConfig(), memory, worker, tokenizer, resident=resident,
                                 **server_kwargs)
        await server.start()
        try:
            return await fn(server, worker, memory)
        finally:
            await server.close()
            await memory.aclose()
            await redis_client.aclose()


def run(coro, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def _talk(server, npc_id: str, text: str) -> tuple[list[str], TalkResult]:
    items = [item async for item in server.talk(npc_id, PLAYER, text)]
    assert isinstance(items[-1], TalkResult) and all(isinstance(i, str) for i in items[:-1])
    return items[:-1], items[-1]


# ---------------------------------------------------------------------------------------------- tests


def test_talk_streams_records_and_archives(worker_endpoint, tokenizer, names):
    prefix, schema = names
    npc = "vamp-e2e"

    async def go(server, worker, memory):
        server.register_npc(npc, "vampire", "nosferatu", position=(3.0, 0.0, 0.0), name="Mirela")
        update = await server.tick({PLAYER: NEAR})
        assert server.actor(npc).tier == Tier.GOLD and list(update.promoted_gold) == [0]
        assert server.counters["prefetches"] == 1
        await asyncio.gather(*server._background)  # the prefix warm-up runs off the tick
        assert server.counters["warmed"] == 1 and server.counters["worker_errors"] == 0
        chunks, result = await _talk(server, npc, "Good evening. Did you find my amulet?")
        hot = await memory.prefetch(npc, PLAYER)
        fresh = await MemoryStore(memory.client, _memory_config(prefix)).prefetch(npc, PLAYER)  # no hot entry
        return chunks, result, hot, fresh

    chunks, result, hot, fresh = run(_with_server(worker_endpoint, tokenizer, prefix, go))
    assert chunks and all(chunks)
    assert result.text == prompts.one_line("".join(chunks))
    assert result.tier == "gold" and result.emotion in EMOTIONS
    if not result.bark:  # an empty sample of the random model falls back to a (degraded) bark
        assert not result.degraded, result.reason
        assert result.finish_reason in ("stop", "length")
    said = [("player", "Good evening. Did you find my amulet?"), ("npc", result.text)]
    assert hot.source == "hot" and [(t.speaker, t.text) for t in hot.turns] == said
    assert fresh.source == "redis" and [(t.speaker, t.text) for t in fresh.turns] == said

    config = ArchiverConfig(redis_url=services.redis_url(), database_url=services.database_url(),
                            prefix=prefix, schema=schema, workers=1)
    stats = asyncio.run(Archiver(config).run(once=True))
    rows = asyncio.run(_sql(f"SELECT kind, npc_id, player_id, payload FROM {schema}.events ORDER BY ts"))
    turns = [(r["npc_id"], r["player_id"], json.loads(r["payload"])) for r in rows if r["kind"] == "turn"]
    expected = [(npc, PLAYER, speaker, text) for speaker, text in said]
    assert [(n, p, t["speaker"], t["text"]) for n, p, t in turns] == expected, stats


def _world() -> dict[str, actions.Entity]:
    entities = [
        actions.Entity("zed-1", "npc", (0.0, 0.0, 1.0), archetype="zombie", horde_id=3),
        actions.Entity("vamp-1", "npc", (1.0, 0.0, 0.0), archetype="vampire"),
        actions.Entity(PLAYER, "player", (1.5, 0.0, 0.5)),
        actions.Entity("body-1", "npc", (0.5, 0.0, 0.0), alive=False, archetype="ghoul"),
        actions.Entity("far-1", "player", (300.0, 0.0, 0.0)),
    ]
    return {e.entity_id: e for e in entities}


def test_act_returns_only_valid_actions(worker_endpoint, tokenizer, names):
    world = _world()

    async def go(server, worker, memory):
        for npc, archetype in (("zed-1", "zombie"), ("vamp-1", "vampire")):
            server.register_npc(npc, archetype, position=world[npc].position)
        await server.tick({PLAYER: world[PLAYER].position})
        context = ActContext(world, "A player steps out of the fog, a dead ghoul at your feet.")
        return await asyncio.gather(*(server.act(npc, context) for npc in ("zed-1", "vamp-1") * 6))

    results = run(_with_server(worker_endpoint, tokenizer, names[0], go,
                               server_config=ServerConfig(act_temperature=1.0)))
    for result in results:
        action = result.action
        candidate = {"action": action.name, "target": action.target or actions.NO_TARGET}
        assert actions.validate_action(action.npc_id, candidate, world).ok, (result, candidate)
        assert result.valid == (result.reason == "")
        if not result.valid:  # the safe default, with the reason the model's action was refused
            assert action.name in ("wander", "idle") and result.reason
    assert any(result.raw for result in results)  # the worker decoded something under the grammar


def test_bronze_talk_barks_without_the_worker(worker_endpoint, tokenizer, names):
    async def go(server, worker, memory):
        submitted = []
        real_submit = worker.submit

        async def spy(items, **kwargs):
            submitted.append(items)
            return await real_submit(items, **kwargs)

        worker.submit = spy
        server.register_npc("zed-far", "zombie", position=FAR)
        await server.tick({PLAYER: NEAR})
        assert server.actor("zed-far").tier == Tier.BRONZE
        replies = [await _talk(server, "zed-far", "Hello?") for _ in range(3)]
        return submitted, replies, server.queues.counters["queued"]

    submitted, replies, queued = run(_with_server(worker_endpoint, tokenizer, names[0], go))
    assert submitted == [] and queued == 0
    texts = [result.text for _, result in replies]
    assert all(result.bark and not result.degraded and result.tier == "bronze" for _, result in replies)
    assert all(chunks == [result.text] for chunks, result in replies)
    assert texts[0] != texts[1] != texts[2]  # the bark deck never repeats immediately


def test_demotion_during_a_reply_does_not_cut_it(worker_endpoint, tokenizer, names):
    npc = "vamp-move"

    async def go(server, worker, memory):
        server.register_npc(npc, "vampire", position=(2.0, 0.0, 0.0))
        await server.tick({PLAYER: NEAR})
        stream = server.talk(npc, PLAYER, "Tell me a long story about the old castle.")
        first = await anext(stream)  # the reply is in progress
        during = await server.tick({PLAYER: FAR})  # the player runs off: Bronze by distance
        held_tier = server.actor(npc).tier
        rest = [item async for item in stream]
        after = await server.tick({PLAYER: FAR})
        return first, list(during.held), held_tier, rest, server.actor(npc).tier, list(after.demoted)

    first, held, held_tier, rest, tier_after, demoted = run(_with_server(worker_endpoint, tokenizer,
                                                                         names[0], go))
    assert held == [0] and held_tier == Tier.GOLD
    result = rest[-1]
    assert isinstance(result, TalkResult) and result.tier == "gold"
    assert result.text == prompts.one_line("".join([first, *rest[:-1]]))
    assert tier_after == Tier.BRONZE and demoted == [0]


def test_missing_adapter_degrades_the_stack_not_the_turn(worker_endpoint, tokenizer, names):
    async def go(server, worker, memory):
        stack = ("vampire.dialogue_style", "vampire.sub.nosferatu", "npc.vamp-d")  # deltas never loaded
        server.register_npc("vamp-d", "vampire", "nosferatu", position=(1.0, 0.0, 0.0),
                            stacks={"dialogue_style": stack})
        await server.tick({PLAYER: NEAR})
        return await _talk(server, "vamp-d", "Who are you?")

    _, result = run(_with_server(worker_endpoint, tokenizer, names[0], go,
                                 server_config=ServerConfig(warm_on_promotion=False)))
    assert result.degraded and "npc.vamp-d missing from the registry" in result.reason
    assert "kept vampire.dialogue_style" in result.reason


def test_expired_talk_answers_with_a_degraded_bark(worker_endpoint, tokenizer, names):
    """A request still queued at its deadline is dropped with an explicit outcome: the talk still answers."""
    async def go(server, worker, memory):
        server.register_npc("vamp-late", "vampire", position=(1.0, 0.0, 0.0))
        await server.tick({PLAYER: NEAR})
        return await _talk(server, "vamp-late", "Are you there?")

    config = SchedulerConfig(gold_talk_deadline_ms=0.001, batch_deadline_guard_ms=0.0)
    chunks, result = run(_with_server(worker_endpoint, tokenizer, names[0], go, config=config))
    assert result.bark and result.degraded and result.reason.startswith("expired")
    assert chunks == [result.text]


def test_sync_game_client_facade(worker_endpoint, tokenizer, names):
    """The blocking client: its own loop thread builds the server; talk streams; events reach the cards."""
    prefix = names[0]
    opened = {}

    async def make_server():
        opened["redis"] = connect(config=_memory_config(prefix))
        opened["worker"] = WorkerClient(worker_endpoint, config=ClientConfig(heartbeat_timeout_s=5.0))
        await opened["worker"].connect()
        memory = MemoryStore(opened["redis"], _memory_config(prefix))
        return SchedulerServer(SchedulerConfig(), memory, opened["worker"], tokenizer, resident=ADAPTER_FILES)

    async def cleanup(server):
        await server.memory.aclose()
        await opened["redis"].aclose()
        await opened["worker"].close()

    game = GameClient(make_server)
    try:
        game.register_npc("vamp-sync", "vampire", position=(1.0, 0.0, 0.0))
        game.update_positions(["vamp-sync"], np.array([[2.0, 0.0, 0.0]]))
        game.tick({PLAYER: NEAR})
        items = list(game.talk("vamp-sync", PLAYER, "Hello there."))
        assert isinstance(items[-1], TalkResult) and items[-1].tier == "gold"
        outcome = game.event("vamp-sync", PLAYER, "gift", text="a silver ring")
        card = game.get_card("vamp-sync", PLAYER, "relationship")
        assert card == outcome.relationship and card.trust > 0
        stats = game.stats()
        assert stats["talks"] == 1 and stats["tiers"]["gold"] == 1
        game.despawn(["vamp-sync"])
        assert game.stats()["npcs"] == 0
    finally:
        game.close(cleanup)


def test_async_client_is_a_thin_facade(worker_endpoint, tokenizer, names):
    async def go(server, worker, memory):
        game = AsyncGameClient(server)
        game.register_npc("vamp-a", "vampire", position=(1.0, 0.0, 0.0))
        await game.tick({PLAYER: NEAR})
        items = [item async for item in game.talk("vamp-a", PLAYER, "Hi.")]
        await game.end_session("vamp-a", PLAYER)
        return items, game.stats()

    items, stats = run(_with_server(worker_endpoint, tokenizer, names[0], go))
    assert isinstance(items[-1], TalkResult)
    assert stats["tiers"] == {"gold": 1, "silver": 0, "bronze": 0}
