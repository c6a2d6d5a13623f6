"""Multi-LoRA kernels: BGMV and SGMV Triton kernels against the fp32 loop reference.

The kernels run under the Triton interpreter on CPU tensors here, at small in/out sizes that still leave a
partial block on every loop; `test_compiled_triton_on_cuda` runs the compiled kernels at 7B sizes in a fresh
process.
"""

import os

# Before anything can decorate a Triton kernel: triton.jit picks interpreter vs compiled mode at decoration.
os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_worker.kernels import lora

# dtype -> (atol, rtol) for y against the fp32 reference on the same (rounded) inputs, |y| up to ~6: y is
# rounded to its dtype once (a 1-ulp disagreement is 2**-5 at |y| = 4 in bf16), and SGMV rounds z to B's
# dtype before its dot. fp32: sums over in = 18944 in another order (the CUDA check).
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# z stays fp32 whatever x's dtype: products of half inputs are exact in fp32, so only the summation order
# differs from the reference, for every dtype.
Z_TOLERANCE = TOLERANCE[torch.float32]
RANKS = (4, 8, 16, 32, 64)
BATCHES = (1, 7, 64, 133)
POPULARITY = ("distinct", "uniform", "zipf", "identical", "none")
IN_FEATURES, OUT_FEATURES = 96, 96  # partial last blocks: BGMV 256 / 128, SGMV 64 / 64
FUSED_EXTRA = 40  # y is a fused output wider than out, so its row stride != out

needs_triton = pytest.mark.skipif(not lora.HAS_TRITON, reason="triton is not installed")


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def make_weights(num_slots, rank, dtype, gen, in_features=IN_FEATURES, out_features=OUT_FEATURES):
    """A: [S, R, in], B: [S, out, R], outputs O(1). Slot 0 holds an adapter of rank R / 2, zero-padded."""
    A = torch.randn(num_slots, rank, in_features, generator=gen) / in_features**0.5
    B = torch.randn(num_slots, out_features, rank, generator=gen) / rank**0.5
    A[0, rank // 2 :] = 0
    B[0, :, rank // 2 :] = 0
    return A.to(dtype), B.to(dtype)


def popular_slots(popularity, count, num_slots, gen):
    """[count] int64 slot ids drawn by an adapter-popularity pattern (punica's test mixes)."""
    if popularity == "distinct":
        return torch.randperm(num_slots, generator=gen)[:count]
    if popularity == "uniform":
        return torch.randint(num_slots, (count,), generator=gen)
    if popularity == "zipf":
        weights = torch.arange(1, num_slots + 1, dtype=torch.float64) ** -1.5
        return torch.multinomial(weights, count, replacement=True, generator=gen)
    if popularity == "identical":
        return torch.randint(num_slots, (1,), generator=gen).expand(count).clone()
    assert popularity == "none"
    return torch.zeros(0, dtype=torch.int64)


def make_pairs(batch, popularity, num_slots, gen, max_stack=1):
    """BGMV pairs over `batch` tokens in shuffled order, each token with 1..max_stack adapters (a stack),
    the pairs of one token adjacent. Returns tok, slot: [P] int64, and T = batch + 3 (3 rows no pair names).
    """
    tokens = torch.randperm(batch + 3, generator=gen)[:batch]
    if popularity == "none":
        return tokens[:0], popular_slots(popularity, 0, num_slots, gen), batch + 3
    depths = torch.randint(1, max_stack + 1, (batch,), generator=gen)
    if max_stack == 1:
        slot = popular_slots(popularity, batch, num_slots, gen)
    else:  # a stack holds distinct adapters, whatever the popularity
        slot = torch.cat([torch.randperm(num_slots, generator=gen)[:d] for d in depths.tolist()])
    return tokens.repeat_interleave(depths), slot, batch + 3


def make_segments(lengths, depths, popularity, num_slots, gen):
    """SGMV segments: group g covers lengths[g] contiguous tokens with depths[g] adapters (one segment each,
    adjacent, equal tok_start); a gap of 0-2 tokens no segment names separates groups.

    Returns seg_starts [n + 1], seg_slots [n], tok_start [n] (int32), and the number of token rows T.
    """
    if popularity == "none":
        lengths, depths = [], []
    starts, tok_start, cursor = [0], [], 0
    for length, depth in zip(lengths, depths):
        cursor += int(torch.randint(3, (1,), generator=gen))
        for _ in range(depth):
            starts.append(starts[-1] + length)
            tok_start.append(cursor)
        cursor += length
    seg_slots = popular_slots(popularity, len(tok_start), num_slots, gen)
    as_int32 = [torch.tensor(v, dtype=torch.int32) for v in (starts, seg_slots.tolist(), tok_start)]
    return (*as_int32, cursor + 2)


def segments_to_pairs(seg_starts, seg_slots, tok_start):
    """The (tok, slot) pairs that SGMV segments stand for, in pair order."""
    lengths = (seg_starts[1:] - seg_starts[:-1]).long()
    tok = [torch.arange(t, t + n) for t, n in zip(tok_start.tolist(), lengths.tolist())]
    tok = torch.cat(tok) if tok else torch.zeros(0, dtype=torch.int64)
    return tok, seg_slots.long().repeat_interleave(lengths)


def fused_output(num_tokens, dtype, gen, out_features=OUT_FEATURES):
    return torch.randn(num_tokens, out_features + FUSED_EXTRA, generator=gen).to(dtype)


def assert_z_matches(z, x, A, tok, slot):
    assert z.shape == (len(tok), A.shape[1]) and z.dtype == torch.float32
    atol, rtol = Z_TOLERANCE
    torch.testing.assert_close(z, lora.lora_shrink_ref(x, A, tok, slot), atol=atol, rtol=rtol)


def assert_expand_matches(expand, z, B, tok, slot, y, offset):
    """Runs `expand(z, B, y_copy, offset)`; checks it against the reference and that every element outside
    the named rows and columns offset:offset + out is bit-for-bit unchanged."""
    expected = lora.lora_expand_ref(z, B, tok, slot, y.clone(), offset)
    out = y.clone()
    assert expand(z, B, out, offset) is out
    atol, rtol = TOLERANCE[y.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)
    touched = torch.zeros(y.shape, dtype=torch.bool, device=y.device)
    touched[tok.long().unique(), offset : offset + B.shape[1]] = True
    assert torch.equal(out[~touched], y[~touched])


def check_bgmv(x, A, B, tok, slot, y, offset=0):
    z = lora.bgmv_shrink_triton(x, A, tok, slot)
    assert_z_matches(z, x, A, tok, slot)

    def expand(z, B, y, offset):
        return lora.bgmv_expand_triton(z, B, tok, slot, y, offset)

    assert_expand_matches(expand, z, B, tok, slot, y, offset)


def check_sgmv(x, A, B, segments, y, offset=0):
    seg_starts, seg_slots, tok_start = segments
    tok, slot = segments_to_pairs(*segments)
    z = lora.sgmv_shrink_triton(x, A, seg_starts, seg_slots, tok_start)
    assert_z_matches(z, x, A, tok, slot)

    def expand(z, B, y, offset):
        return lora.sgmv_expand_triton(z, B, seg_starts, seg_slots, tok_start, y, offset)

    assert_expand_matches(expand, z, B, tok, slot, y, offset)


def bgmv_case(batch, popularity, rank, dtype, seed, max_stack=1):
    gen = torch.Generator().manual_seed(seed)
    num_slots = batch + 2  # enough for "distinct"
    tok, slot, num_tokens = make_pairs(batch, popularity, num_slots, gen, max_stack)
    A, B = make_weights(num_slots, rank, dtype, gen)
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype)
    return x, A, B, tok, slot, fused_output(num_tokens, dtype, gen)


def sgmv_case(lengths, depths, popularity, rank, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(depths) + 2
    *segments, num_tokens = make_segments(lengths, depths, popularity, num_slots, gen)
    A, B = make_weights(num_slots, rank, dtype, gen)
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype)
    return x, A, B, segments, fused_output(num_tokens, dtype, gen)


dtypes = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=dtype_name)
ranks = pytest.mark.parametrize("rank", RANKS)

# (lengths, depths) of SGMV segment groups: a depth > 1 is a stack; 70 tokens take two 64-row tiles.
LAYOUTS = {
    "one-token": ([1], [1]),
    "varied": ([1, 5, 33, 2, 70], [1, 1, 1, 1, 1]),
    "stacked": ([5, 33, 1, 9], [2, 3, 1, 2]),
}


@needs_triton
@dtypes
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("batch", BATCHES)
def test_bgmv_matches_reference(batch, popularity, dtype):
    check_bgmv(*bgmv_case(batch, popularity, 16, dtype, seed=batch))


@needs_triton
@dtypes
@ranks
def test_bgmv_stacks_over_ranks(rank, dtype):
    # 9 tokens with 1-3 adapters each; y updated in its middle columns, as the k part of a fused qkv.
    x, A, B, tok, slot, y = bgmv_case(9, "uniform", rank, dtype, seed=rank, max_stack=3)
    assert len(tok) > len(tok.unique())
    check_bgmv(x, A, B, tok, slot, y, offset=FUSED_EXTRA // 2)


@needs_triton
@dtypes
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sgmv_matches_reference(layout, popularity, dtype):
    check_sgmv(*sgmv_case(*LAYOUTS[layout], popularity, 16, dtype, seed=list(LAYOUTS).index(layout)))


@needs_triton
@dtypes
@ranks
def test_sgmv_stacks_over_ranks(rank, dtype):
    x, A, B, segments, y = sgmv_case(*LAYOUTS["stacked"], "distinct", rank, dtype, seed=rank)
    check_sgmv(x, A, B, segments, y, offset=FUSED_EXTRA)


@needs_triton
def test_sgmv_without_segments_leaves_y_unchanged():
    x, A, B, _, y = sgmv_case([1], [1], "uniform", 8, torch.float16, seed=0)
    none = (torch.zeros(1, dtype=torch.int32), *(torch.zeros(0, dtype=torch.int32) for _ in range(2)))
    assert lora.sgmv_shrink_triton(x, A, *none).shape == (0, 8)
    out = lora.sgmv_expand_triton(torch.zeros(0, 8), B, *none, y.clone())
    assert torch.equal(out, y)


@needs_triton
@pytest.mark.parametrize("family", ["bgmv", "sgmv"])
def test_several_blocks_per_loop(family):
    # in = 600, out = 300: three K blocks and three N tiles (BGMV), ten and five (SGMV), each with a tail.
    gen = torch.Generator().manual_seed(5)
    A, B = make_weights(6, 32, torch.float16, gen, in_features=600, out_features=300)
    if family == "bgmv":
        tok, slot, num_tokens = make_pairs(5, "uniform", 6, gen, max_stack=2)
    else:
        *segments, num_tokens = make_segments([3, 20], [2, 1], "distinct", 6, gen)
    x = torch.randn(num_tokens, 600, generator=gen).half()
    y = fused_output(num_tokens, torch.float16, gen, out_features=300)
    if family == "bgmv":
        check_bgmv(x, A, B, tok, slot, y, offset=7)
    else:
        check_sgmv(x, A, B, segments, y, offset=7)


@needs_triton
def test_sgmv_hints_match_computed_sizes():
    x, A, B, segments, y = sgmv_case(*LAYOUTS["varied"], "uniform", 8, torch.float32, seed=1)
    num_pairs, max_len = int(segments[0][-1]), 200  # an upper bound on the longest segment (70) is enough
    z = lora.sgmv_shrink_triton(x, A, *segments, num_pairs=num_pairs, max_seg_len=max_len)
    torch.testing.assert_close(z, lora.sgmv_shrink_triton(x, A, *segments), atol=0, rtol=0)
    hinted = lora.sgmv_expand_triton(z, B, *segments, y.clone(), max_seg_len=max_len)
    torch.testing.assert_close(hinted, lora.sgmv_expand_triton(z, B, *segments, y.clone()), atol=0, rtol=0)


def pool_case(width, sizes, dtype, gen, in_features=IN_FEATURES, num_slots=12):
    """The adapter pool's layout (gpu_worker/lora/pool.py): At [S, in, n_sub * R] (the sub-modules' A^T side
    by side) and Bt_j [S, R, size_j], with the [S, R, in] / [S, out, R] copies the reference reads."""
    A, _ = make_weights(num_slots, width * len(sizes), dtype, gen, in_features, 1)
    Bs = [make_weights(num_slots, width, dtype, gen, 1, size)[1] for size in sizes]
    at = A.transpose(1, 2).contiguous()
    return at, [B.transpose(1, 2).contiguous() for B in Bs], A, Bs


def check_pool_layout(family, x, at, bts, A, Bs, pairs, y, offset):
    """One fused shrink, then one expand per sub-module into its column slice of y (offset by the earlier
    sub-modules' widths), as gpu_worker/lora/batch.py runs them; each against the reference."""
    if family == "bgmv":
        tok, slot = pairs
        z = lora.bgmv_shrink_at(x, at, tok, slot)
    else:
        tok, slot = segments_to_pairs(*pairs)
        z = lora.sgmv_shrink_at(x, at, *pairs)
    assert_z_matches(z, x, A, tok, slot)
    width = bts[0].shape[1]
    for j, (bt, B) in enumerate(zip(bts, Bs)):
        def expand(z, B, y, offset, bt=bt):
            if family == "bgmv":
                return lora.bgmv_expand_bt(z, bt, tok, slot, y, offset)
            return lora.sgmv_expand_bt(z, bt, *pairs, y, offset)

        assert_expand_matches(expand, z[:, j * width:(j + 1) * width], B, tok, slot, y, offset)
        offset += bt.shape[2]


@needs_triton
@dtypes
@pytest.mark.parametrize("family", ["bgmv", "sgmv"])
@pytest.mark.parametrize("width, sizes", [(4, (40,)), (8, (48, 24, 24)), (12, (40, 20, 20)), (16, (56, 56)),
                                          (64, (40, 16, 16))], ids=["r4", "r8-qkv", "r12-qkv", "r16-gate_up",
                                                                    "r64-qkv"])
def test_pool_layout_matches_reference(width, sizes, family, dtype):
    # Stacks of 1-3 adapters; R = 12 is a width that is not a power of two (a pool capped at rank 12); the
    # fused z of r64-qkv is 192 wide: three SGMV column tiles, three BGMV rank blocks.
    gen = torch.Generator().manual_seed(width)
    at, bts, A, Bs = pool_case(width, sizes, dtype, gen)
    if family == "bgmv":
        tok, slot, num_tokens = make_pairs(9, "uniform", 12, gen, max_stack=3)
        pairs = tok.int(), slot.int()
    else:
        *pairs, num_tokens = make_segments(*LAYOUTS["stacked"], "distinct", 12, gen)
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype)
    y = fused_output(num_tokens, dtype, gen, out_features=sum(sizes))
    check_pool_layout(family, x, at, bts, A, Bs, pairs, y, offset=FUSED_EXTRA // 2)


def test_bad_pool_layout_args_raise():
    x, at = torch.zeros(2, 8), torch.zeros(1, 8, 12)
    pairs = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="want x"):
        lora.bgmv_shrink_at(x, at.transpose(1, 2), *pairs)
    with pytest.raises(ValueError, match="unit stride"):
        lora.bgmv_shrink_at(x, torch.zeros(1, 12, 8).transpose(1, 2), *pairs)
    with pytest.raises(ValueError, match="dtypes differ"):
        lora.bgmv_shrink_at(x.half(), at, *pairs)
    z, bt, y = torch.zeros(1, 4), torch.zeros(1, 4, 16), torch.zeros(2, 20)
    with pytest.raises(ValueError, match="want z"):
        lora.bgmv_expand_bt(z, bt.transpose(1, 2), *pairs, y)
    with pytest.raises(ValueError, match="do not fit"):
        lora.bgmv_expand_bt(z, bt, *pairs, y, offset=5)
    with pytest.raises(ValueError, match="float32"):
        lora.bgmv_expand_bt(z.half(), bt, *pairs, y)


def test_reference_matches_vectorized_formula():
    x, A, B, tok, slot, y = bgmv_case(6, "uniform", 8, torch.float32, seed=2, max_stack=3)
    z = lora.lora_shrink_ref(x, A, tok, slot)
    torch.testing.assert_close(z, torch.einsum("pri,pi->pr", A[slot], x[tok]))
    delta = torch.einsum("por,pr->po", B[slot], z)
    expected = y.clone()
    expected[:, 5 : 5 + OUT_FEATURES] += torch.zeros(len(y), OUT_FEATURES).index_add_(0, tok, delta)
    torch.testing.assert_close(lora.lora_expand_ref(z, B, tok, slot, y, offset=5), expected)


@pytest.mark.parametrize("rank", [3, 12, 48])
def test_rank_not_power_of_two_raises(rank):
    x, A = torch.zeros(2, 8), torch.zeros(1, rank, 8)
    pairs = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="power of two"):
        lora.bgmv_shrink_triton(x, A, *pairs)
    with pytest.raises(ValueError, match="power of two"):
        lora.bgmv_expand_triton(torch.zeros(1, rank), torch.zeros(1, 8, rank), *pairs, torch.zeros(2, 8))


@pytest.mark.parametrize(
    "z, B, y, offset",
    [
        (torch.zeros(1, 8), torch.zeros(1, 16, 8), torch.zeros(2, 16), 1),  # columns past y's width
        (torch.zeros(1, 8), torch.zeros(1, 16, 8), torch.zeros(2, 16), -1),  # negative offset
        (torch.zeros(1, 8).half(), torch.zeros(1, 16, 8).half(), torch.zeros(2, 16).half(), 0),  # z not fp32
        (torch.zeros(1, 8), torch.zeros(1, 16, 8).half(), torch.zeros(2, 16), 0),  # B and y dtypes differ
        (torch.zeros(1, 4), torch.zeros(1, 16, 8), torch.zeros(2, 16), 0),  # z's rank != B's
    ],
)
def test_bad_expand_args_raise(z, B, y, offset):
    pairs = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError):
        lora.bgmv_expand_triton(z, B, *pairs, y, offset)


def test_bad_shrink_args_raise():
    x, A = torch.zeros(2, 8), torch.zeros(1, 4, 8)
    pairs = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="int32 or int64"):
        lora.bgmv_shrink_triton(x, A, torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="tok and slot"):
        lora.bgmv_shrink_triton(x, A, torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    segments = tuple(torch.zeros(1, dtype=torch.int32) for _ in range(3))  # seg_starts needs 2 entries
    with pytest.raises(ValueError, match="seg_starts"):
        lora.sgmv_shrink_triton(x, A, *segments)
    with pytest.raises(ValueError, match="dtypes differ"):
        lora.bgmv_shrink_triton(x.half(), A, *pairs)
    with pytest.raises(ValueError, match="want x"):
        lora.bgmv_shrink_triton(x[:, :4], A, *pairs)


# Constexprs of the compile check: the smallest tiles of each kernel, half types (tensor-core dots).
COMPILE_CONSTEXPRS = {"BLOCK_R": 4, "BLOCK_K": 64, "BLOCK_M": 16, "BLOCK_N": 64, "RANK": 4, "RANK_PAD": 16,
                      "DOT_PRECISION": None, "DOT_IN_FP32": False}
# Tiles of the pool's layout: a width that is not a power of two (24 padded to 32), the largest row tiles.
POOL_COMPILE_CONSTEXPRS = {**COMPILE_CONSTEXPRS, "BLOCK_R": 32, "BLOCK_K": 128, "BLOCK_M": 64, "RANK": 24,
                           "RANK_PAD": 32}


def compile_for_hopper():
    """Entry point of the child process started by `test_kernels_compile_for_hopper`."""
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = lora._kernels()
    for values in (COMPILE_CONSTEXPRS, POOL_COMPILE_CONSTEXPRS):
        for name in ("bgmv_shrink", "bgmv_expand", "sgmv_shrink", "sgmv_expand"):
            fn = getattr(kernels, name)
            # x, A, B, y in bf16, z in fp32, index tensors int32, sizes and strides int32.
            signature = {p.name: _compile_arg_type(p) for p in fn.params}
            constexprs = {key: values[key] for key, kind in signature.items() if kind == "constexpr"}
            triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))


def _compile_arg_type(param):
    if param.is_constexpr:
        return "constexpr"
    if not param.name.endswith("_ptr"):
        return "i32"
    return {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "z_ptr": "*fp32"}.get(
        param.name, "*i32"
    )


@needs_triton
def test_kernels_compile_for_hopper():
    # The interpreter runs Python, so it accepts code the compiler rejects (early returns, while-loop types,
    # dot shapes); this compiles each kernel down to a cubin for sm_90 with triton's own ptxas, no GPU needed.
    result = _run_child("compile_for_hopper")
    assert result.returncode == 0, result.stderr[-4000:]


def check_compiled_on_cuda():
    """Entry point of the child process started by `test_compiled_triton_on_cuda`: 7B projection sizes."""
    os.environ["TRITON_INTERPRET"] = "0"  # this module set "1"; the kernel module has not built a kernel yet
    gen = torch.Generator().manual_seed(0)
    for dtype in TOLERANCE:
        for in_features, out_features in [(3584, 18944), (18944, 3584), (3584, 512)]:
            for rank in (4, 16, 64):
                A, B = (w.cuda() for w in make_weights(70, rank, dtype, gen, in_features, out_features))
                tok, slot, num_tokens = make_pairs(64, "uniform", 70, gen, max_stack=3)
                layout = [1, 5, 33, 130, 9], [1, 2, 1, 1, 3]
                *segments, sgmv_tokens = make_segments(*layout, "uniform", 70, gen)
                num_tokens = max(num_tokens, sgmv_tokens)
                x = torch.randn(num_tokens, in_features, generator=gen).to(dtype).cuda()
                y = fused_output(num_tokens, dtype, gen, out_features).cuda()
                check_bgmv(x, A, B, tok.cuda(), slot.cuda(), y, offset=FUSED_EXTRA)
                check_sgmv(x, A, B, [s.cuda() for s in segments], y, offset=FUSED_EXTRA)
        # The pool's layout: a fused qkv (q | k | v) and a down_proj, as the engine runs them.
        for in_features, sizes in [(3584, (3584, 512, 512)), (18944, (3584,))]:
            for width in (8, 64):
                at, bts, A, Bs = pool_case(width, sizes, dtype, gen, in_features, num_slots=70)
                at, A, bts, Bs = at.cuda(), A.cuda(), [b.cuda() for b in bts], [b.cuda() for b in Bs]
                tok, slot, num_tokens = make_pairs(64, "uniform", 70, gen, max_stack=3)
                layout = [1, 5, 33, 130, 9], [1, 2, 1, 1, 3]
                *segments, sgmv_tokens = make_segments(*layout, "uniform", 70, gen)
                num_tokens = max(num_tokens, sgmv_tokens)
                x = torch.randn(num_tokens, in_features, generator=gen).to(dtype).cuda()
                y = fused_output(num_tokens, dtype, gen, sum(sizes)).cuda()
                check_pool_layout("bgmv", x, at, bts, A, Bs, (tok.cuda(), slot.cuda()), y, FUSED_EXTRA)
                check_pool_layout("sgmv", x, at, bts, A, Bs, [s.cuda() for s in segments], y, FUSED_EXTRA)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_triton_on_cuda():
    result = _run_child("check_compiled_on_cuda")
    assert result.returncode == 0, result.stderr[-4000:]


def _run_child(entry_point):
    # A fresh process: interpreted kernels already built here would leave triton's interpreter state behind.
    tests_dir = Path(__file__).resolve().parent
    code = f"import test_lora_kernels as t; t.{entry_point}()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent)])}
    env.pop("TRITON_INTERPRET")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
