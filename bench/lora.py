"""Mixed-adapter throughput against the engine without adapters and against PEFT; adapter swap and load.

    python -m bench.lora [--json] [--quick]

One process, the model of bench.engine, 16 rank-16 adapters on all 7 projections, 64 requests of 64 random
prompt tokens + 32 greedy new tokens (ignore_eos); row i uses adapter i % 16. Keys (tokens per wall second,
best of the timed runs after a warm-up run, runs of the sides interleaved so load drift hits all alike):
  peft_mixed_tok_s     PEFT `generate` of all 64 rows at once with per-row `adapter_names`
  peft_loop_tok_s      PEFT: set_adapter per adapter, generate its 4 rows
  engine_base_tok_s    the engine, no adapters
  engine_mixed_tok_s   the engine, row i with adapter i % 16, one batch
  swap_p50_ms / swap_p99_ms   copying a host-resident rank-16 adapter into a device slot (the hot-swap)
  load_from_disk_ms    `Engine.load_adapter` of one adapter folder (read, validate, convert), median
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import bench_model_dir, emit, log, median, parse_args, percentile
from gpu_worker import Engine, EngineConfig, Request, SamplingParams
from gpu_worker.lora.pool import LoRAConfig
from gpu_worker.testing import ALL_LINEAR, build_adapter

TARGETS = {"mixed_vs_base": ">= 0.9", "mixed_vs_peft_mixed": ">= 2.5", "swap_p99_ms": "<= 5"}


@dataclass(frozen=True)
class Sizes:
    num_adapters: int = 16
    rank: int = 16
    num_requests: int = 64
    prompt_len: int = 64
    new_tokens: int = 32
    repeat: int = 2  # timed runs per side, after one warm-up run
    swaps: int = 100


QUICK = Sizes(num_adapters=4, num_requests=16, prompt_len=32, new_tokens=8, repeat=1, swaps=20)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    sizes = QUICK if args.quick else Sizes()
    rng = random.Random(0)
    with bench_model_dir() as model_dir, tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        log(f"building {sizes.num_adapters} rank-{sizes.rank} adapters")
        adapters = {f"a{i}": build_adapter(model_dir, Path(tmp) / f"a{i}", r=sizes.rank, alpha=2 * sizes.rank,
                                           targets=ALL_LINEAR, seed=i) for i in range(sizes.num_adapters)}
        engine = Engine(EngineConfig(model=str(model_dir), lora=LoRAConfig(
            max_loras=sizes.num_adapters, max_lora_rank=sizes.rank, max_stack_rank=sizes.rank)))
        load_ms = load_section(engine, adapters)
        result = {"device": "cpu", "torch_threads": torch.get_num_threads()}
        result |= throughput_section(engine, model_dir, adapters, sizes, rng)
        result |= swap_section(engine, sizes) | {"load_from_disk_ms": load_ms}
    result |= asdict(sizes) | {"targets": TARGETS}
    emit(result, args, title="bench.lora (multi-LoRA, CPU)")
    return result


def load_section(engine: Engine, adapters: dict[str, Path]) -> float:
    times = []
    for name, path in adapters.items():
        start = time.perf_counter()
        engine.load_adapter(name, path)
        times.append(time.perf_counter() - start)
    return median(times) * 1000


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)


def throughput_section(engine, model_dir, adapters, sizes: Sizes, rng: random.Random) -> dict:
    names = list(adapters)
    row_adapters = [names[i % len(names)] for i in range(sizes.num_requests)]
    peft = peft_model(model_dir, adapters)
    runs = {
        "peft_mixed": lambda prompts: peft_mixed(peft, prompts, row_adapters, sizes.new_tokens),
        "peft_loop": lambda prompts: peft_loop(peft, prompts, row_adapters, sizes.new_tokens),
        "engine_base": lambda prompts: engine_run(engine, prompts, [None] * len(prompts), sizes.new_tokens),
        "engine_mixed": lambda prompts: engine_run(engine, prompts, row_adapters, sizes.new_tokens),
    }
    best = {name: 0.0 for name in runs}
    for round_ in range(sizes.repeat + 1):  # round 0 warms up
        for name, run in runs.items():
            prompts = [[rng.randrange(engine.vocab_size) for _ in range(sizes.prompt_len)]
                       for _ in range(sizes.num_requests)]
            log(f"round {round_}: {name}")
            start = time.perf_counter()
            run(prompts)
            tok_s = sizes.num_requests * sizes.new_tokens / (time.perf_counter() - start)
            if round_ > 0:
                best[name] = max(best[name], tok_s)
    result = {f"{name}_tok_s": value for name, value in best.items()}
    result["mixed_vs_base"] = best["engine_mixed"] / best["engine_base"]
    result["mixed_vs_peft_mixed"] = best["engine_mixed"] / best["peft_mixed"]
    return result


def peft_model(model_dir, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def _hf_generate(model, prompts, new_tokens, **kwargs):
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                              pad_token_id=0, **kwargs)


def peft_mixed(model, prompts, row_adapters, new_tokens):
    return _hf_generate(model, prompts, new_tokens, adapter_names=row_adapters)


def peft_loop(model, prompts, row_adapters, new_tokens):
    for name in dict.fromkeys(row_adapters):
        rows = [p for p, a in zip(prompts, row_adapters) if a == name]
        model.set_adapter(name)
        _hf_generate(model, rows, new_tokens)


def engine_run(engine: Engine, prompts, row_adapters, new_tokens):
    requests = [Request(prompt=p, adapters=(a,) if a else (), params=greedy(new_tokens))
                for p, a in zip(prompts, row_adapters)]
    return engine.generate(requests)


def swap_section(engine: Engine, sizes: Sizes) -> dict:
    """Copies host-resident adapters into a device slot, as admission does when an adapter is not resident."""
    pool = engine.lora
    names = list(pool.cpu)
    times = []
    for i in range(sizes.swaps):
        start = time.perf_counter()
        pool.swap_in(names[i % len(names)], slot=0)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ms = [t * 1000 for t in times]
    return {"swap_p50_ms": percentile(ms, 50), "swap_p99_ms": percentile(ms, 99)}


if __name__ == "__main__":
    main()
