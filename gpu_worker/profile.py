"""`npc-worker profile`: kernel micro-benchmarks, engine step time by batch size and adapter mix, and an
end-to-end load run through IPC (a worker subprocess), as rich tables or one JSON object (--json).

    npc-worker profile                       # a random tiny model and adapters, built in a temp folder
    npc-worker profile --model DIR --adapters-dir DIR --json --trace trace.json

--trace writes a torch.profiler chrome trace of the engine section (open it in Perfetto or
chrome://tracing). Times are medians of `--iters` runs after one warm-up run, in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: a random tiny Qwen2)")
    p.add_argument("--adapters-dir", default=None, help="PEFT folders (default: random adapters)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8, 32], help="comma-separated (1,8,32)")
    p.add_argument("--iters", type=_positive, default=10)
    p.add_argument("--requests", type=_positive, default=32, help="requests of the end-to-end IPC run")
    p.add_argument("--max-tokens", type=_positive, default=16)
    p.add_argument("--skip-ipc", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--trace", default=None, help="write a torch.profiler chrome trace here")


def _median_us(fn, iters: int, sync) -> float:
    fn()  # warm-up: compilation, caches, allocator
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def _sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def build_fixtures(root: Path) -> tuple[str, str]:
    """A random tiny model with a tokenizer and four adapters (gpu_worker.testing): (model, adapters)."""
    from gpu_worker.testing import ALL_LINEAR, ATTENTION_ONLY, build_adapter, build_model, build_tokenizer

    model = build_model(root / "model")
    for f in build_tokenizer(root / "tokenizer").iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    specs = [(8, ALL_LINEAR), (16, ALL_LINEAR), (4, ATTENTION_ONLY), (32, ALL_LINEAR)]
    for i, (r, targets) in enumerate(specs):
        build_adapter(model, root / "adapters" / f"a{i}_r{r}", r=r, alpha=2 * r, targets=targets, seed=i)
    return str(model), str(root / "adapters")


def kernel_benchmarks(device: torch.device, dtype: torch.dtype, batch_sizes: list[int], iters: int) -> list:
    """BGMV shrink + expand (the pure-torch path of gpu_worker.lora.batch via kernels.lora) and decode
    attention over a paged cache (kernels.paged_attention), per batch size."""
    from gpu_worker.kernels import lora as lora_kernels
    from gpu_worker.kernels import paged_attention

    rows, sync = [], _sync_for(device)
    for b in batch_sizes:
        rows.append({"kernel": "bgmv shrink+expand", "batch": b,
                     "us": _median_us(_bgmv_case(lora_kernels, b, device, dtype), iters, sync)})
        case = _attention_case(paged_attention, b, device, dtype)
        if case is not None:
            rows.append({"kernel": "paged decode attention", "batch": b, "us": _median_us(case, iters, sync)})
    return rows


def _bgmv_case(lora_kernels, b: int, device, dtype):
    # x [B, H], A [S, R, H], B [S, O, R], slot [B]: y[i] += B[slot[i]] @ (A[slot[i]] @ x[i])
    h, r, o, slots = 512, 16, 512, 8
    x = torch.randn(b, h, device=device, dtype=dtype)
    a = torch.randn(slots, r, h, device=device, dtype=dtype)
    bw = torch.randn(slots, o, r, device=device, dtype=dtype)
    tok = torch.arange(b, device=device, dtype=torch.int32)
    slot = torch.randint(0, slots, (b,), device=device, dtype=torch.int32)
    y = torch.zeros(b, o, device=device, dtype=dtype)
    if device.type == "cuda" and lora_kernels.HAS_TRITON:
        return lambda: lora_kernels.bgmv_expand_triton(lora_kernels.bgmv_shrink_triton(x, a, tok, slot),
                                                       bw, tok, slot, y)
    idx = slot.long()  # the batched torch path the CPU engine takes: gather each row's A and B, two bmm
    return lambda: y.add_(torch.bmm(bw[idx], torch.bmm(a[idx], x[:, :, None]))[:, :, 0])


def _attention_case(paged_attention, b: int, device, dtype):
    # q [B, H, D]; caches [blocks, 16, Hkv, D]; every row attends over 256 tokens (16 blocks).
    heads, kv_heads, dim, block, ctx = 8, 2, 64, 16, 256
    per_row = ctx // block
    q = torch.randn(b, heads, dim, device=device, dtype=dtype)
    k = torch.randn(b * per_row, block, kv_heads, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    tables = torch.arange(b * per_row, device=device, dtype=torch.int32).view(b, per_row)
    lens = torch.full((b,), ctx, device=device, dtype=torch.int32)
    return lambda: paged_attention.paged_decode_attention(q, k, v, tables, lens, dim ** -0.5, ctx)


def engine_benchmarks(model: str, adapters: dict[str, str], device: str, dtype: str, batch_sizes: list[int],
                      iters: int, trace: str | None) -> list:
    """Decode step time by batch size, with no adapters, one adapter for all rows, and a mix of all."""
    from gpu_worker import Engine, EngineConfig, Request, SamplingParams

    engine = Engine(EngineConfig(model=model, device=device, dtype=dtype))
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    names = sorted(adapters)
    mixes = {"none": lambda i: (), "one": lambda i: tuple(names[:1]),
             "mixed": lambda i: (names[i % len(names)],) if names else ()}
    rows = []
    ctx = _tracer(trace)
    with ctx:
        for mix, stack in mixes.items():
            for b in batch_sizes:
                params = SamplingParams(max_tokens=iters + 2, temperature=0.0, ignore_eos=True)
                for i in range(b):
                    prompt = [1 + i % 100, 2, 3, 4]
                    engine.add_request(Request(prompt=prompt, adapters=stack(i), params=params))
                engine.step()  # prefill
                times = []
                while engine.has_unfinished():
                    start = time.perf_counter()
                    engine.step()
                    times.append((time.perf_counter() - start) * 1e6)
                rows.append({"mix": mix, "batch": b, "step_us": statistics.median(times),
                             "tok_per_s": b / statistics.median(times) * 1e6})
    return rows


class _NoTrace:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _tracer(path: str | None):
    if path is None:
        return _NoTrace()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, record_shapes=False)

    class _Trace:
        def __enter__(self):
            prof.__enter__()

        def __exit__(self, *exc):
            prof.__exit__(*exc)
            prof.export_chrome_trace(path)

    return _Trace()


def ipc_load_run(model: str, adapters_dir: str, adapters: list[str], n: int, max_tokens: int,
                 device: str, dtype: str) -> dict:
    """Starts a worker subprocess on a private ipc:// endpoint and sends n requests in one batch."""
    with tempfile.TemporaryDirectory(prefix="npc-profile-") as folder:
        os.chmod(folder, 0o700)
        endpoint = f"ipc://{folder}/w.sock"
        cmd = [sys.executable, "-m", "gpu_worker.worker", "serve", "--model", model, "--endpoint", endpoint,
               "--adapters-dir", adapters_dir, "--device", device, "--dtype", dtype, "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            return asyncio.run(_load(endpoint, adapters, n, max_tokens))
        finally:
            proc.terminate()
            proc.wait(30)


async def _load(endpoint: str, adapters: list[str], n: int, max_tokens: int) -> dict:
    from gpu_worker import Request, SamplingParams
    from gpu_worker.client import WorkerClient

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async with WorkerClient(endpoint) as client:
        requests = [Request(prompt=[5 + i % 50, 6, 7, 8], adapters=(adapters[i % len(adapters)],) if adapters
                            else (), params=params, request_id=f"load-{i}") for i in range(n)]
        start = time.perf_counter()
        streams = await client.submit(requests)
        first, latencies = [], []

        async def consume(stream):
            async for _ in stream:
                if len(first) < n and stream.request_id not in seen:
                    seen.add(stream.request_id)
                    first.append(time.perf_counter() - start)
            latencies.append(time.perf_counter() - start)

        seen: set[str] = set()
        await asyncio.gather(*(consume(s) for s in streams))
        total = time.perf_counter() - start
    return {"requests": n, "max_tokens": max_tokens, "wall_s": total, "tok_per_s": n * max_tokens / total,
            "ttft_p50_ms": 1e3 * statistics.median(first),
            "latency_p50_ms": 1e3 * statistics.median(latencies),
            "latency_max_ms": 1e3 * max(latencies)}


def _print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, key in (("kernels", "kernels"), ("engine decode step", "engine")):
        rows = report.get(key) or []
        if not rows:
            continue
        table = Table(title=title)
        for column in rows[0]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))
        console.print(table)
    if report.get("ipc"):
        table = Table(title="end to end through IPC")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in report["ipc"].items():
            table.add_row(k, f"{v:.2f}" if isinstance(v, float) else str(v))
        console.print(table)


def profile_main(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from gpu_worker.worker import adapter_folders

    batch_sizes = args.batch_sizes
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    report: dict = {"device": str(device), "dtype": args.dtype}
    with tempfile.TemporaryDirectory(prefix="npc-profile-model-") as scratch, \
            Progress(disable=args.json, transient=True) as progress:
        model, adapters_dir = args.model, args.adapters_dir
        if model is None:
            task = progress.add_task("building a random tiny model", total=None)
            model, built = build_fixtures(Path(scratch))
            adapters_dir = adapters_dir or built
            progress.remove_task(task)
        adapters = {n: str(p) for n, p in adapter_folders(adapters_dir).items()} if adapters_dir else {}
        task = progress.add_task("profiling", total=3)
        report["kernels"] = kernel_benchmarks(device, dtype, batch_sizes, args.iters)
        progress.advance(task)
        report["engine"] = engine_benchmarks(model, adapters, args.device, args.dtype, batch_sizes,
                                             args.iters, args.trace)
        progress.advance(task)
        if not args.skip_ipc and adapters_dir:
            report["ipc"] = ipc_load_run(model, adapters_dir, sorted(adapters), args.requests,
                                         args.max_tokens, args.device, args.dtype)
        progress.advance(task)
    if args.trace:
        report["trace"] = args.trace
    if args.json:
        print(json.dumps(report))
    else:
        _print_tables(report)
    return 0
