"""Shared helpers of the benchmarks: arguments, timing, percentiles, output, the standard bench model.

Every benchmark prints one JSON object on the last line of stdout with `--json` (the runner in
`bench/__main__.py` parses it) and a rich table otherwise. A result may carry `targets`: a dict
`{key: ">= 1.0"}` that the tables check the measured value against.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# The standard bench model: a small Qwen2 (~27M parameters, fp32 ~107 MB) whose decode step at batch 64 is
# dominated by its matrix products, as a 7B step is on a GPU.
BENCH_MODEL = dict(family="qwen2", hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=8192,
                   max_position=4096, init_std=0.02)


def parse_args(description: str, argv: list[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on the last line of stdout")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, usually the core count)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return args


def timeit(fn: Callable[[], object], warmup: int = 1, repeat: int = 5) -> list[float]:
    """Seconds of each of `repeat` calls of fn, after `warmup` calls that are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    """p50 / p95 / p99 / max of a list of seconds, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99), "max": max(ms)}


def meets(value: object, target: str) -> bool | None:
    """Whether value satisfies a target such as ">= 1.0" or "<= 1.3"; None when it cannot be checked."""
    op, _, threshold = target.partition(" ")
    if not isinstance(value, (int, float)) or op not in (">=", "<="):
        return None
    return value >= float(threshold) if op == ">=" else value <= float(threshold)


def result_table(title: str, result: dict):
    """A rich table of a result: one row per key, with its target and whether it is met."""
    from rich.table import Table

    targets = result.get("targets", {})
    table = Table(title=title)
    for column in ("metric", "value", "target", "met"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for key, value in result.items():
        if key == "targets":
            continue
        ok = meets(value, targets[key]) if key in targets else None
        mark = "" if ok is None else "[green]yes[/]" if ok else "[red]NO[/]"
        table.add_row(key, _fmt(value), targets.get(key, ""), mark)
    return table


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def rounded(value: object, digits: int = 4) -> object:
    """Floats (also inside dicts and lists) rounded for a compact JSON line."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def emit(result: dict, args: argparse.Namespace, title: str = "benchmark") -> None:
    """Prints the result: one JSON line (last line of stdout) with --json, a rich table otherwise."""
    result = rounded(result)
    line = json.dumps(result)
    if args.out is not None:
        args.out.write_text(line + "\n")
    if args.json:
        print(line, flush=True)
        return
    from rich.console import Console

    Console().print(result_table(title, result))


def log(message: str) -> None:
    """Progress to stderr, so stdout keeps the JSON line last."""
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}[/]")


def build_bench_model(out_dir: str | Path, **overrides) -> Path:
    """Saves the standard bench model (BENCH_MODEL, fields overridable) as a HF checkpoint in out_dir."""
    from gpu_worker.testing import build_model

    return build_model(out_dir, **{**BENCH_MODEL, **overrides})


@contextlib.contextmanager
def bench_model_dir(**overrides) -> Iterator[Path]:
    """The standard bench model in a temporary folder, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        yield build_bench_model(tmp, **overrides)
