"""Native CPU kernels (gpu_worker/kernels/cpu_ops.py) against their fp32 references and torch paths.

The first test that needs the native library builds it (about 15 s, once per source version and machine);
those tests skip when it cannot be built, and the torch paths are tested either way. Cache slots that no row
owns, the tail of each row's last block and the blocks named by unused table entries hold NaN for the
native kernel: any read past a row's context shows up as NaN.
"""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_worker.kernels import cpu_ops
from gpu_worker.kernels import paged_attention as pa
from gpu_worker.model.layers import RMSNorm
from gpu_worker.model.rope import RopeSpec, RotaryEmbedding

# dtype -> (atol, rtol) against the fp32 reference on the same (rounded) inputs: the output is rounded once
# to its dtype (bf16 keeps 8 mantissa bits, fp16 11); fp32 differs only in summation order and exp2.
TOLERANCE = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = list(TOLERANCE)
HEADS = [(4, 4), (8, 2)]  # (num_heads, num_kv_heads): GQA ratio 1 and 4
MAX_BLOCKS = 6  # block table width
STALE = 30.0  # finite poison for the torch path, which reads whole blocks and masks the scores


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.fixture
def native():
    """The native ops at their best ISA; skips when the library cannot be built here."""
    if not cpu_ops.cpu_ops_available():
        pytest.skip("native CPU ops could not be built: see the warning of gpu_worker.kernels.cpu_ops")
    cpu_ops.cpu_ops_isa("auto")
    yield
    cpu_ops.cpu_ops_isa("auto")


ISAS = ["base", "avx2", "avx512"]  # each kernel is compiled for all three and picked from cpuid


def use_isa(isa):
    """Runs the native kernels with `isa` until the `native` fixture resets it; skips if the CPU lacks it."""
    if ISAS.index(isa) > ISAS.index(cpu_ops.cpu_ops_isa("auto")):
        pytest.skip(f"this CPU has no {isa}")
    assert cpu_ops.cpu_ops_isa(isa) == isa


# ------------------------------------------------------------------ paged decode attention


def make_case(batch, heads, head_dim, block_size, dtype, seed=0, poison=float("nan"), lens=None):
    """Random rows over a shuffled cache. Returns q, k_cache, v_cache, block_tables, context_lens, scale.

    Every cache slot no row owns holds `poison`; unused table entries name a spare, poisoned block.
    """
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    context_lens = torch.tensor(lens, dtype=torch.int32) if lens else _context_lens(batch, block_size, gen)
    blocks_per_row = (context_lens + block_size - 1) // block_size
    num_blocks = int(blocks_per_row.sum()) + 2  # spare blocks no row owns
    order = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((batch, MAX_BLOCKS), int(order[-1]), dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, poison), torch.full(shape, poison)
    taken = 0
    for i, (n, used) in enumerate(zip(context_lens.tolist(), blocks_per_row.tolist())):
        block_tables[i, :used] = order[taken : taken + used]
        taken += used
        positions = torch.arange(n)
        blocks, slots = block_tables[i, positions // block_size].long(), positions % block_size
        k_cache[blocks, slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        v_cache[blocks, slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_tables, context_lens, head_dim**-0.5


def _context_lens(batch, block_size, gen):
    # [batch] int32 in [1, MAX_BLOCKS * block_size]; the first rows take the edges: one token, exactly one
    # block, exactly three blocks, one past a block, the whole table.
    lens = torch.randint(1, MAX_BLOCKS * block_size + 1, (batch,), generator=gen, dtype=torch.int32)
    edges = torch.tensor([1, block_size, 3 * block_size, block_size + 1, MAX_BLOCKS * block_size])
    lens[: min(batch, len(edges))] = edges[:batch].to(torch.int32)
    return lens


def assert_matches_reference(case, out=None):
    q = case[0]
    out = cpu_ops.cpu_paged_decode_attention(*case) if out is None else out
    assert out.shape == q.shape and out.dtype == q.dtype
    atol, rtol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), pa.paged_decode_attention_ref(*case), atol=atol, rtol=rtol)


def _grid():
    for dtype in DTYPES:
        for heads in HEADS:
            for head_dim in (32, 64, 128):
                for block_size in (8, 16, 32):
                    name = f"{dtype_name(dtype)}-h{heads[0]}kv{heads[1]}-d{head_dim}-bs{block_size}"
                    yield pytest.param(dtype, heads, head_dim, block_size, id=name)


@pytest.mark.parametrize("dtype, heads, head_dim, block_size", list(_grid()))
@pytest.mark.parametrize("batch", [1, 7])
def test_native_attention_matches_reference(native, batch, dtype, heads, head_dim, block_size):
    case = make_case(batch, heads, head_dim, block_size, dtype, seed=batch + head_dim + block_size)
    assert_matches_reference(case)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_native_attention_wide_batch(native, dtype, heads):
    # 65 rows: more tasks than threads, chunks of uneven length.
    assert_matches_reference(make_case(65, heads, 64, 16, dtype, seed=65))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("head_dim", [64, 72])  # 72: not a multiple of 16, the 8-lane path under AVX-512
def test_native_attention_each_isa(native, isa, dtype, head_dim):
    use_isa(isa)
    assert_matches_reference(make_case(9, (8, 2), head_dim, 16, dtype, seed=5))


@pytest.mark.parametrize(
    "heads, head_dim, block_size",
    [
        ((14, 2), 64, 16),  # GQA 7 (Qwen2-0.5B)
        ((16, 2), 128, 16),  # GQA 8
        ((6, 3), 256, 16),  # GQA 2, largest head_dim
        ((4, 1), 8, 16),  # smallest head_dim
        ((4, 2), 40, 1),  # one slot per block
        ((4, 2), 64, 7),  # a block size that is no power of 2
        ((2, 2), 64, 128),  # blocks wider than any vector
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_native_attention_odd_shapes(native, heads, head_dim, block_size, dtype):
    assert_matches_reference(make_case(11, heads, head_dim, block_size, dtype, seed=head_dim))


def test_native_attention_reads_only_the_context(native):
    # NaN everywhere a row does not own, including the slots after each row's last token: a single read of
    # them would turn that row's output into NaN.
    case = make_case(33, (8, 2), 64, 16, torch.float32, seed=1)
    out = cpu_ops.cpu_paged_decode_attention(*case)
    assert not out.isnan().any()
    assert_matches_reference(case, out)


def test_native_attention_strided_query(native):
    # q sliced out of a fused qkv projection: [B, H + 2 * Hkv, D] -> [B, H, D] with a larger row stride.
    q, *rest = make_case(5, (8, 2), 64, 16, torch.float32)
    qkv = torch.cat([q, torch.full((5, 4, 64), float("nan"))], dim=1)
    assert_matches_reference((qkv[:, :8], *rest))
    # And a last-dim stride other than 1 (copied to a dense q first).
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert transposed.stride(-1) != 1
    assert_matches_reference((transposed, *rest))


def test_native_attention_outputs_are_fresh_and_work_in_inference_mode(native):
    first = make_case(9, (8, 2), 64, 16, torch.float32, seed=2)
    second = make_case(3, (4, 4), 32, 8, torch.float32)
    with torch.inference_mode():
        out = cpu_ops.cpu_paged_decode_attention(*first)
        cpu_ops.cpu_paged_decode_attention(*second)
    assert_matches_reference(first, out)


@pytest.mark.parametrize(
    "lens, tables_value, message",
    [
        ([0, 5], None, "context_lens"),
        ([5, MAX_BLOCKS * 16 + 1], None, "context_lens"),
        ([5, 20], -1, "block_tables"),
        ([5, 20], 10_000, "block_tables"),
    ],
)
def test_native_attention_rejects_bad_tables(native, lens, tables_value, message):
    q, k_cache, v_cache, tables, _, scale = make_case(2, (4, 2), 32, 16, torch.float32, lens=[5, 20])
    context_lens = torch.tensor(lens, dtype=torch.int32)
    if tables_value is not None:
        tables[1, 1] = tables_value
    with pytest.raises(RuntimeError, match=message):
        cpu_ops.cpu_paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale)


def test_bad_shapes_raise_value_error_on_both_paths(monkeypatch):
    cache = torch.zeros(4, 16, 3, 64)
    tables, lens = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError):
        cpu_ops.cpu_paged_decode_attention(torch.zeros(2, 4, 64), cache, cache, tables, lens, 1.0)
    monkeypatch.setenv(cpu_ops.DISABLE_ENV, "1")
    with pytest.raises(ValueError):
        cpu_ops.cpu_paged_decode_attention(torch.zeros(2, 4, 64), cache, cache, tables, lens, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_disabled_native_ops_use_the_torch_path(monkeypatch, dtype):
    case = make_case(17, (8, 2), 64, 16, dtype, seed=4, poison=STALE)
    native_out = cpu_ops.cpu_paged_decode_attention(*case)
    monkeypatch.setenv(cpu_ops.DISABLE_ENV, "1")
    assert not cpu_ops.cpu_ops_available()
    fallback_out = cpu_ops.cpu_paged_decode_attention(*case)
    torch.testing.assert_close(fallback_out, pa.paged_decode_attention_torch(*case), atol=0, rtol=0)
    assert_matches_reference(case, fallback_out)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(native_out.float(), fallback_out.float(), atol=2 * atol, rtol=2 * rtol)


def test_unsupported_inputs_take_the_torch_path(native):
    # head_dim 12 is not a multiple of 8, float64 is not a native dtype: both still answer, via torch.
    for head_dim, dtype in [(12, torch.float32), (32, torch.float64)]:
        case = make_case(3, (4, 2), head_dim, 16, dtype, poison=STALE)
        out = cpu_ops.cpu_paged_decode_attention(*case)
        torch.testing.assert_close(out, pa.paged_decode_attention_torch(*case), atol=0, rtol=0)


# ------------------------------------------------------------------ build, cache and fallback


def test_failed_build_logs_and_falls_back(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text('#error "this source does not build"\n')
    monkeypatch.setattr(cpu_ops, "SOURCE_PATH", broken)
    monkeypatch.setattr(cpu_ops, "_library", cpu_ops._NativeLibrary())
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    case = make_case(3, (4, 2), 32, 16, torch.float32, poison=STALE)
    with caplog.at_level(logging.WARNING, logger=cpu_ops.__name__):
        out = cpu_ops.cpu_paged_decode_attention(*case)
        assert not cpu_ops.cpu_ops_available()
    assert "using the torch paths" in caplog.text and "does not build" in caplog.text
    warnings = [r for r in caplog.records if r.name == cpu_ops.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once, not per call
    torch.testing.assert_close(out, pa.paged_decode_attention_torch(*case), atol=0, rtol=0)


def test_second_process_loads_the_cached_library(native):
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from gpu_worker.kernels import cpu_ops\n"
        "assert cpu_ops.cpu_ops_available()\n"
    )
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "native CPU ops: loaded" in result.stderr and "compiling" not in result.stderr


# ------------------------------------------------------------------ rotary embedding


def rotary_reference(positions, x, cos, sin):
    """fp32 loop over tokens of the neox rotation; returns fp32 [T, heads, D]."""
    half = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=torch.float32)
    for t, pos in enumerate(positions.tolist()):
        xf, c, s = x[t].float(), cos[pos].float(), sin[pos].float()
        out[t, :, :half] = xf[:, :half] * c[:half] - xf[:, half:] * s[:half]
        out[t, :, half:] = xf[:, half:] * c[half:] + xf[:, :half] * s[half:]
    return out


def make_rotary_case(tokens, heads, head_dim, dtype, seed=0):
    """Views of a fused qkv output [T, (H + 2 Hkv) D] as the model makes them: q [T, H, D], k [T, Hkv, D]
    and v; positions [T] in [0, 512), the last one among them; the model's RotaryEmbedding."""
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    rotary = RotaryEmbedding(RopeSpec(theta=10000.0), head_dim, max_position=512, dtype=dtype)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    positions[0] = 511
    return positions, q, k, v, rotary


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("heads, head_dim", [((8, 2), 64), ((4, 4), 128), ((14, 2), 32)])
@pytest.mark.parametrize("path", ["native", "torch"])
def test_rotary_matches_reference(request, path, dtype, heads, head_dim):
    if path == "native":
        request.getfixturevalue("native")
    positions, q, k, v, rotary = make_rotary_case(37, heads, head_dim, dtype, seed=head_dim)
    expected_q, expected_k = (rotary_reference(positions, x, rotary.cos, rotary.sin) for x in (q, k))
    v_before = v.clone()
    rotate = cpu_ops.rotary_embedding_ if path == "native" else cpu_ops.rotary_embedding_torch_
    rotate(positions, q, k, rotary.cos, rotary.sin)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(q.float(), expected_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(k.float(), expected_k, atol=atol, rtol=rtol)
    assert torch.equal(v, v_before)  # the rest of the fused output is untouched


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_rotary_each_isa_agrees_with_the_model_path(native, isa, dtype):
    use_isa(isa)
    positions, q, k, _, rotary = make_rotary_case(19, (8, 2), 64, dtype, seed=7)
    expected_q, expected_k = q.clone(), k.clone()
    cos_sin = rotary.tables(positions)
    for x in (expected_q, expected_k):
        rotary.apply_(cos_sin, x)  # the model's torch path, which rounds after each op
    cpu_ops.rotary_embedding_(positions, q, k, rotary.cos, rotary.sin)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else tuple(2 * t for t in TOLERANCE[dtype])
    torch.testing.assert_close(q, expected_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(k, expected_k, atol=atol, rtol=rtol)


@pytest.mark.parametrize("path", ["native", "torch"])
def test_rotary_of_the_fused_q_and_k_heads(request, path):
    # The model rotates q and k as one view [T, H + Hkv, D] of the fused qkv output, with k None.
    if path == "native":
        request.getfixturevalue("native")
    positions, q, k, v, rotary = make_rotary_case(23, (8, 2), 64, torch.float32, seed=9)
    expected_q, expected_k = (rotary_reference(positions, x, rotary.cos, rotary.sin) for x in (q, k))
    v_before = v.clone()
    qk = torch.as_strided(q, (23, 10, 64), q.stride())  # q's heads, then k's: adjacent in the fused output
    rotate = cpu_ops.rotary_embedding_ if path == "native" else cpu_ops.rotary_embedding_torch_
    rotate(positions, qk, None, rotary.cos, rotary.sin)
    torch.testing.assert_close(q, expected_q, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(k, expected_k, atol=2e-5, rtol=2e-5)
    assert torch.equal(v, v_before)


def test_rotary_rejects_positions_outside_the_table(native):
    positions, q, k, _, rotary = make_rotary_case(4, (4, 2), 32, torch.float32)
    positions[2] = 512
    with pytest.raises(RuntimeError, match="positions"):
        cpu_ops.rotary_embedding_(positions, q, k, rotary.cos, rotary.sin)


# ------------------------------------------------------------------ residual add + RMSNorm


def make_norm_case(tokens, hidden, dtype, seed=0, row_stride=None):
    gen = torch.Generator().manual_seed(seed)
    width = row_stride or hidden
    x = (torch.randn(tokens, width, generator=gen) * 3).to(dtype)[:, :hidden]  # row stride: width
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype)
    norm = RMSNorm(hidden, eps=1e-6, dtype=dtype)
    norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    return x, residual, norm


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("tokens, hidden, row_stride", [(1, 512, None), (64, 512, 640), (33, 896, None)])
@pytest.mark.parametrize("path", ["native", "torch"])
def test_add_rms_norm_matches_unfused_layers(request, path, dtype, tokens, hidden, row_stride):
    if path == "native":
        request.getfixturevalue("native")
    x, residual, norm = make_norm_case(tokens, hidden, dtype, seed=tokens, row_stride=row_stride)
    expected_residual = residual + x
    expected_x = norm(expected_residual)  # RMSNorm.forward: the model's unfused path
    fused = cpu_ops.add_rms_norm_ if path == "native" else cpu_ops.add_rms_norm_torch_
    fused(x, residual, norm.weight, norm.eps)
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)
    # Same roundings as RMSNorm.forward; only the fp32 mean of squares may differ in its last bit.
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(x, expected_x, atol=atol, rtol=rtol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_add_rms_norm_each_isa_matches_the_torch_path(native, isa, dtype):
    use_isa(isa)
    x, residual, norm = make_norm_case(16, 512, dtype, seed=3)
    x_torch, residual_torch = x.clone(), residual.clone()
    cpu_ops.add_rms_norm_(x, residual, norm.weight, norm.eps)
    cpu_ops.add_rms_norm_torch_(x_torch, residual_torch, norm.weight, norm.eps)
    torch.testing.assert_close(residual, residual_torch, atol=0, rtol=0)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(x, x_torch, atol=atol, rtol=rtol)
