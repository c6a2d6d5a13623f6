"""The Triton LoRA path of the engine (LoRAConfig.kernel) against the torch path.

On the CPU the kernels run under triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is
slow: the pools and the model are tiny and the steps few. `test_auto_kernel_on_cuda` runs the compiled
kernels in the engine in a fresh process without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpu_worker import Engine, EngineConfig, Request, SamplingParams
from gpu_worker.kernels import lora as kernels
from gpu_worker.lora import batch as lora_batch
from gpu_worker.lora.batch import add_lora, build_lora_batch, resolve_kernel
from gpu_worker.lora.pool import LoRAConfig

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
CPU = torch.device("cpu")


# --- add_lora: triton against torch on random pools ---------------------------------------------------------


def random_pool(num_slots, width, sizes, in_features, dtype, gen):
    """At [S, in, n_sub * R] and Bt_j [S, R, size_j] filled as AdapterPool.swap_in does: each slot holds an
    adapter of rank 4, 8 or 16 (at most the width), zero-padded to the width R; one slot stays empty."""
    at = torch.zeros(num_slots, in_features, len(sizes) * width)
    bts = [torch.zeros(num_slots, width, size) for size in sizes]
    ranks = []
    for slot in range(num_slots - 1):
        r = min(width, (4, 8, 16)[slot % 3])
        ranks.append(r)
        for j, size in enumerate(sizes):
            a = torch.randn(r, in_features, generator=gen) / in_features**0.5
            b = torch.randn(size, r, generator=gen) / r**0.5
            at[slot, :, j * width:j * width + r] = a.T
            bts[j][slot, :r] = b.T
    return at.to(dtype), [bt.to(dtype) for bt in bts], ranks


def decode_like(rng, num_slots):
    """Rows sorted by stack as the model runner orders them: mostly single adapters, some stacks of 2-3,
    some rows without an adapter; the torch path picks its BGMV layout for these."""
    rows = []
    for _ in range(rng.randrange(10, 18)):
        depth = rng.choice([0, 1, 1, 1, 2, 3])
        rows.append(tuple(rng.sample(range(num_slots - 1), depth)))
    return sorted(rows)


def prefill_like(rng, num_slots):
    """Prefill chunks (runs of one stack, the last one with no adapter) followed by decode rows."""
    rows = []
    for length in (rng.randrange(9, 25), rng.randrange(2, 7), rng.randrange(3, 9)):
        rows += [tuple(rng.sample(range(num_slots - 1), rng.choice([1, 2, 3])))] * length
    rows += [()] * 4
    rows += [tuple(rng.sample(range(num_slots), rng.choice([0, 1, 2]))) for _ in range(3)]
    return rows


# (sizes of the fused module's sub-modules, rank width R): qkv-like (3 subs), gate_up-like (2), o/down-like
# (1); R = 16 pads ranks 4 and 8, R = 8 caps them, R = 12 is a width that is not a power of two.
MODULES = {"qkv": ((32, 16, 16), 16), "gate_up": ((48, 48), 8), "down": ((40,), 16),
           "qkv-r12": ((24, 8, 8), 12)}
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


@needs_triton
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("layout", ["bgmv", "sgmv"])
@pytest.mark.parametrize("seed", range(2))
def test_add_lora_triton_matches_torch(seed, layout, module, dtype):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    sizes, width = MODULES[module]
    num_slots, in_features = 7, 40
    at, bts, _ = random_pool(num_slots, width, sizes, in_features, dtype, gen)
    token_slots = (decode_like if layout == "bgmv" else prefill_like)(rng, num_slots)
    assert any(len(s) > 1 for s in token_slots) and any(not s for s in token_slots)
    batch = build_lora_batch(token_slots, CPU)
    assert batch.bgmv == (layout == "bgmv")
    # x as a column slice of a wider tensor, as down_proj reads the gate half of gate_up's output.
    x = torch.randn(len(token_slots), in_features + 8, generator=gen).to(dtype)[:, :in_features]
    y = torch.randn(len(token_slots), sum(sizes), generator=gen).to(dtype)
    expected = y.double()
    rank = width
    for t, stack in enumerate(token_slots):  # fp64 loop over (token, slot, sub-module)
        for s in stack:
            z = x[t].double() @ at[s].double()
            offset = 0
            for j, bt in enumerate(bts):
                expected[t, offset:offset + bt.shape[-1]] += z[j * rank:(j + 1) * rank] @ bt[s].double()
                offset += bt.shape[-1]
    by_torch, by_triton = y.clone(), y.clone()
    add_lora(batch, x, by_torch, at, bts, kernel="torch")
    add_lora(batch, x, by_triton, at, bts, kernel="triton")
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(by_triton.double(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(by_triton.double(), by_torch.double(), atol=2 * atol, rtol=2 * rtol)
    untouched = torch.tensor([not s for s in token_slots])
    assert torch.equal(by_triton[untouched], y[untouched])  # rows without an adapter: bit-for-bit unchanged


def test_triton_indices_are_built_once_per_step():
    token_slots = [(1,)] * 5 + [(0, 1)] * 3 + [()] * 2 + [(0, 1), (1,)]
    batch = build_lora_batch(token_slots, CPU)
    assert not batch.bgmv and batch._triton is None  # built lazily, on the first layer's use
    indices = batch.triton_indices()
    assert batch.triton_indices() is indices
    # Runs of one stack: one segment per slot, a run's segments adjacent over the same tokens.
    assert indices.seg_starts.tolist() == [0, 5, 8, 11, 12, 13, 14]
    assert indices.seg_slots.tolist() == [1, 0, 1, 0, 1, 1]
    assert indices.tok_start.tolist() == [0, 5, 5, 10, 10, 11]
    assert (indices.num_pairs, indices.max_seg_len) == (14, 5)
    assert all(t.dtype == torch.int32 for t in (indices.seg_starts, indices.seg_slots, indices.tok_start))

    decode = [(0,), (0, 1), (1,), (2,), (), (2, 3), (3,)]
    batch = build_lora_batch(decode, CPU, kernel="triton")
    assert batch.bgmv and batch._triton is not None  # eagerly
    indices = batch.triton_indices()
    assert indices.tok.tolist() == [0, 1, 1, 2, 3, 5, 5, 6]  # a token's stack adjacent
    assert indices.slot.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# --- the engine: kernel="triton" against kernel="torch" -----------------------------------------------------

ENGINE_ADAPTERS = ("all_r8", "attn_r4", "mlp_r16", "pattern_r8")  # ranks 4, 8 (4 for down_proj), 16
STACKS = [(), ("all_r8",), ("attn_r4",), ("mlp_r16",), ("all_r8", "pattern_r8"), ("mlp_r16", "attn_r4")]
PARAMS = SamplingParams(max_tokens=5, temperature=0.0, logprobs=True, ignore_eos=True)


def run_engine(model_dir, adapters, kernel, device="cpu", **config):
    engine = Engine(EngineConfig(model=str(model_dir), device=device, lora=LoRAConfig(kernel=kernel),
                                 **config))
    for name in ENGINE_ADAPTERS:
        engine.load_adapter(name, adapters[name])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (13, 4, 9, 40, 6, 2)]
    requests = [Request(prompt=p, adapters=stack, params=PARAMS) for p, stack in zip(prompts, STACKS)]
    requests.append(Request(prompt=prompts[0][:7], adapters=("all_r8",), params=PARAMS))
    return engine, engine.generate(requests)


PATHS = ("_bgmv", "_sgmv", "_triton_bgmv", "_triton_sgmv")  # add_lora's paths, looked up at each call


def counting(calls, name, fn):
    def spy(*args):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args)

    return spy


@pytest.fixture
def spy_paths(monkeypatch):
    """Counts the calls of each add_lora path."""
    calls = {}
    for name in PATHS:
        monkeypatch.setattr(lora_batch, name, counting(calls, name, getattr(lora_batch, name)))
    return calls


@needs_triton
@pytest.mark.parametrize("setting", [{}, {"max_num_batched_tokens": 16}], ids=["whole-prefill", "chunked"])
def test_engine_triton_matches_torch(setting, qwen2_dir, adapters, spy_paths):
    started = time.perf_counter()
    _, by_torch = run_engine(qwen2_dir, adapters, "torch", **setting)
    torch_calls = dict(spy_paths)
    spy_paths.clear()
    torch_seconds = time.perf_counter() - started
    engine, by_triton = run_engine(qwen2_dir, adapters, "triton", **setting)
    print(f"\nengine {setting}: torch {torch_seconds:.1f}s, triton (interpreted) "
          f"{time.perf_counter() - started - torch_seconds:.1f}s, paths {torch_calls} / {spy_paths}")
    assert set(torch_calls) <= {"_bgmv", "_sgmv"}
    assert set(spy_paths) == {"_triton_bgmv", "_triton_sgmv"}  # prefill-like and decode-like steps
    assert engine.lora.rank_width == 16
    for i, (a, b) in enumerate(zip(by_torch, by_triton)):
        assert a.token_ids == b.token_ids, f"row {i}: tokens differ"
        assert b.logprobs == pytest.approx(a.logprobs, abs=2e-5), f"row {i}: logprobs differ"
    base = by_triton[0].token_ids
    assert sum(c.token_ids != base for c in by_triton[1:]) >= 3  # the adapters act


# --- the kernel choice --------------------------------------------------------------------------------------


def test_kernel_choice_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="kernel must be one of"):
        LoRAConfig(kernel="cuda")
    assert resolve_kernel("torch", CPU) == "torch"
    assert resolve_kernel("auto", CPU) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel("auto", CPU) == "torch"  # auto never runs interpreted kernels
    if kernels.HAS_TRITON:
        assert resolve_kernel("triton", CPU) == "triton"
        assert LoRAConfig(kernel="triton").kernel == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="kernel='triton' cannot run on device 'cpu'.*TRITON_INTERPRET=1"):
        resolve_kernel("triton", CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="kernel='triton'.*no CUDA device.*TRITON_INTERPRET=1"):
        LoRAConfig(kernel="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(ValueError, match="triton is not installed"):
        LoRAConfig(kernel="triton")
    with pytest.raises(ValueError, match="triton is not installed"):
        resolve_kernel("triton", CPU)
    assert resolve_kernel("auto", torch.device("cuda")) == "torch"


CLEAN_ENV_CHILD = """
import sys
from gpu_worker import Engine, EngineConfig
from gpu_worker.lora.pool import LoRAConfig
stage = "config"
try:
    config = EngineConfig(model=sys.argv[1], lora=LoRAConfig(kernel="triton"))
    stage = "engine"
    engine = Engine(config)
    stage = "load_adapter"
    engine.load_adapter("a", sys.argv[2])
    print("NO ERROR")
except ValueError as e:
    print(stage, "|", e)
"""


def test_forced_triton_on_a_cpu_engine_without_interpreter_fails_clearly(qwen2_dir, adapters):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-c", CLEAN_ENV_CHILD, str(qwen2_dir), str(adapters["all_r8"])],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    stage, _, message = result.stdout.strip().rpartition("\n")[2].partition(" | ")
    assert "TRITON_INTERPRET=1" in message and "use kernel='auto' or 'torch'" in message, result.stdout
    # The EngineConfig itself is refused (it resolves the choice on its device), with or without CUDA.
    assert stage == "config", result.stdout


# --- compiled kernels on CUDA -------------------------------------------------------------------------------


def compare_on_cuda(model_dir, adapter_dirs):
    """Entry point of the child process of `test_auto_kernel_on_cuda` (no TRITON_INTERPRET)."""
    adapters = json.loads(adapter_dirs)
    assert resolve_kernel("auto", torch.device("cuda")) == "triton"
    originals = {name: getattr(lora_batch, name) for name in PATHS}
    results = {}
    for kernel in ("torch", "auto"):
        calls = {}
        for name in PATHS:
            setattr(lora_batch, name, counting(calls, name, originals[name]))
        for chunked, setting in enumerate(({}, {"max_num_batched_tokens": 16})):
            _, results[kernel, chunked] = run_engine(model_dir, adapters, kernel, device="cuda", **setting)
        print(kernel, calls)
        assert set(calls) == ({"_triton_bgmv", "_triton_sgmv"} if kernel == "auto" else {"_bgmv", "_sgmv"})
    for chunked in (0, 1):
        for i, (a, b) in enumerate(zip(results["torch", chunked], results["auto", chunked])):
            assert a.token_ids == b.token_ids, f"row {i}: tokens differ"
            assert max(abs(p - q) for p, q in zip(a.logprobs, b.logprobs)) < 1e-4, f"row {i}: logprobs"


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_kernel_on_cuda(qwen2_dir, adapters):
    tests_dir = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), str(tests_dir.parent)])
    code = "import sys, test_lora_triton_engine as t; t.compare_on_cuda(sys.argv[1], sys.argv[2])"
    dirs = json.dumps({name: str(path) for name, path in adapters.items()})
    result = subprocess.run([sys.executable, "-c", code, str(qwen2_dir), dirs], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
