"""`npc-worker profile` (issue 5): the CLI run as a user runs it, on the random tiny model it builds, with an
end-to-end IPC load run through a real worker subprocess and a torch-profiler trace."""

from __future__ import annotations

import json
import subprocess
import sys


def test_profile_json_covers_kernels_engine_and_ipc(tmp_path):
    trace = tmp_path / "trace.json"
    cmd = [sys.executable, "-m", "gpu_worker.worker", "profile", "--json", "--iters", "2",
           "--batch-sizes", "1,3", "--requests", "4", "--max-tokens", "3", "--trace", str(trace)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    kernels = {(row["kernel"], row["batch"]) for row in report["kernels"]}
    assert kernels == {(k, b) for k in ("bgmv shrink+expand", "paged decode attention") for b in (1, 3)}
    assert all(row["us"] > 0 for row in report["kernels"])
    assert {(row["mix"], row["batch"]) for row in report["engine"]} == {
        (mix, b) for mix in ("none", "one", "mixed") for b in (1, 3)}
    assert all(row["step_us"] > 0 and row["tok_per_s"] > 0 for row in report["engine"])
    ipc = report["ipc"]
    assert ipc["requests"] == 4 and ipc["max_tokens"] == 3 and ipc["tok_per_s"] > 0
    assert 0 < ipc["ttft_p50_ms"] <= ipc["latency_max_ms"]
    # A chrome trace (Perfetto / chrome://tracing) of the engine section: our forward shows in it.
    events = json.loads(trace.read_text())["traceEvents"]
    assert report["trace"] == str(trace) and any(e.get("name") == "aten::mm" for e in events)


def test_profile_tables_for_a_person(tmp_path):
    cmd = [sys.executable, "-m", "gpu_worker.worker", "profile", "--iters", "1", "--batch-sizes", "2",
           "--skip-ipc"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels" in done.stdout and "engine decode step" in done.stdout and "step_us" in done.stdout


def test_profile_rejects_a_bad_batch_size_list():
    cmd = [sys.executable, "-m", "gpu_worker.worker", "profile", "--batch-sizes", "1,x", "--skip-ipc"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--batch-sizes" in done.stderr and "Traceback" not in done.stderr
