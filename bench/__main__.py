"""Runs every benchmark in bench/ and prints one table per benchmark plus a summary.

    python -m bench                 # all benchmarks
    python -m bench --quick         # smoke sizes (passed through to each benchmark)
    python -m bench engine          # only the named ones

A benchmark is a module of this package with a top-level `main(argv)` function (common and __main__ aside).
Each runs in its own process as `python -m bench.<name> --json`, so one cannot skew another's timings
(threads, allocator state, caches); its result is the JSON object on the last line of its stdout.
Exits 1 if any benchmark crashed or printed no JSON result; a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import meets, result_table

PACKAGE_DIR = Path(__file__).resolve().parent
NOT_BENCHMARKS = ("common", "__main__", "__init__")
console = Console()


@dataclass
class Outcome:
    name: str
    seconds: float
    result: dict | None  # None when the benchmark crashed
    error: str = ""


def discover() -> list[str]:
    """Module names in bench/ that define a top-level `main` function (read with ast, nothing imported)."""
    names = []
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        if path.stem in NOT_BENCHMARKS:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            names.append(path.stem)
    return names


def run_one(name: str, quick: bool, threads: int | None, timeout: float | None) -> Outcome:
    command = [sys.executable, "-m", f"bench.{name}", "--json"] + (["--quick"] if quick else [])
    command += ["--threads", str(threads)] if threads is not None else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=PACKAGE_DIR.parent)
    except subprocess.TimeoutExpired:
        return Outcome(name, time.perf_counter() - start, None, f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return Outcome(name, seconds, None, f"exit code {proc.returncode}\n{_tail(proc.stderr)}")
    try:
        return Outcome(name, seconds, json.loads(proc.stdout.strip().splitlines()[-1]))
    except (IndexError, json.JSONDecodeError):
        return Outcome(name, seconds, None, "no JSON on the last line of stdout\n" + _tail(proc.stdout))


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def summary_table(outcomes: list[Outcome]) -> Table:
    table = Table(title="bench summary")
    for column in ("benchmark", "status", "wall s", "targets met", "missed"):
        table.add_column(column)
    for o in outcomes:
        if o.result is None:
            table.add_row(o.name, "[red]CRASHED[/]", f"{o.seconds:.0f}", "", "")
            continue
        checks = {k: meets(o.result.get(k), t) for k, t in o.result.get("targets", {}).items()}
        missed = [f"{k} = {o.result.get(k)} (target {o.result['targets'][k]})" for k, ok in checks.items()
                  if not ok]
        met = f"{len(checks) - len(missed)}/{len(checks)}"
        table.add_row(o.name, "[green]ok[/]", f"{o.seconds:.0f}", met, "\n".join(missed))
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the benchmarks in bench/ and summarize them.")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all discovered)")
    parser.add_argument("--quick", action="store_true", help="smoke sizes, passed to each benchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, passed to each benchmark")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark")
    parser.add_argument("--out", type=Path, default=None, help="write {name: result} as JSON to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    available = discover()
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        console.print(f"[red]unknown benchmark(s) {unknown}; available: {available}[/]")
        return 2
    names = args.names or available
    outcomes = []
    for i, name in enumerate(names, 1):
        with console.status(f"[{i}/{len(names)}] bench.{name} running{' (quick)' if args.quick else ''}..."):
            outcome = run_one(name, args.quick, args.threads, args.timeout)
        outcomes.append(outcome)
        _report(i, len(names), outcome)
    console.print(summary_table(outcomes))
    if args.out is not None:
        args.out.write_text(json.dumps({o.name: o.result for o in outcomes}, indent=1) + "\n")
    return 1 if any(o.result is None for o in outcomes) else 0


def _report(i: int, total: int, outcome: Outcome) -> None:
    if outcome.result is None:
        console.print(f"[{i}/{total}] bench.{outcome.name} [red]crashed[/] after {outcome.seconds:.0f} s:")
        console.print(outcome.error, markup=False, highlight=False)
        return
    console.print(f"[{i}/{total}] bench.{outcome.name} done in {outcome.seconds:.0f} s")
    console.print(result_table(f"bench.{outcome.name}", outcome.result))


if __name__ == "__main__":
    sys.exit(main())
