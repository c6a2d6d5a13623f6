"""One-shot GPU check: a Qwen2.5-7B-shaped engine against its memory floor (bf16, nf4), multi-LoRA at 7B
shapes, and the CUDA-only tests with the Triton kernels compiled for real. One command, one JSON object.

    python -m bench.gpu --json                    # needs CUDA; ~5 min on an H100 estimated (not yet run)
    python -m bench.gpu --json --layers 8         # a shallower model: faster, the same per-layer figures
    python -m bench.gpu --json --sections decode,lora --out result.json
    python -m bench.gpu --tiny --json             # the same code with tiny shapes on the CPU (the CPU test)

Without CUDA and without --tiny it exits 2 at once. Sections (`--sections`, default all), in this order:
  bandwidth  a large device-to-device copy: GB/s counting bytes read and written (the floors below use it)
  pytest     `pytest -q -m gpu` over the test files with `@pytest.mark.gpu` tests, in a subprocess without
             TRITON_INTERPRET (the Triton kernels compile for real): passed / failed / skipped counts
  decode     engine decode step (bf16) at batch 1 / 16 / 64, contexts ~256 tokens: median ms per step, and
             over_floor = step / (decode weight bytes / bandwidth); also the floor with the KV reads added
  lora       35 rank-16 adapters on all 7 projections, batch 64, row i uses adapter i % 35: decode step with
             kernel "auto" (Triton on CUDA) vs the same batch without adapters, vs kernel "torch" (the
             pool's hooks re-attached, same weights), and one layer's add_lora (4 fused projections) timed
             with CUDA events against the adapter bytes it must read
  nf4        the decode section again with quantization="nf4" (bitsandbytes); skipped when it does not import
The model is random (no download): config.json + sharded bf16 safetensors with the Hugging Face Qwen2 names,
generated on the device and written to a temporary folder (--workdir), with a progress bar on stderr.
Every section is guarded: a failure is reported under `errors` and the others still run; a section that
cannot run is listed under `skipped` with the reason. A section is not started past --budget-s seconds, so
the JSON is printed inside one 10-minute device call; with --out the JSON is also rewritten after every
section (a run killed at its time limit still leaves what it measured). Exit code 1 when a section failed.

This module has no top-level `main`, so `python -m bench` (which runs every bench on the CPU) skips it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.common import emit, log, median, parse_args, percentile, rounded

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("bandwidth", "pytest", "decode", "lora", "nf4")
NEEDS_MODEL = ("decode", "lora", "nf4")
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NO_CUDA = ("bench.gpu needs a CUDA device (torch.cuda.is_available() is False); "
           "run `python -m bench.gpu --tiny` for a CPU smoke run of the same code")


@dataclass(frozen=True)
class Shape:
    """A Qwen2 model's shape (qkv bias; untied embeddings)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_position: int = 32768
    rope_theta: float = 1e6

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) per projection."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


QWEN25_7B = Shape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064)
TINY_SHAPE = Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, max_position=2048)


@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...] = (1, 16, 64)
    prompt_len: int = 248  # contexts ~256 tokens over the timed steps
    warmup: int = 4  # decode steps before timing
    repeat: int = 16  # timed decode steps
    adapters: int = 35
    rank: int = 16
    lora_batch: int = 64
    layer_repeat: int = 50  # timed add_lora calls of one layer
    bandwidth_bytes: int = 1 << 30  # the copied tensor (read and written: twice that moved)
    shard_bytes: int = 2 << 30


TINY_PLAN = Plan(batches=(1, 4, 8), prompt_len=24, warmup=2, repeat=4, adapters=5, rank=8, lora_batch=10,
                 layer_repeat=5, bandwidth_bytes=32 << 20, shard_bytes=64 << 10)


class SectionSkipped(Exception):
    """A section that cannot run here; its message is the reason."""


# --- the random checkpoint ----------------------------------------------------------------------------


def hf_config(shape: Shape) -> dict:
    """config.json of a Qwen2.5-7B-like model (tie_word_embeddings false, no sliding window)."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
            "max_position_embeddings": shape.max_position, "max_window_layers": shape.layers,
            "rms_norm_eps": 1e-6, "rope_theta": shape.rope_theta, "sliding_window": shape.max_position,
            "use_sliding_window": False, "tie_word_embeddings": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": shape.vocab - 1,
            "dtype": "bfloat16"}


def checkpoint_tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face Qwen2 name, shape) of every tensor of the checkpoint, in file order."""
    h, sizes = shape.hidden, shape.module_shapes()
    tensors = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        tensors.append((p + "input_layernorm.weight", (h,)))
        for m in ("q_proj", "k_proj", "v_proj"):
            tensors += [(p + f"self_attn.{m}.weight", sizes[m][::-1]),
                        (p + f"self_attn.{m}.bias", (sizes[m][1],))]
        tensors += [(p + "self_attn.o_proj.weight", sizes["o_proj"][::-1]),
                    (p + "post_attention_layernorm.weight", (h,))]
        tensors += [(p + f"mlp.{m}.weight", sizes[m][::-1]) for m in ("gate_proj", "up_proj", "down_proj")]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return tensors


def _random(name: str, size: tuple[int, ...], gen: torch.Generator, device, dtype) -> torch.Tensor:
    t = torch.randn(size, generator=gen, device=device, dtype=dtype)
    if name.endswith("norm.weight"):
        return t.mul_(0.1).add_(1.0)  # near 1, not exactly (a loader that skipped norms would show)
    return t.mul_(0.02)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    tty = sys.stderr.isatty()  # captured logs get a line every 15 s, not a stream of carriage returns
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                mininterval=0.5 if tty else 15)


def _write_shards(shards: list[list[tuple[str, tuple[int, ...]]]], make: Callable, out_dir: Path,
                  names: list[str], bar) -> None:
    """Generates each shard's tensors (make(name, size) on the device) and saves it while the next is made."""
    from safetensors.torch import save_file

    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for shard, file_name in zip(shards, names):
            tensors = {}
            for name, size in shard:
                tensors[name] = make(name, size).cpu()
                bar.update(tensors[name].nbytes)
            if pending is not None:
                pending.result()  # at most one shard in host memory waiting for the disk
            pending = writer.submit(save_file, tensors, str(out_dir / file_name), {"format": "pt"})
        if pending is not None:
            pending.result()


def build_checkpoint(out_dir: str | Path, shape: Shape, device: str | torch.device,
                     shard_bytes: int = 2 << 30, seed: int = 0) -> tuple[Path, int]:
    """Writes a random bf16 Qwen2 checkpoint (config.json, sharded safetensors + index) in out_dir, generating
    the weights on `device` in shard-sized chunks. Returns (out_dir, bytes of the weights)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(shape)
    shards, size = [[]], 0
    for name, dims in tensors:
        nbytes = 2 * math.prod(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(2 * math.prod(dims) for _, dims in tensors)
    (out_dir / "config.json").write_text(json.dumps(hf_config(shape), indent=1) + "\n")
    index = {"metadata": {"total_size": total},
             "weight_map": {name: file for shard, file in zip(shards, names) for name, _ in shard}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index) + "\n")
    gen = torch.Generator(device=device).manual_seed(seed)
    with _progress(total, "model") as bar, torch.inference_mode():
        make = lambda name, dims: _random(name, dims, gen, device, torch.bfloat16)  # noqa: E731
        _write_shards(shards, make, out_dir, names, bar)
    return out_dir, total


def build_adapters(out_root: str | Path, shape: Shape, count: int, rank: int, device: str | torch.device,
                   seed: int = 1) -> dict[str, Path]:
    """Writes `count` random PEFT LoRA folders (rank `rank`, all 7 projections of every layer, bf16)."""
    out_root, sizes = Path(out_root), shape.module_shapes()
    per_adapter = 2 * rank * shape.layers * sum(i + o for i, o in sizes.values())
    gen = torch.Generator(device=device).manual_seed(seed)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "target_modules": list(MODULES),
              "base_model_name_or_path": "bench-gpu-random-qwen2"}
    paths = {}
    with _progress(count * per_adapter, "adapters") as bar, torch.inference_mode():
        for a in range(count):
            folder = out_root / f"a{a}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_config.json").write_text(json.dumps(config) + "\n")
            shard = []
            for i in range(shape.layers):
                for m in MODULES:
                    parent = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                    key = f"base_model.model.model.layers.{i}.{parent}.{m}"
                    shard += [(f"{key}.lora_A.weight", (rank, sizes[m][0])),
                              (f"{key}.lora_B.weight", (sizes[m][1], rank))]
            make = lambda name, dims: torch.randn(dims, generator=gen, device=device,  # noqa: E731
                                                  dtype=torch.bfloat16).mul_(0.02)
            _write_shards([shard], make, folder, ["adapter_model.safetensors"], bar)
            paths[f"a{a}"] = folder
    return paths


# --- measuring ----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Seconds per call of fn: CUDA events around `repeat` back-to-back calls (wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / repeat


def measure_bandwidth(device: torch.device, nbytes: int) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 256)
    dst = torch.empty_like(src)
    seconds = device_seconds(lambda: dst.copy_(src), device, warmup=3, repeat=10)
    return {"copy_bytes": nbytes, "copy_ms": seconds * 1000, "gbps": 2 * nbytes / seconds / 1e9}


def decode_weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every projection (nf4: packed weights + their scales),
    the head, the norms; not the embedding table (one row per token) unless it doubles as the head."""
    total = 0
    for linear in model.linear_layers().values():
        if linear.quantized is not None:
            total += sum(p.numel() * p.element_size() for p in linear.quantized.parameters())
            total += _quant_state_bytes(getattr(linear.quantized.weight, "quant_state", None))
        else:
            total += linear.weight.nbytes + (linear.bias.nbytes if linear.bias is not None else 0)
    total += sum(p.nbytes for name, p in model.named_parameters() if "norm" in name)
    if model.lm_head is None:
        total += model.embed_tokens.weight.nbytes
    return total


def _quant_state_bytes(state) -> int:
    if state is None:
        return 0
    total = getattr(state, "absmax", torch.empty(0)).nbytes
    nested = getattr(state, "state2", None)
    return total + (getattr(nested, "absmax", torch.empty(0)).nbytes if nested is not None else 0)


def greedy(max_tokens: int):
    from gpu_worker import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def decode_steps(engine, rng: random.Random, batch: int, plan: Plan,
                 adapters: list[str] | None = None) -> dict:
    """Starts `batch` requests (prompt_len random tokens; row i with adapters[i % len] if given), steps until
    all decode, then times `repeat` pure decode steps after `warmup`. Aborts the requests at the end."""
    from gpu_worker import Request

    # Rows admitted first decode while the last prompts prefill (batch 64 x 248 tokens: ~8 steps of the
    # 2,048-token budget): a wide margin, so that no row finishes inside the timed steps.
    max_tokens = plan.warmup + plan.repeat + 64
    ids, seconds, generated = [], [], Counter()
    try:
        for i in range(batch):
            prompt = [rng.randrange(engine.vocab_size) for _ in range(plan.prompt_len)]
            stack = (adapters[i % len(adapters)],) if adapters else ()
            ids.append(engine.add_request(Request(prompt=prompt, adapters=stack, params=greedy(max_tokens))))
        for _ in range(10_000):  # prefill (chunked by the step's token budget) until every row decodes
            if len(generated) == batch:
                break
            generated.update(d.request_id for d in engine.step() if d.token_id is not None)
        else:
            raise RuntimeError(f"{batch} requests did not all start decoding")
        for i in range(plan.warmup + plan.repeat):
            synchronize(engine.device)
            start = time.perf_counter()
            deltas = engine.step()  # sampling reads the tokens back: the step has finished on the device
            if i >= plan.warmup:
                seconds.append(time.perf_counter() - start)
            if len(deltas) != batch:
                raise RuntimeError(f"expected a pure decode step of {batch} rows, got {len(deltas)} deltas")
    finally:
        for request_id in ids:
            engine.abort(request_id)
    context = plan.prompt_len + round(median(list(generated.values()))) + plan.warmup + plan.repeat // 2
    return {"step_ms": median(seconds) * 1000, "p90_ms": percentile(seconds, 90) * 1000, "context": context}


def decode_table(engine, rng: random.Random, plan: Plan, bandwidth_gbps: float, shape: Shape) -> dict:
    """Decode step per batch size against the weight-read floor (and the floor with the KV reads)."""
    weight_bytes = decode_weight_bytes(engine.model)
    floor_ms = weight_bytes / (bandwidth_gbps * 1e9) * 1000
    out = {"weight_bytes": weight_bytes, "floor_ms": floor_ms}
    itemsize = torch.tensor([], dtype=engine.config.torch_dtype).element_size()
    for batch in plan.batches:
        log(f"  batch {batch}")
        row = decode_steps(engine, rng, batch, plan)
        kv_bytes = batch * row["context"] * shape.kv_bytes_per_token(itemsize)
        kv_floor_ms = (weight_bytes + kv_bytes) / (bandwidth_gbps * 1e9) * 1000
        row |= {"over_floor": row["step_ms"] / floor_ms, "kv_bytes": kv_bytes,
                "floor_with_kv_ms": kv_floor_ms, "over_floor_with_kv": row["step_ms"] / kv_floor_ms}
        out[f"b{batch}"] = row
    return out


# --- the run ------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir = args, workdir
        self.tiny = args.tiny
        self.plan, self.shape = (TINY_PLAN, TINY_SHAPE) if args.tiny else (Plan(), QWEN25_7B)
        if args.layers is not None:
            self.shape = replace(self.shape, layers=args.layers)
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.start = time.perf_counter()
        self.result: dict = {"device": device_info(self.device), "versions": versions(), "tiny": args.tiny,
                             "plan": asdict(self.plan), "model": {}, "skipped": {}, "errors": {},
                             "section_s": {}}
        self.rng = random.Random(0)
        self.bandwidth: dict | None = None
        self._model_dir: Path | None = None
        self._model_error: str | None = None
        self.engine = None  # the bf16 engine, shared by decode and lora

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def model_dir(self) -> Path:
        if self._model_error is not None:
            raise RuntimeError(f"the model could not be built: {self._model_error}")
        if self._model_dir is None:
            try:
                self._model_dir = self._build_model()
            except Exception as e:
                self._model_error = f"{type(e).__name__}: {e}"
                raise
        return self._model_dir

    def _build_model(self) -> Path:
        shape = self.shape
        need = 2 * sum(math.prod(d) for _, d in checkpoint_tensors(shape))
        free = shutil.disk_usage(self.workdir).free
        if free < 1.2 * need:
            raise RuntimeError(f"{self.workdir} has {free / 2**30:.1f} GiB free; the model needs "
                               f"{need / 2**30:.1f} GiB (use --workdir or --layers)")
        log(f"building a random {shape.layers}-layer Qwen2, hidden {shape.hidden}, {need / 1e9:.2f} GB bf16")
        start = time.perf_counter()
        path, nbytes = build_checkpoint(self.workdir / "model", shape, self.device, self.plan.shard_bytes)
        synchronize(self.device)
        full = TINY_SHAPE if self.tiny else QWEN25_7B
        self.result["model"] = {"shape": asdict(shape), "full_layers": full.layers,
                                "params": nbytes // 2, "checkpoint_bytes": nbytes,
                                "shards": len(list(path.glob("*.safetensors"))),
                                "build_s": time.perf_counter() - start}
        return path

    def engine_config(self, quantization: str | None = None, lora: bool = False):
        from gpu_worker import EngineConfig
        from gpu_worker.lora.pool import LoRAConfig

        plan = self.plan
        tokens = max(max(plan.batches), plan.lora_batch) * (plan.prompt_len + plan.warmup + plan.repeat + 48)
        kv_bytes = int(tokens * self.shape.kv_bytes_per_token() * 1.5)
        lora_config = LoRAConfig()
        if lora:
            lora_config = LoRAConfig(max_loras=plan.adapters, max_cpu_loras=max(64, plan.adapters),
                                     max_lora_rank=plan.rank, max_stack_rank=plan.rank, kernel="auto")
        return EngineConfig(model=str(self.model_dir()), device=str(self.device), dtype="bfloat16",
                            quantization=quantization, kv_cache_bytes=kv_bytes, lora=lora_config)

    def bf16_engine(self):
        if self.engine is None:
            from gpu_worker import Engine

            config = self.engine_config(lora="lora" in self.args.sections)
            log("loading the bf16 engine")
            start = time.perf_counter()
            self.engine = Engine(config)
            synchronize(self.device)
            self.result["model"]["bf16_load_s"] = time.perf_counter() - start
        return self.engine

    def drop_engine(self) -> None:
        if self.engine is not None and self.engine.lora is not None:
            self.engine.lora.close()
        self.engine = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def bandwidth_gbps(self) -> float:
        """The measured copy bandwidth (measured on first use; also reported when its section is off)."""
        if self.bandwidth is None:
            self.bandwidth = measure_bandwidth(self.device, self.plan.bandwidth_bytes)
            self.result["bandwidth"] = self.bandwidth
        return self.bandwidth["gbps"]

    def section(self, name: str, fn: Callable[[Run], dict]) -> None:
        if name not in self.args.sections:
            return
        if self.elapsed() > self.args.budget_s:
            self.result["skipped"][name] = (f"time budget: {self.elapsed():.0f} s elapsed > --budget-s "
                                            f"{self.args.budget_s:.0f}")
            return
        log(f"[{self.elapsed():5.0f} s] section {name}")
        start = time.perf_counter()
        try:
            self.result[name] = fn(self)
        except SectionSkipped as e:
            self.result["skipped"][name] = str(e)
        except Exception as e:  # noqa: BLE001 - reported, and the other sections still run
            lines = traceback.format_exc().strip().splitlines()
            self.result["errors"][name] = f"{type(e).__name__}: {e}"[:2000] + "\n" + "\n".join(lines[-12:])
            log(f"section {name} FAILED: {type(e).__name__}: {e}")
        finally:
            self.result["section_s"][name] = time.perf_counter() - start
            self.save_partial()

    def save_partial(self) -> None:
        if self.args.out is not None:
            self.args.out.write_text(json.dumps(rounded(self.result)) + "\n")


def bandwidth_section(run: Run) -> dict:
    run.bandwidth_gbps()
    return run.bandwidth


def decode_section(run: Run) -> dict:
    engine = run.bf16_engine()
    return decode_table(engine, run.rng, run.plan, run.bandwidth_gbps(), run.shape)


def lora_section(run: Run) -> dict:
    from gpu_worker.lora.layer import attach_lora

    plan, shape = run.plan, run.shape
    engine = run.bf16_engine()
    start = time.perf_counter()
    log(f"writing {plan.adapters} rank-{plan.rank} adapters")
    paths = build_adapters(run.workdir / "adapters", shape, plan.adapters, plan.rank, run.device)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    for name, path in paths.items():  # read and parsed on the engine's loader thread, in order
        engine.load_adapter(name, path, wait=False)
    for name in paths:
        engine.lora.wait(name)
    load_s = time.perf_counter() - start
    names = list(paths)
    pool, gbps = engine.lora, run.bandwidth_gbps()
    auto_kernel = pool.kernel
    out = {"adapters": plan.adapters, "rank": plan.rank, "batch": plan.lora_batch, "auto_kernel": auto_kernel,
           "write_s": write_s, "load_s": load_s}
    log("  batch without adapters")
    base = decode_steps(engine, run.rng, plan.lora_batch, plan)
    log(f"  mixed adapters, kernel auto ({auto_kernel})")
    auto = decode_steps(engine, run.rng, plan.lora_batch, plan, names)
    slots = [pool.slot_of[names[i % len(names)]] for i in range(plan.lora_batch)]
    layer_auto_s, layer_bytes = layer_lora_seconds(engine, slots, auto_kernel, plan.layer_repeat)
    try:
        pool.config = replace(pool.config, kernel="torch")
        attach_lora(engine.model, pool)
        log("  mixed adapters, kernel torch")
        torch_row = decode_steps(engine, run.rng, plan.lora_batch, plan, names)
        layer_torch_s, _ = layer_lora_seconds(engine, slots, "torch", plan.layer_repeat)
    finally:
        pool.config = replace(pool.config, kernel="auto")
        attach_lora(engine.model, pool)
    distinct_bytes = layer_bytes * shape.layers  # every distinct adapter's weights, all layers
    floor_ms = (decode_weight_bytes(engine.model) + distinct_bytes) / (gbps * 1e9) * 1000
    out |= {"rank_width": pool.rank_width, "adapter_bytes_read": distinct_bytes,
            "base_step_ms": base["step_ms"], "auto_step_ms": auto["step_ms"],
            "torch_step_ms": torch_row["step_ms"],
            "context": auto["context"], "auto_over_base": auto["step_ms"] / base["step_ms"],
            "torch_over_auto": torch_row["step_ms"] / auto["step_ms"], "floor_ms": floor_ms,
            "auto_over_floor": auto["step_ms"] / floor_ms,
            "layer": {"adapter_bytes": layer_bytes, "auto_us": layer_auto_s * 1e6,
                      "torch_us": layer_torch_s * 1e6, "auto_gbps": layer_bytes / layer_auto_s / 1e9,
                      "torch_gbps": layer_bytes / layer_torch_s / 1e9,
                      "auto_of_bandwidth": layer_bytes / layer_auto_s / 1e9 / gbps}}
    return out


def layer_lora_seconds(engine, slots: list[int], kernel: str, repeat: int) -> tuple[float, int]:
    """Seconds of one layer's add_lora over its 4 fused projections for rows using `slots` (decode layout:
    rows sorted by slot), and the bytes of the distinct adapters' weights that it must read."""
    from gpu_worker.lora.batch import add_lora, build_lora_batch

    pool, device = engine.lora, engine.device
    batch = build_lora_batch(sorted((s,) for s in slots), device, kernel)
    ops, nbytes, distinct = [], 0, sorted(set(slots))
    for at, bts in pool.weights[0].values():
        x = torch.randn(len(slots), at.shape[1], dtype=pool.dtype, device=device)
        y = torch.zeros(len(slots), sum(bt.shape[-1] for bt in bts), dtype=pool.dtype, device=device)
        ops.append((x, y, at, bts))
        nbytes += len(distinct) * (at[0].nbytes + sum(bt[0].nbytes for bt in bts))

    def run():
        for x, y, at, bts in ops:
            add_lora(batch, x, y, at, bts, kernel)

    with torch.inference_mode():
        return device_seconds(run, device, warmup=3, repeat=repeat), nbytes


def nf4_section(run: Run) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure (missing package, missing CUDA library)
        raise SectionSkipped(f"bitsandbytes does not import: {type(e).__name__}: {e}") from None
    from gpu_worker import Engine

    run.drop_engine()  # its memory back before the nf4 copy is loaded
    config = run.engine_config(quantization="nf4")
    log("loading the nf4 engine")
    start = time.perf_counter()
    engine = Engine(config)
    synchronize(run.device)
    load_s = time.perf_counter() - start
    try:
        return {"load_s": load_s} | decode_table(engine, run.rng, run.plan, run.bandwidth_gbps(), run.shape)
    finally:
        del engine
        gc.collect()


def gpu_test_files(tests_dir: Path = REPO / "tests") -> list[Path]:
    """Test files with a test marked `@pytest.mark.gpu` (a decorator line, not a string that holds one)."""
    return sorted(p for p in tests_dir.glob("test_*.py")
                  if any(line.strip() == "@pytest.mark.gpu" for line in p.read_text().splitlines()))


_COUNT = r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)\b"


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's closing line ('2 passed, 1 failed, 3 deselected in 9.1s')."""
    for line in reversed(output.strip().splitlines()):
        found = re.findall(_COUNT, line)
        if found and re.search(r"\bin [\d.]+s", line):
            counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
            for number, word in found:
                word = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[word] = counts.get(word, 0) + int(number)
            return counts
    return {}


def pytest_section(run: Run) -> dict:
    if run.device.type != "cuda":
        raise SectionSkipped("no CUDA device (--tiny): the CUDA-only tests would all skip")
    files = gpu_test_files()
    if not files:
        raise SectionSkipped("no test file has a @pytest.mark.gpu test")
    return run_gpu_tests(files, run.args.pytest_timeout_s)


def run_gpu_tests(files: list[Path], timeout: float) -> dict:
    """`pytest -q -m gpu FILES` in a subprocess whose environment has no TRITON_INTERPRET; its counts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               *(str(p.relative_to(REPO)) for p in files)]
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        raise RuntimeError(f"pytest timed out after {timeout:.0f} s; output tail:\n"
                           f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}") from None
    output = proc.stdout + proc.stderr
    counts = pytest_counts(proc.stdout)
    out = {"command": " ".join(command[1:]), "returncode": proc.returncode, **counts}
    notable = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    if notable:
        out["summary"] = notable[:20]
    if proc.returncode != 0 or not counts or counts.get("passed", 0) == 0:
        out["tail"] = "\n".join(output.strip().splitlines()[-40:])
    return out


# --- environment --------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "bitsandbytes": _version("bitsandbytes"),
            "safetensors": _version("safetensors")}


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": "cpu", "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count}


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (no CUDA needed)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: 28; 2 with --tiny)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no section after this many seconds (default 420)")
    parser.add_argument("--pytest-timeout-s", type=float, default=240.0,
                        help="the pytest section's limit (default 240)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary model folder goes (default: the system temp folder)")


def check(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 ok, 1 a section failed, 2 no CUDA without --tiny)."""
    args = parse_args(__doc__.splitlines()[0], argv, _add_arguments)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"bench.gpu: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.layers is not None and args.layers < 1:
        print("bench.gpu: --layers must be >= 1", file=sys.stderr)
        return 2
    args.sections = sections
    if not args.tiny:
        if not torch.cuda.is_available():
            print(NO_CUDA, file=sys.stderr)
            return 2
        # Compiled Triton kernels: triton.jit reads this when a kernel is first built (after this point).
        os.environ.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_", dir=args.workdir) as tmp:
        run = Run(args, Path(tmp))
        run.section("bandwidth", bandwidth_section)
        run.section("pytest", pytest_section)
        run.section("decode", decode_section)
        run.section("lora", lora_section)
        run.section("nf4", nf4_section)
        run.drop_engine()
    if run.device.type == "cuda":
        run.result["peak_gpu_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    run.result["total_s"] = run.elapsed()
    emit(run.result, args, title="bench.gpu")
    return 1 if run.result["errors"] else 0


if __name__ == "__main__":
    sys.exit(check())
