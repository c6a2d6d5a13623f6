"""SchedulerServer features beyond the first slice, through the real stack (as tests/test_e2e_talk.py): an
npc-worker subprocess on the tiny Qwen2 fixture, the scheduler core in this process, MemoryStore and the
adapter registry on the real Redis (own key prefix). Tier overrides (quest flag, relationship score),
zombie hordes (one worker request per horde decision, fanned out), talk chains (emotional_response ->
dialogue_style in one worker request) and registry-resolved adapter stacks with their fallbacks.

The submit spies below wrap the real WorkerClient.submit (they record what went to the worker and pass it
on unchanged): nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import redis.asyncio as aioredis

from gpu_worker.chains import ChainRequest, OutputRef
from gpu_worker.lora.registry import AdapterRecord, AdapterRegistry
from gpu_worker.request import Request
from memory.services import redis_url
from tests import test_e2e_talk as e2e
from tests.test_worker import serve_adapters
from tier_scheduler import actions, prompts
from tier_scheduler.config import SchedulerConfig, Tier
from tier_scheduler.server import (
    EMOTION_CUE,
    EMOTION_EBNF,
    EMOTIONS,
    ActContext,
    ServerConfig,
    TalkResult,
)

PLAYER = "player-1"
NEAR, FAR = (0.0, 0.0, 0.0), (5_000.0, 0.0, 0.0)
# In the worker's adapters dir (loaded at its start): registry-style names, fixture weights.
WORKER_FILES = {"vampire.dialogue_style": "all_r8", "vampire.action_policy": "attn_r4",
                "zombie.action_policy": "mlp_r16", "vampire.emotional_response": "pattern_r8"}
# Registered in the adapter registry only (the worker loads them from their folder when asked).
DELTA_FILES = {"vampire.sub.nosferatu": ("subfaction", "attn_r4"),
               "npc.vamp-reg.dialogue_style": ("npc", "mlp_r16")}
NO_CHAIN = frozenset(WORKER_FILES) - {"vampire.emotional_response"}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def worker_endpoint(qwen2_dir, adapters, tmp_path_factory):
    yield from serve_adapters(qwen2_dir, adapters, tmp_path_factory.mktemp("feature-adapters"), WORKER_FILES)


def _with_server(endpoint, tokenizer, prefix, fn, *, resident=frozenset(WORKER_FILES), **kwargs):
    return e2e._with_server(endpoint, tokenizer, prefix, fn, resident=resident, **kwargs)


def run(coro, timeout_s: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def spy_submit(worker) -> list[tuple[list, list]]:
    """Records every batch the server submits (items, their streams) and passes it on to the real worker."""
    submitted = []
    real_submit = worker.submit

    async def spy(items, **kwargs):
        streams = await real_submit(items, **kwargs)
        submitted.append((list(items), streams))
        return streams

    worker.submit = spy
    return submitted


def items_of(submitted) -> list:
    return [item for items, _ in submitted for item in items]


async def _talk(server, npc_id: str, text: str) -> tuple[list[str], TalkResult]:
    items = [item async for item in server.talk(npc_id, PLAYER, text)]
    assert isinstance(items[-1], TalkResult) and all(isinstance(i, str) for i in items[:-1])
    return items[:-1], items[-1]


def _valid(action: actions.Action, world) -> bool:
    candidate = {"action": action.name, "target": action.target or actions.NO_TARGET}
    return actions.validate_action(action.npc_id, candidate, world).ok


# ----------------------------------------------------------------------------------------- 1. overrides


def test_overrides_are_tier_floors_and_clearing_them_respects_hysteresis(worker_endpoint, tokenizer, prefix):
    async def go(server, worker, memory):
        submitted = spy_submit(worker)
        server.register_npc("vamp-far", "vampire", position=FAR)
        server.register_npc("vamp-band", "vampire", position=(30.0, 0.0, 0.0))  # Gold band, outside entry
        server.register_npc("vamp-liked", "vampire", position=(500.0, 0.0, 0.0))
        server.register_npc("vamp-plain", "vampire", position=FAR)
        tier = lambda npc: server.actor(npc).tier  # noqa: E731
        server.set_override("vamp-far", forced="gold")
        server.set_override("vamp-band", forced=Tier.GOLD)
        server.set_override("vamp-liked", relationship=60.0)
        assert server.override("vamp-far") == (Tier.GOLD, None)
        assert server.override("vamp-liked") == (None, 60.0)

        first = await server.tick({PLAYER: NEAR})
        assert [tier(n) for n in ("vamp-far", "vamp-band", "vamp-liked", "vamp-plain")] == [
            Tier.GOLD, Tier.GOLD, Tier.SILVER, Tier.BRONZE]
        assert sorted(first.promoted_gold.tolist()) == [0, 1]
        assert server.counters["prefetches"] == 2  # a forced promotion prefetches like a near one
        # A far NPC held at Gold gets an LLM reply, not a bark.
        before = len(items_of(submitted))
        _, result = await _talk(server, "vamp-far", "Why do you watch me from so far away?")
        assert result.tier == "gold" and len(items_of(submitted)) == before + 1

        # Leaving an argument out keeps it; None clears it.
        server.set_override("vamp-far", relationship=70.0)
        assert server.override("vamp-far") == (Tier.GOLD, 70.0)
        server.set_override("vamp-far", forced=None, relationship=None)
        server.set_override("vamp-band", forced=None)
        server.set_override("vamp-liked", relationship=None)
        assert server.override("vamp-far") == (None, None)
        second = await server.tick({PLAYER: NEAR})
        tiers_after_clear = [tier(n) for n in ("vamp-far", "vamp-band", "vamp-liked")]
        server.update_positions(["vamp-band"], np.array([[40.0, 0.0, 0.0]]))  # past gold_exit_m (35)
        await server.tick({PLAYER: NEAR})
        return second, tiers_after_clear, tier("vamp-band")

    second, tiers_after_clear, band_later = run(_with_server(
        worker_endpoint, tokenizer, prefix, go, server_config=ServerConfig(warm_on_promotion=False)))
    # 5 km and 500 m: down to Bronze at once; 30 m: still inside Gold's exit band (hysteresis), Gold.
    assert tiers_after_clear == [Tier.BRONZE, Tier.GOLD, Tier.BRONZE]
    assert sorted(second.demoted.tolist()) == [0, 2]
    assert band_later == Tier.SILVER


def test_set_override_validates_and_changes_nothing_on_error(worker_endpoint, tokenizer, prefix):
    async def go(server, worker, memory):
        server.register_npc("vamp-v", "vampire", position=FAR)
        server.set_override("vamp-v", forced="silver", relationship=10)
        with pytest.raises(KeyError, match="nobody"):
            server.set_override("nobody", forced="gold")
        for bad in ({"forced": "platinum"}, {"forced": 0}, {"relationship": math.nan},
                    {"relationship": 150.0}, {"relationship": True}, {"relationship": "60"},
                    {"forced": "gold", "relationship": -101}):
            with pytest.raises(ValueError, match="forced|relationship"):
                server.set_override("vamp-v", **bad)
        kept = server.override("vamp-v")
        await server.tick({PLAYER: NEAR})
        return kept, server.actor("vamp-v").tier

    kept, tier = run(_with_server(worker_endpoint, tokenizer, prefix, go,
                                  server_config=ServerConfig(warm_on_promotion=False)))
    assert kept == (Tier.SILVER, 10.0)  # every refused call left both values as they were
    assert tier == Tier.SILVER


# -------------------------------------------------------------------------------------------- 2. hordes


def _horde_world(horde_id: int | None) -> dict[str, actions.Entity]:
    zombies = [actions.Entity(f"zed-{i}", "npc", (1.0 + 0.8 * i, 0.5 * (i % 2), 0.0), archetype="zombie",
                              horde_id=horde_id) for i in range(5)]
    others = [
        actions.Entity("zed-lone", "npc", (200.0, 0.0, 0.0), archetype="zombie"),
        actions.Entity(PLAYER, "player", (2.0, 1.0, 0.0)),
        actions.Entity("body-1", "npc", (3.0, 0.0, 0.0), alive=False, archetype="ghoul"),
    ]
    return {e.entity_id: e for e in zombies + others}


def test_horde_acts_with_one_worker_request_fanned_out_to_valid_actions(worker_endpoint, tokenizer, prefix):
    members = [f"zed-{i}" for i in range(5)]

    async def go(server, worker, memory):
        layout = _horde_world(None)
        for npc in [*members, "zed-lone"]:
            server.register_npc(npc, "zombie", position=layout[npc].position)
        await server.tick({PLAYER: layout[PLAYER].position})
        hordes = server.hordes()
        assert len(hordes) == 1, hordes
        (horde_id, (leader, horde_members)), = hordes.items()
        assert server.horde_of("zed-lone") is None
        world = _horde_world(horde_id)  # the game marks the members with the horde id it was given
        context = ActContext(world, "A player stumbles into the pack, a fresh body at its feet.")

        submitted = spy_submit(worker)
        requests_before = server.counters["worker_requests"]
        results = {}
        for key in (leader, horde_id, horde_members[-1]):  # the leader, the horde id, any member
            results[key] = await server.act_horde(key, context)
        per_call = (server.counters["worker_requests"] - requests_before) / 3
        horde_items = items_of(submitted)
        alone = await server.act("zed-2", context)  # a member acting alone still works as before
        with pytest.raises(KeyError, match="zed-lone"):
            await server.act_horde("zed-lone", context)
        with pytest.raises(KeyError, match="99"):
            await server.act_horde(99, context)

        await server.tick({PLAYER: FAR})  # the horde stays, every member Bronze now
        far_before = server.counters["worker_requests"]
        bronze = await server.act_horde(server.hordes()[0][0], context)
        bronze_requests = server.counters["worker_requests"] - far_before
        return (world, leader, horde_members, results, per_call, horde_items, alone, bronze,
                bronze_requests, server.counters["horde_acts"])

    (world, leader, horde_members, results, per_call, horde_items, alone, bronze, bronze_requests,
     horde_acts) = run(_with_server(worker_endpoint, tokenizer, prefix, go,
                                    server_config=ServerConfig(warm_on_promotion=False)))
    assert sorted(horde_members) == members and leader in members
    assert per_call == 1 and len(horde_items) == 3 and horde_acts == 4
    for item in horde_items:  # one grammar-constrained action_policy request per horde decision
        assert isinstance(item, Request) and item.grammar is not None
        assert item.adapters == ("zombie.action_policy",) and f"-{leader}" in item.request_id
    for result_set in results.values():
        assert sorted(result_set) == members
        decisions = {(r.valid, r.reason, r.raw) for r in result_set.values()}
        assert len(decisions) == 1  # every member carries the one decision
        for npc_id, result in result_set.items():
            assert result.action.npc_id == npc_id and _valid(result.action, world), result
        placed = [r.action.position for r in result_set.values() if r.action.position is not None]
        assert len(set(placed)) == len(placed)  # spread around the target / anchor, not stacked
    assert any(r.raw for rs in results.values() for r in rs.values())  # the worker decoded something
    assert _valid(alone.action, world)
    assert bronze_requests == 0 and sorted(bronze) == members
    for result in bronze.values():
        assert not result.valid and "Bronze horde" in result.reason and _valid(result.action, world)


def test_hordes_follow_despawns_and_positions(worker_endpoint, tokenizer, prefix):
    async def go(server, worker, memory):
        for i in range(5):
            server.register_npc(f"zed-{i}", "zombie", position=(float(i), 0.0, 0.0))
        server.register_npc("vamp-x", "vampire", position=(0.5, 0.0, 0.0))  # not a zombie: never in one
        await server.tick({PLAYER: NEAR})
        (leader, members), = server.hordes().values()
        survivor = next(m for m in members if m != leader)
        server.despawn([survivor])
        after_member_gone = server.hordes()
        server.despawn([leader])
        after_leader_gone = server.hordes()
        await server.tick({PLAYER: NEAR})  # three zombies left: a horde again
        regrouped = server.hordes()
        return leader, members, survivor, after_member_gone, after_leader_gone, regrouped

    leader, members, survivor, after_member_gone, after_leader_gone, regrouped = run(_with_server(
        worker_endpoint, tokenizer, prefix, go, server_config=ServerConfig(warm_on_promotion=False)))
    assert sorted(members) == [f"zed-{i}" for i in range(5)]
    assert list(after_member_gone.values()) == [(leader, tuple(m for m in members if m != survivor))]
    assert after_leader_gone == {}  # without its leader the horde dissolves until the next tick
    (new_leader, new_members), = regrouped.values()
    assert sorted(new_members) == sorted(set(members) - {leader, survivor}) and new_leader in new_members


# -------------------------------------------------------------------------------------------- 3. chains


def test_gold_talk_runs_as_one_two_step_chain_and_names_the_emotion(worker_endpoint, tokenizer, prefix):
    npc = "vamp-chain"

    async def go(server, worker, memory):
        server.register_npc(npc, "vampire", "nosferatu", position=(3.0, 0.0, 0.0), name="Mirela")
        await server.tick({PLAYER: NEAR})
        await asyncio.gather(*server._background)  # the warm-up: both stacks of the chain
        submitted = spy_submit(worker)
        talks = []
        for line in ("Good evening.", "Did you find my amulet?", "Tell me about the castle.",
                     "Why are you so quiet?", "Goodbye then."):
            before = len(submitted)
            chunks, result = await _talk(server, npc, line)
            (items, streams), = submitted[before:]  # ONE batch with ONE item per talk
            assert len(items) == 1
            talks.append((chunks, result, items[0], await streams[0].result(5.0)))
        return talks, server.counters, await worker.stats()

    talks, counters, stats = run(_with_server(worker_endpoint, tokenizer, prefix, go))
    assert counters["talk_chains"] == len(talks) and counters["warmed"] == 1
    assert counters["worker_errors"] == 0
    spoken = 0
    for chunks, result, item, done in talks:
        assert isinstance(item, ChainRequest) and len(item.steps) == 2
        first, second = item.steps
        assert first.adapters == ("vampire.emotional_response",) and first.grammar.source == EMOTION_EBNF
        assert second.adapters == ("vampire.dialogue_style",) and OutputRef(0) in second.prompt
        cue = list(tokenizer.encode(EMOTION_CUE, add_special_tokens=False))
        assert first.prompt[-len(cue):] == cue  # step 1 answers right after the emotion cue
        ref = second.prompt.index(OutputRef(0))
        assert second.prompt[:ref] == first.prompt  # step 2 = step 1's prompt + its output + the talk cue
        assert len(done.steps) == 2 and done.steps[0].finish_reason == "stop"
        named = tokenizer.decode(list(done.steps[0].token_ids), skip_special_tokens=True).strip()
        assert named in EMOTIONS
        if result.bark:  # an empty sample of the random model falls back to a (degraded) bark
            continue
        spoken += 1
        assert not result.degraded, result.reason
        assert result.emotion == named  # the emotion is step 1's word, not the lexicon's guess
        # Only step 2 streamed: the chunks are its output (cut at the newline), step 1's word is not in it.
        reply = tokenizer.decode(list(done.steps[1].token_ids), skip_special_tokens=True).split("\n")[0]
        assert chunks and result.text == prompts.one_line("".join(chunks))
        # (a trailing half of a UTF-8 character is held back by the stream decoder, hence startswith)
        assert prompts.one_line(prompts.drop_control_chars(reply)).startswith(result.text)
    assert spoken >= 1
    assert stats["in_flight"] == 0


def test_talk_without_the_emotional_stack_or_below_gold_is_one_step(worker_endpoint, tokenizer, prefix):
    async def go_without(server, worker, memory):
        server.register_npc("vamp-single", "vampire", position=(3.0, 0.0, 0.0))
        await server.tick({PLAYER: NEAR})
        submitted = spy_submit(worker)
        _, result = await _talk(server, "vamp-single", "Good evening.")
        return result, items_of(submitted), server.counters["talk_chains"]

    async def go_silver_and_off(server, worker, memory):
        server.register_npc("vamp-silver", "vampire", position=(50.0, 0.0, 0.0))
        await server.tick({PLAYER: NEAR})
        assert server.actor("vamp-silver").tier == Tier.SILVER
        submitted = spy_submit(worker)
        _, result = await _talk(server, "vamp-silver", "Hello down there.")
        return result, items_of(submitted), server.counters["talk_chains"]

    cases = [run(_with_server(worker_endpoint, tokenizer, prefix, go_without, resident=NO_CHAIN)),
             run(_with_server(worker_endpoint, tokenizer, prefix, go_silver_and_off)),
             run(_with_server(worker_endpoint, tokenizer, prefix, go_without,
                              server_config=ServerConfig(talk_chain=False)))]
    for result, items, chains in cases:
        assert chains == 0 and len(items) == 1
        (item,) = items
        assert isinstance(item, Request) and item.adapters == ("vampire.dialogue_style",)
        assert item.grammar is None and item.prompt[-1] in tokenizer.encode(prompts.TALK_CUE)
        assert result.emotion in EMOTIONS
        if not result.bark:
            assert not result.degraded, result.reason  # no chain is not a degraded reply


# ----------------------------------------------------------------------------------- 4. registry stacks


async def _registry(prefix: str, adapters, client) -> AdapterRegistry:
    registry = AdapterRegistry(client, prefix + "registry:")
    records = [AdapterRecord.from_peft_folder(adapters[WORKER_FILES[name]], name, "task")
               for name in ("vampire.dialogue_style", "vampire.action_policy")]
    records += [AdapterRecord.from_peft_folder(adapters[fixture], name, kind, archetype="vampire")
                for name, (kind, fixture) in DELTA_FILES.items()]
    await registry.register_many(records)
    await registry.set_npc("vamp-reg", "vampire", "nosferatu")
    await registry.set_npc("wolf-reg", "werewolf")  # no werewolf task adapter is registered
    return registry


def test_registry_stacks_degrade_never_fail_and_load_in_the_background(worker_endpoint, tokenizer, prefix,
                                                                       adapters):
    full = ("vampire.dialogue_style", "vampire.sub.nosferatu", "npc.vamp-reg.dialogue_style")

    async def without_loads(server, worker, memory):
        for npc, archetype in (("vamp-reg", "vampire"), ("vamp-ghost", "vampire"), ("wolf-reg", "werewolf")):
            server.register_npc(npc, archetype, "nosferatu" if npc == "vamp-reg" else None,
                                position=(2.0, 0.0, 0.0))
        await asyncio.gather(*server._background)  # register_npc resolves the stacks in the background
        resolves = server.counters["stack_resolves"]
        await server.tick({PLAYER: NEAR})
        submitted = spy_submit(worker)
        out = {}
        for npc in ("vamp-reg", "vamp-ghost", "wolf-reg", "vamp-reg"):
            before = len(submitted)
            _, result = await _talk(server, npc, "Who are you, really?")
            (items, _), = submitted[before:]
            out.setdefault(npc, []).append((result, items[0].adapters))
        return out, resolves, server.counters["stack_resolves"], server.counters["adapter_loads"]

    async def with_loads(server, worker, memory):
        server.register_npc("vamp-reg", "vampire", "nosferatu", position=(2.0, 0.0, 0.0))
        while server._background:  # the resolves, then the loads they started
            await asyncio.gather(*server._background)
        loads = server.counters["adapter_loads"]
        await server.tick({PLAYER: NEAR})
        submitted = spy_submit(worker)
        _, result = await _talk(server, "vamp-reg", "Who are you, really?")
        first_stack = items_of(submitted)[0].adapters
        # A new profile (no subfaction) is picked up when the NPC registers again ...
        await server.registry.set_npc("vamp-reg", "vampire", None)
        server.despawn(["vamp-reg"])
        server.register_npc("vamp-reg", "vampire", position=(2.0, 0.0, 0.0))
        await asyncio.gather(*server._background)
        await server.tick({PLAYER: NEAR})
        await _talk(server, "vamp-reg", "And now?")
        second_stack = items_of(submitted)[-1].adapters
        # ... and by refresh_stacks.
        await server.registry.set_npc("vamp-reg", "vampire", "nosferatu")
        await server.refresh_stacks(["vamp-reg"])
        await _talk(server, "vamp-reg", "And now?")
        third_stack = items_of(submitted)[-1].adapters
        held = await worker.stats()
        return loads, result, first_stack, second_stack, third_stack, held["adapters"]

    async def main():
        client = aioredis.Redis.from_url(redis_url())
        try:
            registry = await _registry(prefix, adapters, client)
            first = await _with_server(worker_endpoint, tokenizer, prefix, without_loads, registry=registry,
                                       server_config=ServerConfig(load_registered=False, registry_retry_s=600,
                                                                  warm_on_promotion=False))
            second = await _with_server(worker_endpoint, tokenizer, prefix, with_loads, registry=registry,
                                        server_config=ServerConfig(warm_on_promotion=False))
            return first, second
        finally:
            await client.aclose()

    (out, resolves, resolves_after, loads_off), second = run(main(), 120.0)
    # Three tasks per NPC resolved once at registration; the turns used the cache (failures retry later).
    assert resolves == resolves_after == 9 and loads_off == 0
    (reg, reg_stack), (reg_again, reg_again_stack) = out["vamp-reg"]
    assert reg_stack == reg_again_stack == ("vampire.dialogue_style",)
    assert reg.degraded and "npc.vamp-reg.dialogue_style not resident yet" in reg.reason
    assert "vampire.sub.nosferatu not resident yet" in reg.reason
    assert "kept vampire.dialogue_style" in reg.reason and reg_again.degraded
    [(ghost, ghost_stack)] = out["vamp-ghost"]
    assert ghost.degraded and "no profile" in ghost.reason and "deltas were dropped" in ghost.reason
    assert ghost_stack == ("vampire.dialogue_style",)
    [(wolf, wolf_stack)] = out["wolf-reg"]
    assert wolf.degraded and "werewolf.dialogue_style" in wolf.reason and "base model alone" in wolf.reason
    assert wolf_stack == ()
    for result in (reg, ghost, wolf):
        assert result.tier == "gold" and result.emotion in EMOTIONS  # a reply, never a failed turn

    loads, result, first_stack, second_stack, third_stack, held = second
    assert loads == 2  # the two deltas, from their registered folders
    assert first_stack == full and third_stack == full
    assert second_stack == ("vampire.dialogue_style", "npc.vamp-reg.dialogue_style")
    if not result.bark:
        assert not result.degraded, result.reason
    on_worker = set(held["resident"]) | set(held["cpu"])
    assert set(DELTA_FILES) <= on_worker


# --------------------------------------------------------------------------------- session summaries


def test_session_end_is_summarized_by_the_worker_in_the_background_lane(worker_endpoint, tokenizer, prefix):
    npc = "vamp-summary"

    async def go(server, worker, memory):
        assert memory.summarize == server.summarize_turns  # the store's summaries are now the worker's
        server.register_npc(npc, "vampire", "nosferatu", position=(3.0, 0.0, 0.0), name="Mirela")
        await server.tick({PLAYER: NEAR})
        await asyncio.gather(*server._background)
        for line in ("Good evening, Mirela.", "I promised to bring you the silver dagger.",
                     "The hunters killed my brother at the river."):
            await _talk(server, npc, line)
        turns = (await memory.prefetch(npc, PLAYER)).turns
        submitted = spy_submit(worker)
        outcome = await memory.end_session(npc, PLAYER)
        return outcome, turns, items_of(submitted), dict(server.counters)

    outcome, turns, items, counters = run(_with_server(worker_endpoint, tokenizer, prefix, go))
    (request,) = items  # one request: the summary, on the base model
    assert isinstance(request, Request) and request.adapters == ()
    assert request.request_id.startswith("summary-")
    assert request.params.max_tokens == SchedulerConfig().summary_max_tokens
    prompt = tokenizer.decode(request.prompt)
    assert prompt.startswith(prompts.SUMMARY_INSTRUCTION) and prompt.endswith(prompts.SUMMARY_CUE)
    assert turns and all(prompts.one_line(t.text) in prompt for t in turns)  # (a barked talk records none)
    assert counters["summaries"] == 1 and counters["worker_errors"] == 0
    # The random model's words, fitted to 300-600 characters (topped up from the turns when shorter).
    assert outcome.method == "worker" and 300 <= len(outcome.summary_text) <= 600
    assert not prompts.CONTROL_CHARS.search(outcome.summary_text)


def test_summary_prompt_keeps_the_newest_turns_and_says_how_many_it_left_out():
    turns = [prompts.Line("player" if i % 2 else "npc", f"line {i} " + "x" * 90) for i in range(100)]
    pieces = prompts.summary_pieces(turns, max_chars=1_000)
    shown = [p for p in pieces if p.startswith(("Player:", "Me:"))]
    assert 5 <= len(shown) < 100 and sum(map(len, shown)) <= 1_000
    assert shown[-1].startswith("Player: line 99")
    assert pieces[2] == f"({100 - len(shown)} earlier lines not shown)\n"
    assert "".join(prompts.summary_pieces(turns[:3])).count("\n") == 2 + 3 + 1 + 1  # nothing left out


def test_without_worker_summaries_or_after_close_the_store_keeps_its_own(worker_endpoint, tokenizer, prefix):
    async def go(server, worker, memory):
        assert memory.summarize is None
        return True

    assert run(_with_server(worker_endpoint, tokenizer, prefix, go,
                            server_config=ServerConfig(worker_summaries=False)))

    async def closed(server, worker, memory):
        await server.close()
        return memory.summarize

    assert run(_with_server(worker_endpoint, tokenizer, prefix, closed)) is None


def test_talk_prompts_show_facts_retrieved_for_the_session_and_keep_them(worker_endpoint, tokenizer, prefix):
    npc = "vamp-facts"
    events = [{"type": "betrayal", "text": "sold my coffin to the hunters"},
              {"type": "life_saved", "text": "pulled me out of the burning chapel"},
              {"type": "attack", "text": "struck me with a torch"},
              {"type": "promise", "text": "to find the lost crypt key"},
              {"type": "help", "text": "carried my letters to the count"},
              {"type": "gift", "text": "a silver ring"},
              {"type": "insult", "text": "called my castle a ruin"}]

    def remembered(request) -> list[str]:
        first = request.steps[0].prompt if isinstance(request, ChainRequest) else request.prompt
        text = tokenizer.decode([t for t in first if isinstance(t, int)])
        block = text.split("[What I remember about the player]\n", 1)[1].split("\n\n", 1)[0]
        return [line for line in block.split("\n") if line.startswith("- ")]

    async def go(server, worker, memory):
        server.register_npc(npc, "vampire", "nosferatu", position=(3.0, 0.0, 0.0), name="Mirela")
        for event in events:
            await memory.apply_event(npc, PLAYER, event)
        await server.tick({PLAYER: NEAR})
        await asyncio.gather(*server._background)
        submitted = spy_submit(worker)
        seen = []
        for line in ("Do you still wear the silver ring?", "Tell me about the castle.", "Good night."):
            await _talk(server, npc, line)
            seen.append(remembered(items_of(submitted)[-1]))
        await memory.end_session(npc, PLAYER)
        await _talk(server, npc, "Why did you call my castle a ruin? You insulted me.")
        seen.append(remembered(items_of(submitted)[-1]))
        return seen

    seen = run(_with_server(worker_endpoint, tokenizer, prefix, go,
                            server_config=ServerConfig(worker_summaries=False)))
    first, second, third, next_session = seen
    assert len(first) == 5  # MemoryConfig.prompt_facts of the 7
    # Relevance brings in the gift (importance 5) over facts that matter more in general ...
    assert any("silver ring" in line for line in first) and not any("ruin" in line for line in first)
    # ... and the session keeps its facts whatever the player says next (the prefix cache stays valid).
    assert first == second == third
    # A new session retrieves for its own first input.
    assert any("ruin" in line for line in next_session) and len(next_session) == 5


def test_a_long_session_is_summarized_within_the_worker_s_context(worker_endpoint, tokenizer, prefix):
    # 30 long turns: the whole transcript (6,000 characters kept) would not fit the fixture model's 2,048
    # positions with 200 new tokens; the server keeps fewer, older-first-dropped lines until it does.
    turns = [prompts.Line("player" if i % 2 else "npc", f"Turn {i}: " + "the night is long and cold " * 10)
             for i in range(30)]

    async def go(server, worker, memory):
        submitted = spy_submit(worker)
        text = await server.summarize_turns(turns)
        return text, items_of(submitted), worker.worker.max_model_len, dict(server.counters)

    text, items, limit, counters = run(_with_server(worker_endpoint, tokenizer, prefix, go))
    (request,) = items
    assert limit == 2048 and len(request.prompt) + request.params.max_tokens <= limit
    prompt = tokenizer.decode(request.prompt)
    assert "Turn 29:" in prompt and "Turn 0:" not in prompt and "earlier lines not shown" in prompt
    assert counters["summaries"] == 1 and isinstance(text, str)


def test_a_slow_worker_summary_falls_back_in_time_and_frees_the_worker(worker_endpoint, tokenizer, prefix):
    # A summary that does not finish within summary_timeout_s is dropped (the worker's request aborted) and
    # the store writes its extractive one: a game's END_SESSION never waits for a busy worker.
    npc = "vamp-slow-summary"

    async def go(server, worker, memory):
        server.register_npc(npc, "vampire", "nosferatu", position=(3.0, 0.0, 0.0), name="Mirela")
        await server.tick({PLAYER: NEAR})
        await asyncio.gather(*server._background)
        for line in ("Good evening, Mirela.", "I promised to bring you the silver dagger."):
            await _talk(server, npc, line)
        aborted, real_abort = [], worker.abort

        async def abort(request_ids, **kwargs):  # recorded, then passed on to the real worker
            aborted.extend(request_ids)
            return await real_abort(request_ids, **kwargs)

        worker.abort = abort
        start = asyncio.get_running_loop().time()
        outcome = await memory.end_session(npc, PLAYER)  # 200 new tokens cannot come in 50 ms here
        took = asyncio.get_running_loop().time() - start
        for _ in range(100):  # the abort reaches the worker in the background
            if (await worker.stats())["in_flight"] == 0:
                break
            await asyncio.sleep(0.05)
        return outcome, took, dict(server.counters), await worker.stats(), aborted

    outcome, took, counters, stats, aborted = run(_with_server(
        worker_endpoint, tokenizer, prefix, go, server_config=ServerConfig(summary_timeout_s=0.05)))
    assert outcome.method == "extractive" and 300 <= len(outcome.summary_text) <= 600
    assert counters["summary_fallbacks"] == 1 and counters["summaries"] == 0
    assert took < 5.0 and stats["in_flight"] == 0
    assert [rid for rid in aborted if rid.startswith("summary-")], aborted  # not left to run to its end
