"""Paged decode attention: torch and Triton paths against the fp32 loop reference.

The Triton path runs under the interpreter on CPU tensors here; `test_compiled_triton_on_cuda` runs the
compiled kernel in a fresh process.
"""

import os

# Before anything can decorate a Triton kernel: triton.jit picks interpreter vs compiled mode at decoration.
os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_worker.kernels import paged_attention as pa

# dtype -> (atol, rtol) against the fp32 reference on the same (rounded) inputs. Half types: output rounding
# (bf16 keeps 8 mantissa bits) plus the probabilities rounded before P @ V inside SDPA.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
HEADS = [(4, 4), (8, 2)]  # (num_heads, num_kv_heads): GQA ratio 1 and 4
MAX_BLOCKS = 6  # block table width
STALE = 30.0  # fills every cache slot no row owns: if masking leaks, these dominate the softmax

needs_triton = pytest.mark.skipif(not pa.HAS_TRITON, reason="triton is not installed")


def make_case(batch, heads, head_dim, block_size, dtype, seed=0, device="cpu"):
    """Random rows over a shuffled cache. Returns q, k_cache, v_cache, block_tables, context_lens, scale."""
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    context_lens = _context_lens(batch, block_size, gen)
    blocks_per_row = (context_lens + block_size - 1) // block_size
    num_blocks = int(blocks_per_row.sum()) + 3  # 3 spare blocks no row owns
    order = torch.randperm(num_blocks, generator=gen)
    # Padding entries stay 0: a valid id that another row owns.
    block_tables = torch.zeros(batch, MAX_BLOCKS, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, STALE), torch.full(shape, -STALE)
    taken = 0
    for i, (n, used) in enumerate(zip(context_lens.tolist(), blocks_per_row.tolist())):
        block_tables[i, :used] = order[taken : taken + used]
        taken += used
        positions = torch.arange(n)
        blocks, slots = block_tables[i, positions // block_size].long(), positions % block_size
        k_cache[blocks, slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
        v_cache[blocks, slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(batch, num_heads, head_dim, generator=gen)
    tensors = (t.to(device) for t in (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)))
    return (*tensors, block_tables.to(device), context_lens.to(device), head_dim**-0.5)


def _context_lens(batch, block_size, gen):
    # [batch] int32 in [1, MAX_BLOCKS * block_size]; the first rows take the edges: one token, exactly one
    # block, exactly three blocks, the whole table.
    lens = torch.randint(1, MAX_BLOCKS * block_size + 1, (batch,), generator=gen, dtype=torch.int32)
    edges = torch.tensor([1, block_size, 3 * block_size, MAX_BLOCKS * block_size], dtype=torch.int32)
    lens[: min(batch, len(edges))] = edges[:batch]
    return lens


def assert_matches_reference(attention, case):
    q = case[0]
    out = attention(*case)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = pa.paged_decode_attention_ref(*case)
    atol, rtol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


def _grid_param(dtype, heads, head_dim, block_size):
    name = f"{str(dtype).removeprefix('torch.')}-h{heads[0]}kv{heads[1]}-d{head_dim}-bs{block_size}"
    return pytest.param(dtype, heads, head_dim, block_size, id=name)


grid = pytest.mark.parametrize(
    "dtype, heads, head_dim, block_size",
    [
        _grid_param(dtype, heads, head_dim, block_size)
        for dtype in TOLERANCE
        for heads in HEADS
        for head_dim in (32, 64)
        for block_size in (16, 32)
    ],
)


@grid
@pytest.mark.parametrize("batch", [1, 5, 17])
def test_torch_matches_reference(batch, dtype, heads, head_dim, block_size):
    case = make_case(batch, heads, head_dim, block_size, dtype, seed=batch)
    assert_matches_reference(pa.paged_decode_attention_torch, case)


@needs_triton
@grid
@pytest.mark.parametrize("batch", [1, 9])
def test_triton_interpreted_matches_reference(batch, dtype, heads, head_dim, block_size):
    case = make_case(batch, heads, head_dim, block_size, dtype, seed=batch)
    assert_matches_reference(pa.paged_decode_attention_triton, case)


@needs_triton
@pytest.mark.parametrize("head_dim, block_size", [(128, 16), (64, 32)])
def test_triton_interpreted_wide_batch(head_dim, block_size):
    case = make_case(17, (8, 2), head_dim, block_size, torch.bfloat16, seed=3)
    assert_matches_reference(pa.paged_decode_attention_triton, case)


@pytest.mark.parametrize(
    "attention",
    [pa.paged_decode_attention_torch, pytest.param(pa.paged_decode_attention_triton, marks=needs_triton)],
)
def test_strided_query(attention):
    # q sliced out of a fused qkv projection: [B, H + 2 * Hkv, D] -> [B, H, D] with a larger row stride.
    q, *rest = make_case(5, (8, 2), 64, 16, torch.float32)
    qkv = torch.cat([q, torch.zeros(5, 4, 64)], dim=1)
    assert_matches_reference(attention, (qkv[:, :8], *rest))


def test_max_context_len_hint_gives_same_output():
    case = make_case(7, (8, 2), 64, 16, torch.float32)
    hint = int(case[4].max())
    with_hint = pa.paged_decode_attention_torch(*case, max_context_len=hint)
    torch.testing.assert_close(with_hint, pa.paged_decode_attention_torch(*case), atol=0, rtol=0)


def test_output_survives_later_calls():
    # The CPU torch path reuses gather buffers between calls; outputs must not alias them.
    first, second = make_case(9, (8, 2), 64, 16, torch.float32), make_case(3, (4, 4), 64, 16, torch.float32)
    out = pa.paged_decode_attention_torch(*first)
    pa.paged_decode_attention_torch(*second)
    torch.testing.assert_close(out, pa.paged_decode_attention_ref(*first), atol=1e-5, rtol=1e-5)


def test_dispatcher_uses_the_native_cpu_kernel_on_cpu():
    from gpu_worker.kernels import cpu_ops

    case = make_case(5, (8, 2), 64, 16, torch.float32)
    expected = cpu_ops.cpu_paged_decode_attention(*case)
    torch.testing.assert_close(pa.paged_decode_attention(*case), expected, atol=0, rtol=0)
    torch.testing.assert_close(expected, pa.paged_decode_attention_ref(*case), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("head_dim, block_size", [(48, 16), (96, 16), (64, 8), (64, 64)])
def test_triton_rejects_unsupported_shapes(head_dim, block_size):
    q = torch.zeros(2, 4, head_dim)
    cache = torch.zeros(4, block_size, 2, head_dim)
    tables, lens = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim in"):
        pa.paged_decode_attention_triton(q, cache, cache, tables, lens, 1.0)


@pytest.mark.parametrize(
    "q_shape, cache_shape, tables_shape",
    [
        ((2, 4, 64), (4, 16, 3, 64), (2, 1)),  # H not a multiple of Hkv
        ((2, 4, 32), (4, 16, 2, 64), (2, 1)),  # head_dim differs
        ((2, 4, 64), (4, 16, 2, 64), (3, 1)),  # batch differs
        ((2, 64), (4, 16, 2, 64), (2, 1)),  # q without a head dim
    ],
)
def test_bad_shapes_raise(q_shape, cache_shape, tables_shape):
    cache = torch.zeros(cache_shape)
    tables, lens = torch.zeros(tables_shape, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError):
        pa.paged_decode_attention_torch(torch.zeros(q_shape), cache, cache, tables, lens, 1.0)


def check_compiled_on_cuda():
    """Entry point of the child process started by `test_compiled_triton_on_cuda`."""
    os.environ["TRITON_INTERPRET"] = "0"  # this module set "1"; the kernel module has not built a kernel yet
    for dtype in TOLERANCE:
        for heads in HEADS:
            for head_dim, block_size in [(32, 16), (64, 32), (128, 16)]:
                case = make_case(17, heads, head_dim, block_size, dtype, seed=head_dim, device="cuda")
                assert_matches_reference(pa.paged_decode_attention_triton, case)
                assert_matches_reference(pa.paged_decode_attention, case)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_triton_on_cuda():
    # A fresh process: interpreted kernels already built here would leave triton's interpreter state behind.
    tests_dir = Path(__file__).resolve().parent
    code = "import test_paged_attention as t; t.check_compiled_on_cuda()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent)])}
    env.pop("TRITON_INTERPRET")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_torch_path_works_inside_and_outside_inference_mode():
    """The CPU scratch buffers must not become inference tensors (the engine calls under inference_mode)."""
    case = make_case(3, (4, 4), 32, 16, torch.float32, seed=99)
    pa._cpu_scratch.buffers.clear()  # the first take happens inside inference_mode
    with torch.inference_mode():
        inside = pa.paged_decode_attention_torch(*case).clone()
    outside = pa.paged_decode_attention_torch(*case)
    torch.testing.assert_close(inside, outside)
