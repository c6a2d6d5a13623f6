"""bench/gpu.py, the one-shot GPU check, exercised on the CPU: `--tiny` runs every section's code with tiny
shapes (the CUDA-only pytest section is reported as skipped); without CUDA the real run exits 2 at once."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench import gpu

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _positive_numbers(value, path: str = "") -> list[str]:
    """Paths of the numbers in a nested result that are not finite and > 0."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _positive_numbers(v, f"{path}.{k}")]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    return [] if math.isfinite(value) and value > 0 else [f"{path} = {value}"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "result.json"
    proc = _bench("--tiny", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


def test_tiny_run_reports_every_section(tiny_run):
    result, out = tiny_run
    assert json.loads(out.read_text()) == result
    assert result["errors"] == {}
    assert result["tiny"] is True and result["device"]["type"] == "cpu"
    assert {"torch", "triton", "bitsandbytes", "cuda"} <= set(result["versions"])
    assert result["model"]["shape"]["layers"] == 2 and result["model"]["shards"] > 1
    assert "CUDA" in result["skipped"]["pytest"] and "pytest" not in result
    assert result["bandwidth"]["gbps"] > 0
    batches = result["plan"]["batches"]
    tables = ["decode"] + (["nf4"] if "nf4" in result else [])
    if "nf4" not in result:  # only where bitsandbytes does not import
        assert "bitsandbytes" in result["skipped"]["nf4"]
    for name in tables:
        table = result[name]
        assert set(table) >= {"weight_bytes", "floor_ms"} | {f"b{b}" for b in batches}
        for b in batches:
            assert set(table[f"b{b}"]) >= {"step_ms", "p90_ms", "context", "over_floor", "floor_with_kv_ms"}
        assert _positive_numbers(table) == []
    if "nf4" in result:  # 4-bit weights + scales: about a quarter of the bf16 bytes
        assert result["nf4"]["weight_bytes"] < 0.5 * result["decode"]["weight_bytes"]
    lora = result["lora"]
    assert lora["auto_kernel"] == "torch"  # "auto" on a CPU; Triton on CUDA
    assert lora["adapters"] == result["plan"]["adapters"] and lora["rank_width"] == result["plan"]["rank"]
    assert set(lora) >= {"base_step_ms", "auto_step_ms", "torch_step_ms", "auto_over_base", "torch_over_auto",
                         "floor_ms", "auto_over_floor", "load_s", "layer"}
    assert set(lora["layer"]) >= {"adapter_bytes", "auto_us", "torch_us", "auto_gbps", "auto_of_bandwidth"}
    assert _positive_numbers({k: v for k, v in lora.items() if k != "auto_kernel"}) == []
    assert result["total_s"] > 0


def test_tiny_adapter_bytes_match_the_shapes(tiny_run):
    result, _ = tiny_run
    shape, plan = gpu.TINY_SHAPE, result["plan"]
    per_layer = 2 * plan["rank"] * sum(i + o for i, o in shape.module_shapes().values())
    assert result["lora"]["layer"]["adapter_bytes"] == plan["adapters"] * per_layer  # bf16, rank width = rank


def test_without_cuda_and_without_tiny_exits_2():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = _bench("--json", timeout=60)
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stderr and "--tiny" in proc.stderr
    assert proc.stdout.strip() == ""


def test_unknown_section_exits_2():
    proc = _bench("--tiny", "--sections", "decode,warp", timeout=60)
    assert proc.returncode == 2 and "warp" in proc.stderr


def test_checkpoint_has_the_hugging_face_qwen2_names(tmp_path):
    from transformers import AutoModelForCausalLM

    path, nbytes = gpu.build_checkpoint(tmp_path / "m", gpu.TINY_SHAPE, "cpu", shard_bytes=64 << 10)
    assert nbytes == 2 * sum(math.prod(d) for _, d in gpu.checkpoint_tensors(gpu.TINY_SHAPE))
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.tie_word_embeddings is False
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    index = json.loads((path / "model.safetensors.index.json").read_text())
    with safe_open(str(path / index["weight_map"]["model.embed_tokens.weight"]), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_gpu_tests_run_in_a_subprocess_without_triton_interpret(monkeypatch):
    # Stripped from the child's environment (conftest sets it again inside that pytest; the gpu tests start
    # their own children without it, so the Triton kernels compile for real).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    files = gpu.gpu_test_files()
    assert {"test_lora_kernels.py", "test_lora_triton_engine.py", "test_paged_attention.py"} <= {
        p.name for p in files}
    assert "test_fixtures.py" not in {p.name for p in files}  # its `@pytest.mark.gpu` is inside a string
    result = gpu.run_gpu_tests(files, timeout=120)
    expected = {"passed": 3} if torch.cuda.is_available() else {"passed": 0, "skipped": 3}
    assert {k: result[k] for k in expected} == expected, result
    assert result["failed"] == 0 and result["errors"] == 0 and result["returncode"] == 0


def test_pytest_counts():
    assert gpu.pytest_counts("...\n2 passed, 1 failed, 1 error, 354 deselected in 9.12s\n") == {
        "passed": 2, "failed": 1, "skipped": 0, "errors": 1, "deselected": 354}
    assert gpu.pytest_counts("== 3 skipped, 354 deselected, 2 warnings in 0.95s ==")["skipped"] == 3
    assert gpu.pytest_counts("no summary here") == {}


def test_make_bench_does_not_run_it():
    from bench.__main__ import discover

    assert "gpu" not in discover()  # it needs CUDA; `python -m bench` runs the CPU benchmarks


def test_a_failing_section_is_reported_and_the_others_still_run(monkeypatch, capsys):
    def boom(run):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu, "pytest_section", boom)  # would be skipped on a CPU; here it fails instead
    assert gpu.check(["--tiny", "--json", "--sections", "pytest,bandwidth"]) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "RuntimeError: planted failure" in result["errors"]["pytest"]
    assert result["bandwidth"]["gbps"] > 0


def test_no_section_starts_past_the_budget(capsys):
    assert gpu.check(["--tiny", "--json", "--budget-s", "-1", "--sections", "bandwidth,decode"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["skipped"]) == {"bandwidth", "decode"}
    assert all("time budget" in reason for reason in result["skipped"].values())
