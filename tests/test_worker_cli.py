"""`npc-worker serve` start-up options that fail fast: a clear message and exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("extra, message", [
    (["--lora-kernel", "triton"], "need a CUDA device"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_serve_refuses_options_it_cannot_honour(qwen2_dir, tmp_path, extra, message):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a CPU without the interpreter
    cmd = [sys.executable, "-m", "gpu_worker.worker", "serve", "--model", str(qwen2_dir), "--endpoint",
           f"ipc://{tmp_path}/w.sock", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "npc-worker: cannot start" in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr
