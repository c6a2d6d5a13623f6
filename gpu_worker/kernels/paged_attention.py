"""Decode attention over the paged KV cache: one new query token per row.

Cache layout (engine contract), per layer: `k_cache`, `v_cache`: [num_blocks, block_size, num_kv_heads,
head_dim]. Token p of row i sits in block `block_tables[i, p // block_size]` at slot `p % block_size`.
Query head h reads kv head `h // (num_heads // num_kv_heads)` (GQA).

Preconditions of every path (not checked on the hot path): `1 <= context_lens[i] <= max_blocks * block_size`,
and every block id in a row's first `ceil(context_lens[i] / block_size)` table entries is a valid block.
Hazard: the torch path reads whole blocks and masks the scores, so stale slots past a row's context must hold
finite values (a NaN there turns into NaN output through 0 * NaN); allocate the cache with `torch.zeros`.
The Triton path never loads those slots.

Triton is imported on first use of the Triton path, not at module import, because `triton.jit` fixes
interpreter vs compiled mode from `TRITON_INTERPRET` when the kernel is decorated; the built kernel is cached
per value of that variable.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import threading

import torch
import torch.nn.functional as F

from gpu_worker.kernels import cpu_ops

HAS_TRITON = importlib.util.find_spec("triton") is not None

TRITON_HEAD_DIMS = (32, 64, 128)
TRITON_BLOCK_SIZES = (16, 32)
_LOG2_E = 1.4426950408889634


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len=None):
    """The native CPU kernel on CPU tensors (it falls back to torch when it cannot build or run), Triton on
    CUDA tensors when triton is installed and the shape is supported; torch otherwise.

    Same semantics and shapes as `paged_decode_attention_torch`.
    """
    args = (q, k_cache, v_cache, block_tables, context_lens, scale)
    if q.device.type == "cpu":
        return cpu_ops.cpu_paged_decode_attention(*args, max_context_len=max_context_len)
    if HAS_TRITON and q.is_cuda and _triton_supports(k_cache):
        return paged_decode_attention_triton(*args)
    return paged_decode_attention_torch(*args, max_context_len=max_context_len)


def paged_decode_attention_torch(
    q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len=None
):
    """Vectorized torch path (the CPU decode hot path).

    Semantics, for each row i and head h, with n = context_lens[i], g = num_heads // num_kv_heads:
        keys[p]   = k_cache[block_tables[i, p // block_size], p % block_size, h // g]   for p < n
        values[p] = v_cache[...same index...]
        out[i, h] = softmax(keys @ q[i, h] * scale) @ values

    Args:
        q: [B, H, D], the new token's query (its k/v already written to the cache).
        k_cache, v_cache: [num_blocks, block_size, Hkv, D], same dtype as q; H % Hkv == 0.
        block_tables: [B, max_blocks] int32; entries past a row's last block may be any valid block id.
        context_lens: [B] int32, valid tokens per row including the new one.
        scale: softmax scale, usually D ** -0.5.
        max_context_len: max(context_lens) if the caller already knows it (saves a device sync on CUDA).
    Returns:
        out: [B, H, D], dtype of q. SDPA accumulates in fp32 for half types.
    """
    _check_args(q, k_cache, v_cache, block_tables, context_lens)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1:3]
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    num_blocks = -(-max_context_len // block_size)
    span = num_blocks * block_size
    # Whole blocks, not sliced to max_context_len: the view stays dense and the mask covers the tail.
    block_ids = block_tables[:, :num_blocks].reshape(-1)
    keys = _gather_blocks(k_cache, block_ids, batch, span, "keys")
    values = _gather_blocks(v_cache, block_ids, batch, span, "values")
    valid = torch.arange(span, device=q.device) < context_lens[:, None]  # [B, span]
    # GQA without repeating kv: the g query heads of one kv head act as g query positions of that head.
    queries = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    mask = valid[:, None, None, :]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def _gather_blocks(cache, block_ids, batch, span, role):
    # cache: [num_blocks, block_size, Hkv, D] -> [B, Hkv, span, D], a transposed view of one dense copy;
    # SDPA's CPU kernel reads strided k/v, and a .contiguous() here measured slower.
    shape = (len(block_ids), *cache.shape[1:])
    out = _cpu_scratch.take(role, shape, cache.dtype) if cache.device.type == "cpu" else None
    gathered = torch.index_select(cache, 0, block_ids, out=out)
    return gathered.view(batch, span, *cache.shape[2:]).transpose(1, 2)


class _CpuScratch(threading.local):
    """Gather buffers kept between calls, one set per thread, grown to the largest call seen.

    Why: glibc hands a freed multi-MB tensor back to the OS, so a fresh one costs a page fault per 4 KiB;
    at B=64, ctx 96, Hkv=2, D=64, fp32 that made the call 4x slower (2.8 ms against 0.7 ms). CUDA needs none
    of this (caching allocator). Inference only: the next call overwrites what autograd would have saved.
    """

    def __init__(self):
        self.buffers = {}

    def take(self, role, shape, dtype):
        numel = math.prod(shape)
        buffer = self.buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            # A normal tensor even when first taken under inference_mode: an inference tensor could not be
            # written by a later call made outside it.
            with torch.inference_mode(False):
                buffer = self.buffers[(role, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


_cpu_scratch = _CpuScratch()


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Triton path, same semantics and shapes as `paged_decode_attention_torch`.

    One program per (row, kv head) serves the g query heads of that kv head, so each cache block is loaded
    once per group; it walks the row's blocks with an online softmax in fp32. Needs D in TRITON_HEAD_DIMS,
    block_size in TRITON_BLOCK_SIZES and unit stride on the last dim of q and the caches.
    """
    _check_args(q, k_cache, v_cache, block_tables, context_lens)
    _check_triton_args(q, k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    kernel = _decode_kernel(os.environ.get("TRITON_INTERPRET", ""))
    kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale * _LOG2_E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=1 << (group - 1).bit_length(), BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
    )
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    """fp32 loop reference for tests, per row and head, from the semantics. Returns fp32 [B, H, D]."""
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i in range(q.shape[0]):
        positions = torch.arange(int(context_lens[i]), device=q.device)
        blocks = block_tables[i, positions // block_size].long()
        keys = k_cache[blocks, positions % block_size].float()  # [n, Hkv, D]
        values = v_cache[blocks, positions % block_size].float()
        for h in range(q.shape[1]):
            scores = keys[:, h // group] @ q[i, h].float() * scale
            out[i, h] = torch.softmax(scores, dim=0) @ values[:, h // group]
    return out


def _check_args(q, k_cache, v_cache, block_tables, context_lens):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"want q [B, H, D], caches [N, block, Hkv, D]; got {q.shape}, {k_cache.shape}, "
                         f"{v_cache.shape}")
    batch, num_heads, head_dim = q.shape
    if k_cache.shape[3] != head_dim or num_heads % k_cache.shape[2] != 0:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)} (D, H % Hkv)")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"want block_tables [{batch}, max_blocks], context_lens [{batch}]; "
                         f"got {tuple(block_tables.shape)}, {tuple(context_lens.shape)}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")


def _triton_supports(k_cache):
    return k_cache.shape[3] in TRITON_HEAD_DIMS and k_cache.shape[1] in TRITON_BLOCK_SIZES


def _check_triton_args(q, k_cache, v_cache):
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use paged_decode_attention_torch")
    if not _triton_supports(k_cache):
        raise ValueError(
            f"triton paged attention needs head_dim in {TRITON_HEAD_DIMS} and block_size in "
            f"{TRITON_BLOCK_SIZES}; got head_dim {k_cache.shape[3]}, block_size {k_cache.shape[1]}"
        )
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("triton paged attention needs unit last-dim strides and equal k/v cache strides")


@functools.cache
def _decode_kernel(triton_interpret_env):
    """Builds the kernel; the argument only keys the cache (triton.jit reads TRITON_INTERPRET itself)."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale_log2,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        members = tl.arange(0, GROUP_PAD)  # query heads of this kv head, padded to a power of 2
        head_ok = members < GROUP
        heads = kv_head * GROUP + members
        dims = tl.arange(0, HEAD_DIM)
        slots = tl.arange(0, BLOCK_SIZE)

        # Scores in log2 units (scale folded with log2(e)) so the softmax uses exp2.
        q_offs = row * stride_qb + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_offs, mask=head_ok[:, None], other=0.0).to(tl.float32) * scale_log2  # [G, D]
        context_len = tl.load(context_lens_ptr + row)
        row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for block in range(0, tl.cdiv(context_len, BLOCK_SIZE)):
            # int64: block_id * stride_kb overflows int32 once the cache passes 2**31 elements.
            block_id = tl.load(block_tables_ptr + row * stride_tb + block).to(tl.int64)
            slot_ok = block * BLOCK_SIZE + slots < context_len
            kv_offs = block_id * stride_kb + slots[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
            keys = tl.load(k_cache_ptr + kv_offs, mask=slot_ok[:, None], other=0.0).to(tl.float32)  # [S, D]
            values = tl.load(v_cache_ptr + kv_offs, mask=slot_ok[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)  # [G, S]
            scores = tl.where(slot_ok[None, :], scores, float("-inf"))
            # The first block always has a valid slot (context_len >= 1), so new_max is finite and
            # exp2(-inf - new_max) = 0 drops the empty initial state.
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            probs = tl.exp2(scores - new_max[:, None])
            rescale = tl.exp2(row_max - new_max)
            denom = denom * rescale + tl.sum(probs, axis=1)
            acc = acc * rescale[:, None] + tl.sum(probs[:, :, None] * values[None, :, :], axis=1)
            row_max = new_max

        out_offs = row * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        out = acc / denom[:, None]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])

    return paged_decode_kernel
