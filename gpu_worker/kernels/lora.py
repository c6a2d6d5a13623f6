"""Multi-LoRA kernels (punica style): many adapters in one batch, each row adding its adapters' deltas.

Weight layouts, per layer and projection, adapters stacked by slot. `*_triton` functions:
    A: [S, R, in]   lora_A rows; each rank row contiguous over `in`
    B: [S, out, R]  lora_B with the adapter's scale folded in
S = number of slots, R = max rank, a power of two; an adapter of smaller rank is zero-padded, so its padding
adds exactly 0. A token may carry several adapters (a stack), so the batch is a list of (token, slot) PAIRS;
the delta of one linear layer is `expand(shrink(x))`:
    z[p] = A[slot[p]] @ x[tok[p]]                                  # shrink, z: [P, R] float32
    y[tok[p], offset:offset + out] += B[slot[p]] @ z[p]            # expand, in place, for every pair p

`*_at` / `*_bt` functions: the layout the engine's AdapterPool stores (gpu_worker/lora/pool.py, batch.py):
    At: [S, in, C]     a fused module's A^T, sub-modules side by side (C = n_sub * R: q | k | v for qkv)
    Bt_j: [S, R, out_j]  one per sub-module j
The same kernels read them in place through transposed views (strides are kernel arguments; triton
specializes a stride of 1, so each layout loads along its contiguous dimension): no per-step copy. One
shrink over At gives z [P, C]; sub-module j's expand reads the column view z[:, j*R:(j+1)*R] and adds into
y's columns offset_j:offset_j + out_j of the fused output. R and C need not be powers of two there (the
pool's width is capped by max_lora_rank): the kernels pad their tiles to one and mask.

Two families of Triton kernels compute these:
- BGMV (decode): pairs given one by one (`tok`, `slot`: [P]); one program per (pair, feature block).
- SGMV (prefill): pairs grouped into segments that share a slot and map to contiguous tokens; one program
  per (segment, tile of rows, feature block) multiplies a tile of rows by the adapter tile with `tl.dot`, so
  a segment of n tokens reads its adapter once per row tile instead of n times.

Duplicate tokens in expand (stacks): adding each pair's delta from its own program would race on y. Instead
the pairs (BGMV) or segments (SGMV) of one token must be ADJACENT in the list; the first of them walks its
run, sums all deltas in fp32 and writes y once; the others return at once. So y[t] is read once, gets
`sum_p delta_p` in fp32 and is rounded to y's dtype once, with no atomics and a deterministic result.

Preconditions of the Triton paths (not checked: each would cost a device sync): every token row < x.shape[0]
(or y.shape[0]), every slot < S, pairs/segments of one token adjacent, SGMV segments non-empty. Shapes and
dtypes are checked.

Triton is imported on first use, not at module import, because `triton.jit` fixes interpreter vs compiled
mode from `TRITON_INTERPRET` when the kernel is decorated; the built kernels are cached per value of it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import SimpleNamespace

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Tile sizes. BGMV: a [BLOCK_R, 256] slice of A or a [128, R] slice of B per step. SGMV: row tiles of 16-64
# (by the longest segment) and 64-wide feature tiles; tl.dot needs every tile side >= 16, so R pads to 16.
_BGMV_BLOCK_K = 256
_BGMV_BLOCK_R = 16
_BGMV_BLOCK_N = 128
_SGMV_BLOCK_K = 64
_SGMV_BLOCK_N = 64
_SGMV_MAX_BLOCK_M = 64
_DOT_MIN = 16
# The pool's At [S, in, C] is contiguous over C: a BGMV program reads [BLOCK_K, up to 64] tiles of whole
# At rows (_BGMV_AT_TILE elements), an SGMV program a column tile of up to 64 (several tiles for C > 64).
_BGMV_AT_BLOCK_R = 64
_BGMV_AT_TILE = 4096
_SGMV_AT_BLOCK_R = 64


def triton_interpreted() -> bool:
    """Whether TRITON_INTERPRET selects triton's interpreter, read as triton reads it (1/true/on/yes)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def triton_unavailable(device_type: str | None = None) -> str | None:
    """Why these kernels cannot run on a `device_type` ("cuda", "cpu") device, or on any device of this
    machine when None; None when they can. Compiled kernels need CUDA; the interpreter runs anywhere."""
    if not HAS_TRITON:
        return "triton is not installed"
    if triton_interpreted():
        return None
    if device_type == "cuda" or (device_type is None and torch.cuda.is_available()):
        return None
    where = ("on this machine (no CUDA device)" if device_type is None
             else "on the CPU" if device_type == "cpu" else f"on a {device_type} device")
    return (f"the compiled Triton kernels need a CUDA device; {where} they run only under triton's "
            "interpreter (TRITON_INTERPRET=1, slow: for tests)")


def lora_shrink_ref(x, A, tok, slot):
    """fp32 loop reference for tests: z[p] = A[slot[p]] @ x[tok[p]]. Returns z: [P, R] float32."""
    z = torch.zeros(len(tok), A.shape[1], dtype=torch.float32, device=x.device)
    for p, (t, s) in enumerate(zip(tok.tolist(), slot.tolist())):
        z[p] = A[s].float() @ x[t].float()
    return z


def lora_expand_ref(z, B, tok, slot, y, offset=0):
    """fp32 loop reference for tests: y[tok[p], offset:offset + out] += B[slot[p]] @ z[p], in place.

    Sums in fp32 and rounds each touched row of y once. Returns y.
    """
    cols = slice(offset, offset + B.shape[1])
    acc = y[:, cols].float()
    for p, (t, s) in enumerate(zip(tok.tolist(), slot.tolist())):
        acc[t] += B[s].float() @ z[p].float()
    y[:, cols] = acc.to(y.dtype)
    return y


def bgmv_shrink_triton(x, A, tok, slot):
    """BGMV shrink, one program per (pair, block of rank rows), looping over `in` in blocks.

    Semantics:
        for p in range(P):
            z[p] = A[slot[p]] @ x[tok[p]]            # fp32 accumulate

    Args:
        x: [T, in], unit stride over `in` (may be a column slice of a wider tensor).
        A: [S, R, in], x's dtype, unit stride over `in`; R a power of two.
        tok: [P] int32/int64 token row of each pair; slot: [P] int32/int64 adapter slot of each pair.
    Returns:
        z: [P, R] float32.
    """
    _check_shrink(x, A)
    _check_pairs(tok, slot)
    return _bgmv_shrink(x, A, tok, slot, block_r=min(A.shape[1], _BGMV_BLOCK_R), block_k=_BGMV_BLOCK_K)


def bgmv_expand_triton(z, B, tok, slot, y, offset=0):
    """BGMV expand, one program per (pair, block of output features); the rank is one block, no K loop.

    Semantics:
        for p in range(P):
            y[tok[p], offset:offset + out] += B[slot[p]] @ z[p]

    Pairs of one token (a stack) must be adjacent: the first of them sums the whole run in fp32 and writes
    the row once (see the module docstring); a token's row is rounded to y's dtype once.

    Args:
        z: [P, R] float32 (from a shrink).
        B: [S, out, R], y's dtype, unit stride over R.
        tok, slot: [P] int32/int64, as in `bgmv_shrink_triton`.
        y: [T, >= offset + out], unit column stride; updated in place in columns offset:offset + out, e.g.
            the whole fused qkv output with offset = the q width to update the k part.
        offset: first column of y to update.
    Returns:
        y.
    """
    _check_expand(z, B, y, offset)
    _check_pairs(tok, slot)
    return _bgmv_expand(z, B, tok, slot, y, offset)


def sgmv_shrink_triton(x, A, seg_starts, seg_slots, tok_start, *, num_pairs=None, max_seg_len=None):
    """SGMV shrink: per segment, a tile of rows times the adapter tile with tl.dot, looping over `in`.

    Segment i covers pair rows seg_starts[i]:seg_starts[i + 1], all with slot seg_slots[i], and pair row
    seg_starts[i] + j reads token row tok_start[i] + j. Semantics:
        for i in range(num_segments):
            for j in range(seg_starts[i + 1] - seg_starts[i]):
                z[seg_starts[i] + j] = A[seg_slots[i]] @ x[tok_start[i] + j]      # fp32 accumulate

    Args:
        x, A: as in `bgmv_shrink_triton` (same dtype; fp32 tiles multiply in IEEE fp32, not tf32).
        seg_starts: [num_segments + 1] int32/int64, strictly increasing (no empty segment), from 0.
        seg_slots: [num_segments] int32/int64.
        tok_start: [num_segments] int32/int64, first token row of each segment.
        num_pairs: seg_starts[-1], exactly, if the caller knows it (saves a device sync).
        max_seg_len: an upper bound on the longest segment (e.g. the prefill chunk size) if the caller knows
            one (saves a device sync); programs past a segment's end return at once.
    Returns:
        z: [num_pairs, R] float32, in pair order.
    """
    _check_shrink(x, A)
    _check_segments(seg_starts, seg_slots, tok_start)
    return _sgmv_shrink(x, A, seg_starts, seg_slots, tok_start, num_pairs, max_seg_len,
                        block_r=max(A.shape[1], _DOT_MIN))


def sgmv_expand_triton(z, B, seg_starts, seg_slots, tok_start, y, offset=0, *, max_seg_len=None):
    """SGMV expand: per segment, a tile of z rows times the B tile with tl.dot, added to y in place.

    Segments as in `sgmv_shrink_triton`. Semantics:
        for i in range(num_segments):
            for j in range(seg_starts[i + 1] - seg_starts[i]):
                y[tok_start[i] + j, offset:offset + out] += B[seg_slots[i]] @ z[seg_starts[i] + j]

    Stacks: segments that cover the same tokens must be adjacent with equal tok_start and equal length (a
    stack group); the groups' token ranges must be disjoint. The group's first segment sums all of its
    segments in fp32 and writes each y row once. For fp16/bf16 B the z tile is rounded to B's dtype before
    the dot (tensor cores), as vLLM does; fp32 multiplies in IEEE fp32.

    Args:
        z: [P, R] float32; B, y, offset: as in `bgmv_expand_triton`.
        seg_starts, seg_slots, tok_start, max_seg_len: as in `sgmv_shrink_triton`.
    Returns:
        y.
    """
    _check_expand(z, B, y, offset)
    _check_segments(seg_starts, seg_slots, tok_start)
    return _sgmv_expand(z, B, seg_starts, seg_slots, tok_start, y, offset, max_seg_len)


# --- the adapter pool's layout (gpu_worker/lora/pool.py): At [S, in, C], Bt [S, R, out] -----------------
# The same kernels read the pool's tensors in place through transposed views (A = At^T, B = Bt^T): no copy.


def bgmv_shrink_at(x, at, tok, slot):
    """BGMV shrink over the pool's At layout: z[p] = x[tok[p]] @ at[slot[p]], fp32 accumulate.

    Args:
        x: [T, in], unit stride over `in`.
        at: [S, in, C], x's dtype, unit stride over C. C is any width, e.g. a fused module's n_sub * R
            (q | k | v side by side), so one shrink serves every sub-module.
        tok, slot: [P] int32/int64, as in `bgmv_shrink_triton`.
    Returns:
        z: [P, C] float32.
    """
    _check_shrink_at(x, at)
    _check_pairs(tok, slot)
    block_r = min(_next_pow2(at.shape[2]), _BGMV_AT_BLOCK_R)  # a program reads whole At rows when C <= 64
    return _bgmv_shrink(x, at.transpose(1, 2), tok, slot, block_r=block_r,
                        block_k=_BGMV_AT_TILE // block_r)


def bgmv_expand_bt(z, bt, tok, slot, y, offset=0):
    """BGMV expand over the pool's Bt layout: y[tok[p], offset:offset + out] += z[p] @ bt[slot[p]].

    Pairs of one token adjacent, summed in fp32 and written once, as in `bgmv_expand_triton`.

    Args:
        z: [P, R] float32, unit column stride: e.g. sub-module j's columns z[:, j*R:(j+1)*R] of a fused
            shrink (a view, no copy).
        bt: [S, R, out], y's dtype, unit stride over out. R is any width (padded to a power of two inside).
        tok, slot, y, offset: as in `bgmv_expand_triton`; offset selects the sub-module's slice of y.
    Returns:
        y.
    """
    _check_expand_bt(z, bt, y, offset)
    _check_pairs(tok, slot)
    return _bgmv_expand(z, bt.transpose(1, 2), tok, slot, y, offset)


def sgmv_shrink_at(x, at, seg_starts, seg_slots, tok_start, *, num_pairs=None, max_seg_len=None):
    """SGMV shrink over the pool's At layout: segments as in `sgmv_shrink_triton`, x and at as in
    `bgmv_shrink_at`. Wide C is split into column tiles of up to 64 (a third grid dimension).

    Returns:
        z: [num_pairs, C] float32, in pair order.
    """
    _check_shrink_at(x, at)
    _check_segments(seg_starts, seg_slots, tok_start)
    block_r = max(_DOT_MIN, min(_next_pow2(at.shape[2]), _SGMV_AT_BLOCK_R))
    return _sgmv_shrink(x, at.transpose(1, 2), seg_starts, seg_slots, tok_start, num_pairs, max_seg_len,
                        block_r=block_r)


def sgmv_expand_bt(z, bt, seg_starts, seg_slots, tok_start, y, offset=0, *, max_seg_len=None):
    """SGMV expand over the pool's Bt layout: segments and stacks as in `sgmv_expand_triton`, z, bt, y and
    offset as in `bgmv_expand_bt`. Returns y."""
    _check_expand_bt(z, bt, y, offset)
    _check_segments(seg_starts, seg_slots, tok_start)
    return _sgmv_expand(z, bt.transpose(1, 2), seg_starts, seg_slots, tok_start, y, offset, max_seg_len)


# --- launchers: A is [S, R, in] and B is [S, out, R] as LOGICAL shapes, with any strides -------------------


def _bgmv_shrink(x, A, tok, slot, *, block_r, block_k):
    num_ranks = A.shape[1]
    z = torch.empty(len(tok), num_ranks, dtype=torch.float32, device=x.device)
    if len(tok) and x.shape[1]:
        _kernels().bgmv_shrink[(len(tok), _cdiv(num_ranks, block_r))](
            x, A, tok, slot, z, x.shape[1], num_ranks,
            x.stride(0), A.stride(0), A.stride(1), A.stride(2), z.stride(0),
            BLOCK_R=block_r, BLOCK_K=block_k,
        )
    else:
        z.zero_()
    return z


def _bgmv_expand(z, B, tok, slot, y, offset):
    out, rank = B.shape[1], B.shape[2]
    if len(tok) == 0 or out == 0:
        return y
    _kernels().bgmv_expand[(len(tok), _cdiv(out, _BGMV_BLOCK_N))](
        z, B, tok, slot, y, len(tok), out, offset,
        z.stride(0), B.stride(0), B.stride(1), B.stride(2), y.stride(0),
        RANK=rank, RANK_PAD=_next_pow2(rank), BLOCK_N=_BGMV_BLOCK_N,
    )
    return y


def _sgmv_shrink(x, A, seg_starts, seg_slots, tok_start, num_pairs, max_seg_len, *, block_r):
    num_ranks = A.shape[1]
    if num_pairs is None:
        num_pairs = int(seg_starts[-1])
    z = torch.empty(num_pairs, num_ranks, dtype=torch.float32, device=x.device)
    max_seg_len = _max_seg_len(seg_starts, max_seg_len)
    if max_seg_len == 0 or x.shape[1] == 0:
        return z.zero_()
    block_m = _sgmv_block_m(max_seg_len)
    kernels = _kernels()
    grid = (len(seg_slots), _cdiv(max_seg_len, block_m), _cdiv(num_ranks, block_r))
    kernels.sgmv_shrink[grid](
        x, A, seg_starts, seg_slots, tok_start, z, x.shape[1],
        x.stride(0), A.stride(0), A.stride(1), A.stride(2), z.stride(0),
        RANK=num_ranks, RANK_PAD=block_r, BLOCK_M=block_m, BLOCK_K=_SGMV_BLOCK_K,
        DOT_PRECISION=_dot_precision(x.dtype), DOT_IN_FP32=kernels.dot_in_fp32(x.dtype),
    )
    return z


def _sgmv_expand(z, B, seg_starts, seg_slots, tok_start, y, offset, max_seg_len):
    max_seg_len = _max_seg_len(seg_starts, max_seg_len)
    out, rank = B.shape[1], B.shape[2]
    if max_seg_len == 0 or out == 0:
        return y
    block_m = _sgmv_block_m(max_seg_len)
    grid = (len(seg_slots), _cdiv(max_seg_len, block_m), _cdiv(out, _SGMV_BLOCK_N))
    kernels = _kernels()
    kernels.sgmv_expand[grid](
        z, B, seg_starts, seg_slots, tok_start, y, len(seg_slots), out, offset,
        z.stride(0), B.stride(0), B.stride(1), B.stride(2), y.stride(0),
        RANK=rank, RANK_PAD=max(_next_pow2(rank), _DOT_MIN), BLOCK_M=block_m, BLOCK_N=_SGMV_BLOCK_N,
        DOT_PRECISION=_dot_precision(B.dtype), DOT_IN_FP32=kernels.dot_in_fp32(B.dtype),
    )
    return y


def _cdiv(n, d):
    return -(-n // d)


def _next_pow2(n):
    return 1 << max(n - 1, 0).bit_length()


def _dot_precision(dtype):
    # fp32 tiles multiply in IEEE fp32 (tl.dot would use tf32 on NVIDIA); half types take the default.
    return "ieee" if dtype == torch.float32 else None


def _sgmv_block_m(max_seg_len):
    # Smallest power of two in [16, 64] covering the longest segment: short segments waste fewer rows.
    return min(_SGMV_MAX_BLOCK_M, max(_DOT_MIN, 1 << (max_seg_len - 1).bit_length()))


def _max_seg_len(seg_starts, max_seg_len):
    if max_seg_len is not None:
        return max_seg_len
    if len(seg_starts) < 2:
        return 0
    return int((seg_starts[1:] - seg_starts[:-1]).max())


def _check_rank(rank):
    if rank < 1 or rank & (rank - 1):
        raise ValueError(f"LoRA rank R must be a power of two (pad adapters to one); got {rank}")


def _check_shrink(x, A):
    if x.dim() != 2 or A.dim() != 3 or A.shape[2] != x.shape[1]:
        raise ValueError(f"want x [T, in], A [S, R, in]; got {tuple(x.shape)}, {tuple(A.shape)}")
    _check_rank(A.shape[1])
    if x.dtype != A.dtype:
        raise ValueError(f"x and A dtypes differ: {x.dtype}, {A.dtype}")
    if x.stride(1) != 1 or A.stride(2) != 1:
        raise ValueError("x and A need unit stride over `in`")
    _check_triton()


def _check_shrink_at(x, at):
    if x.dim() != 2 or at.dim() != 3 or at.shape[1] != x.shape[1]:
        raise ValueError(f"want x [T, in], At [S, in, C]; got {tuple(x.shape)}, {tuple(at.shape)}")
    if x.dtype != at.dtype:
        raise ValueError(f"x and At dtypes differ: {x.dtype}, {at.dtype}")
    if x.stride(1) != 1 or at.stride(2) != 1:
        raise ValueError("x needs unit stride over `in` and At over C")
    _check_triton()


def _check_expand_bt(z, bt, y, offset):
    if z.dim() != 2 or bt.dim() != 3 or y.dim() != 2 or z.shape[1] != bt.shape[1]:
        raise ValueError(f"want z [P, R], Bt [S, R, out], y [T, cols]; got {tuple(z.shape)}, "
                         f"{tuple(bt.shape)}, {tuple(y.shape)}")
    _check_expand_common(z, bt, y, offset, out=bt.shape[2])
    if z.stride(1) != 1 or bt.stride(2) != 1 or y.stride(1) != 1:
        raise ValueError("z, Bt and y need unit stride on their last dim")
    _check_triton()


def _check_expand_common(z, B, y, offset, out):
    if not 0 <= offset <= y.shape[1] - out:
        raise ValueError(f"columns {offset}:{offset + out} do not fit y {tuple(y.shape)}")
    if z.dtype != torch.float32 or B.dtype != y.dtype:
        raise ValueError(f"want z float32 and B in y's dtype; got z {z.dtype}, B {B.dtype}, y {y.dtype}")


def _check_expand(z, B, y, offset):
    if z.dim() != 2 or B.dim() != 3 or y.dim() != 2 or z.shape[1] != B.shape[2]:
        raise ValueError(f"want z [P, R], B [S, out, R], y [T, cols]; got {tuple(z.shape)}, "
                         f"{tuple(B.shape)}, {tuple(y.shape)}")
    _check_rank(B.shape[2])
    _check_expand_common(z, B, y, offset, out=B.shape[1])
    if z.stride(1) != 1 or B.stride(2) != 1 or y.stride(1) != 1:
        raise ValueError("z, B and y need unit stride on their last dim")
    _check_triton()


def _check_pairs(tok, slot):
    if tok.dim() != 1 or tok.shape != slot.shape:
        raise ValueError(f"want tok and slot [P]; got {tuple(tok.shape)}, {tuple(slot.shape)}")
    _check_index_dtypes(tok, slot)


def _check_segments(seg_starts, seg_slots, tok_start):
    num_segments = len(seg_slots)
    if seg_slots.dim() != 1 or tok_start.shape != seg_slots.shape or seg_starts.shape != (num_segments + 1,):
        raise ValueError(f"want seg_starts [n + 1], seg_slots [n], tok_start [n]; got "
                         f"{tuple(seg_starts.shape)}, {tuple(seg_slots.shape)}, {tuple(tok_start.shape)}")
    _check_index_dtypes(seg_starts, seg_slots, tok_start)


def _check_index_dtypes(*indices):
    if any(t.dtype not in (torch.int32, torch.int64) for t in indices):
        raise ValueError(f"index tensors must be int32 or int64; got {[t.dtype for t in indices]}")


def _check_triton():
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; the LoRA kernels need it")


def _kernels():
    return _build_kernels(os.environ.get("TRITON_INTERPRET", ""))


@functools.cache
def _build_kernels(triton_interpret_env):
    """Builds the four kernels; the argument only keys the cache (triton.jit reads TRITON_INTERPRET itself).

    Offsets that scale with a slot or token index go through int64: slot * A.stride(0) passes 2**31 with
    ~1,800 resident rank-64 adapters at in = 18944.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def bgmv_shrink(
        x_ptr, a_ptr, tok_ptr, slot_ptr, z_ptr, in_features, num_ranks,
        stride_xt, stride_as, stride_ar, stride_ak, stride_zp,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # A[slot] is read through (stride_ar, stride_ak): [R, in] rows (stride_ak == 1) or the pool's
        # At [in, C] (stride_ar == 1); triton specializes a stride of 1, so either layout loads contiguously.
        pair = tl.program_id(0)
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rank_ok = ranks < num_ranks
        token = tl.load(tok_ptr + pair).to(tl.int64)
        slot = tl.load(slot_ptr + pair).to(tl.int64)
        x_row = x_ptr + token * stride_xt
        a_rows = a_ptr + slot * stride_as + ranks[:, None] * stride_ar  # [BLOCK_R, 1]
        acc = tl.zeros([BLOCK_R], tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < in_features
            x = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            a_ok = rank_ok[:, None] & k_ok[None, :]
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=a_ok, other=0.0).to(tl.float32)  # [BR, BK]
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(z_ptr + pair * stride_zp + ranks, acc, mask=rank_ok)

    @triton.jit
    def bgmv_expand(
        z_ptr, b_ptr, tok_ptr, slot_ptr, y_ptr, num_pairs, out_features, offset,
        stride_zp, stride_bs, stride_bo, stride_br, stride_yt,
        RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # B[slot] is read through (stride_bo, stride_br): [out, R] (stride_br == 1) or the pool's Bt [R, out]
        # (stride_bo == 1). RANK_PAD: RANK rounded up to a power of two (tl.arange), the rest masked.
        pair = tl.program_id(0)
        token = tl.load(tok_ptr + pair)
        previous = tl.load(tok_ptr + pair - 1, mask=pair > 0, other=-1)
        if previous == token:
            return  # not the first pair of its token: that one adds this pair's delta too
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        ranks = tl.arange(0, RANK_PAD)
        rank_ok = ranks < RANK
        acc = tl.zeros([BLOCK_N], tl.float32)
        member = pair
        member_token = token
        while member_token == token:  # the run of adjacent pairs of this token (a stack)
            slot = tl.load(slot_ptr + member).to(tl.int64)
            z = tl.load(z_ptr + member * stride_zp + ranks, mask=rank_ok, other=0.0)  # [RANK_PAD] fp32
            b_offs = slot * stride_bs + cols[:, None] * stride_bo + ranks[None, :] * stride_br
            b_ok = col_ok[:, None] & rank_ok[None, :]
            b = tl.load(b_ptr + b_offs, mask=b_ok, other=0.0).to(tl.float32)  # [BLOCK_N, RANK_PAD]
            acc += tl.sum(b * z[None, :], axis=1)
            member += 1
            member_token = tl.load(tok_ptr + member, mask=member < num_pairs, other=-1)
        y_ptrs = y_ptr + token.to(tl.int64) * stride_yt + offset + cols
        y = tl.load(y_ptrs, mask=col_ok, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=col_ok)

    @triton.jit
    def sgmv_shrink(
        x_ptr, a_ptr, seg_starts_ptr, seg_slots_ptr, tok_start_ptr, z_ptr, in_features,
        stride_xt, stride_as, stride_ar, stride_ak, stride_zp,
        RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        # Columns RANK_PAD * program_id(2) + [0, RANK_PAD) of z, masked at RANK (z's width); A as in
        # bgmv_shrink.
        segment = tl.program_id(0)
        seg_start = tl.load(seg_starts_ptr + segment)
        seg_len = tl.load(seg_starts_ptr + segment + 1) - seg_start
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # within the segment
        if tl.program_id(1) * BLOCK_M >= seg_len:
            return  # the grid covers the longest segment; this one is shorter
        row_ok = rows < seg_len
        slot = tl.load(seg_slots_ptr + segment).to(tl.int64)
        tokens = tl.load(tok_start_ptr + segment).to(tl.int64) + rows
        ranks = tl.program_id(2) * RANK_PAD + tl.arange(0, RANK_PAD)
        rank_ok = ranks < RANK
        x_rows = x_ptr + tokens[:, None] * stride_xt  # [BLOCK_M, 1]
        a_cols = a_ptr + slot * stride_as + ranks[None, :] * stride_ar  # [1, RANK_PAD]: A[slot] transposed
        acc = tl.zeros([BLOCK_M, RANK_PAD], tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < in_features
            x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_cols + ks[:, None] * stride_ak, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                x, a = x.to(tl.float32), a.to(tl.float32)
            acc += tl.dot(x, a, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, RANK_PAD]
        z_ptrs = z_ptr + (seg_start + rows)[:, None].to(tl.int64) * stride_zp + ranks[None, :]
        tl.store(z_ptrs, acc, mask=row_ok[:, None] & rank_ok[None, :])

    @triton.jit
    def sgmv_expand(
        z_ptr, b_ptr, seg_starts_ptr, seg_slots_ptr, tok_start_ptr, y_ptr, num_segments, out_features,
        offset, stride_zp, stride_bs, stride_bo, stride_br, stride_yt,
        RANK: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        segment = tl.program_id(0)
        first_token = tl.load(tok_start_ptr + segment)
        previous = tl.load(tok_start_ptr + segment - 1, mask=segment > 0, other=-1)
        if previous == first_token:
            return  # not the first segment of its stack group: that one adds this segment too
        seg_len = tl.load(seg_starts_ptr + segment + 1) - tl.load(seg_starts_ptr + segment)
        if tl.program_id(1) * BLOCK_M >= seg_len:
            return
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seg_len
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        ranks = tl.arange(0, RANK_PAD)
        rank_ok = ranks < RANK
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        member = segment
        member_token = first_token
        while member_token == first_token:  # the stack group: equal tok_start and length by contract
            member_start = tl.load(seg_starts_ptr + member)
            slot = tl.load(seg_slots_ptr + member).to(tl.int64)
            z_ptrs = z_ptr + (member_start + rows)[:, None].to(tl.int64) * stride_zp + ranks[None, :]
            z = tl.load(z_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)  # [BLOCK_M, RANK_PAD]
            b_ptrs = b_ptr + slot * stride_bs + cols[None, :] * stride_bo + ranks[:, None] * stride_br  # B^T
            b = tl.load(b_ptrs, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)  # [RANK_PAD, BLOCK_N]
            z = z.to(b.dtype)
            if DOT_IN_FP32:
                z, b = z.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(z, b, input_precision=DOT_PRECISION)
            member += 1
            member_token = tl.load(tok_start_ptr + member, mask=member < num_segments, other=-1)
        tokens = first_token.to(tl.int64) + rows
        y_ptrs = y_ptr + tokens[:, None] * stride_yt + offset + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        y = tl.load(y_ptrs, mask=tile_ok, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=tile_ok)

    interpreted = triton.knobs.runtime.interpret

    def dot_in_fp32(dtype):
        # Hazard: triton's interpreter runs tl.dot as np.matmul over the raw uint16 storage of bf16 tiles,
        # which gives garbage, so interpreted bf16 tiles are widened first. That keeps the arithmetic of
        # the compiled path: bf16 products are exact in fp32 and the MMA accumulates in fp32.
        return interpreted and dtype == torch.bfloat16

    return SimpleNamespace(
        bgmv_shrink=bgmv_shrink, bgmv_expand=bgmv_expand, sgmv_shrink=sgmv_shrink, sgmv_expand=sgmv_expand,
        dot_in_fp32=dot_in_fp32,
    )
