"""`make demo`: the smallest honest end-to-end run that exists today.

1. Checks that Redis and PostgreSQL answer at REDIS_URL / DATABASE_URL (real round trips).
2. Builds (once, under .run/demo-model) a tiny random Qwen2 checkpoint with a trained BPE tokenizer. The
   weights are random, so the text is gibberish: this demonstrates the serving path, not a language model.
3. Serves a mixed batch through the engine (continuous batching, paged KV, prefix cache) and prints what
   happened, including the prefix-cache hits of a second turn.
4. Loads two random PEFT adapters and serves rows with different adapter stacks in one batch, a two-step
   chain (emotional_response then dialogue_style) and a grammar-constrained zombie action.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from memory.services import database_url, redis_url, resolve_run_dir


def check_services() -> None:
    import asyncpg
    import redis

    client = redis.Redis.from_url(redis_url(), socket_timeout=2)
    client.set("npc:demo:ping", "1", ex=10)
    print(f"redis      {redis_url()}: PING ok, server {client.info('server')['redis_version']}")

    async def pg() -> str:
        conn = await asyncpg.connect(database_url(), timeout=5)
        try:
            return await conn.fetchval("SELECT version()")
        finally:
            await conn.close()

    print(f"postgresql {database_url()}: {asyncio.run(pg()).split(',')[0]}")


ADAPTERS = {"vampire.emotional_response": 4, "vampire.dialogue_style": 8, "zombie.action_policy": 8}


def demo_model() -> Path:
    from gpu_worker.testing import build_adapter, build_model, build_tokenizer

    path = resolve_run_dir() / "demo-model"
    if not (path / "config.json").is_file():
        print(f"building a tiny random Qwen2 checkpoint in {path} (once)")
        build_model(path, family="qwen2", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256,
                    vocab=512, seed=0)
        build_tokenizer(path, vocab_size=512)
    for i, (name, rank) in enumerate(ADAPTERS.items()):
        if not (path.parent / "demo-adapters" / name / "adapter_config.json").is_file():
            build_adapter(path, path.parent / "demo-adapters" / name, r=rank, alpha=2 * rank, seed=i)
    return path


def serve(model_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from gpu_worker import Engine, EngineConfig, Request, SamplingParams

    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    engine = Engine(EngineConfig(model=str(model_dir)))
    persona = "The vampire lord watches the village from the ruined chapel. "
    lines = ["Traveller, you carry the smell of garlic.", "I remember you.", "Quest: find the lost amulet."]
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=7)
    for turn in (1, 2):
        requests = [Request(prompt=tok(persona + line).input_ids, params=params) for line in lines]
        start = time.perf_counter()
        completions = engine.generate(requests)
        ms = (time.perf_counter() - start) * 1000
        print(f"turn {turn}: {len(requests)} requests in {ms:.0f} ms")
        for line, c in zip(lines, completions):
            print(f"  {line!r} -> {tok.decode(c.token_ids)!r} ({len(c.token_ids)} tokens, "
                  f"{c.finish_reason}, {c.num_cached_tokens} prompt tokens from the prefix cache)")
    serve_adapters(engine, tok, model_dir.parent / "demo-adapters", persona)
    stats = engine.stats()
    print(f"engine: {stats['steps']} steps, prefix-cache hit rate {stats['prefix_hit_rate']:.0%}, "
          f"{stats['kv_blocks_total']} KV blocks, adapters resident {sorted(stats['adapters']['resident'])}")


def serve_adapters(engine, tok, adapters_dir: Path, persona: str) -> None:
    import json

    from gpu_worker import ChainRequest, ChainStep, Grammar, OutputRef, Request, SamplingParams

    for name in ADAPTERS:
        engine.load_adapter(name, adapters_dir / name)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    ids = tok(persona + "I remember you.").input_ids
    stacks = [(), ("vampire.dialogue_style",), ("vampire.emotional_response", "vampire.dialogue_style")]
    completions = engine.generate([Request(prompt=ids, adapters=s, params=greedy) for s in stacks])
    print("one batch, three adapter stacks (different stacks give different tokens):")
    for stack, c in zip(stacks, completions):
        print(f"  {' + '.join(stack) or 'base model':55s} -> {c.token_ids}")
    chain = ChainRequest(steps=[
        ChainStep(prompt=ids, adapters=("vampire.emotional_response",), params=greedy),
        ChainStep(prompt=[*ids, OutputRef(step=0)], adapters=("vampire.dialogue_style",), params=greedy)])
    done = engine.generate_chains([chain])[0]
    print(f"chain of 2 steps inside the engine: {[len(s.token_ids) for s in done.steps]} tokens per step, "
          f"{done.finish_reason}")
    actions = ["attack", "lunge", "follow_horde", "wander"]
    schema = {"type": "object", "required": ["action", "target"], "additionalProperties": False,
              "properties": {"action": {"enum": actions}, "target": {"enum": ["player_1", "none"]}}}
    act = Request(prompt=tok("The zombie horde shuffles toward the gate.").input_ids,
                  adapters=("zombie.action_policy",), grammar=Grammar.from_json_schema(schema),
                  params=SamplingParams(max_tokens=48, temperature=1.0, seed=3))
    action = engine.generate([act])[0]
    print(f"grammar-constrained action: {json.loads(tok.decode(action.token_ids))}")


def main() -> int:
    print("== services")
    check_services()
    print("== engine (tiny model, RANDOM weights, CPU: gibberish text until a trained model exists)")
    serve(demo_model())
    print("demo: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
