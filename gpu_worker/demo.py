"""`make demo`: the smallest honest end-to-end run that exists today.

1. Checks that Redis and PostgreSQL answer at REDIS_URL / DATABASE_URL (real round trips).
2. Builds (once, under .run/demo-model) a tiny random Qwen2 checkpoint with a trained BPE tokenizer. The
   weights are random, so the text is gibberish: this demonstrates the serving path, not a language model.
3. Serves a mixed batch through the engine (continuous batching, paged KV, prefix cache) and prints what
   happened, including the prefix-cache hits of a second turn.
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


def demo_model() -> Path:
    from gpu_worker.testing import build_model, build_tokenizer

    path = resolve_run_dir() / "demo-model"
    if not (path / "config.json").is_file():
        print(f"building a tiny random Qwen2 checkpoint in {path} (once)")
        build_model(path, family="qwen2", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256,
                    vocab=512, seed=0)
        build_tokenizer(path, vocab_size=512)
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
    stats = engine.stats()
    print(f"engine: {stats['steps']} steps, prefix-cache hit rate {stats['prefix_hit_rate']:.0%}, "
          f"{stats['kv_blocks_total']} KV blocks")


def main() -> int:
    print("== services")
    check_services()
    print("== engine (tiny random model on the CPU)")
    serve(demo_model())
    print("demo: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
