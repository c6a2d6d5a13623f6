"""Attention over the paged KV cache for a mixed step (chunked prefills, then decodes).

Token layout of a step (flattened, T tokens): all prefill chunks first, one segment per sequence, then one
token per decoding sequence. Each layer writes its new K/V into the cache through `slot_mapping` and then
attends over the cache, so a chunk sees the keys of earlier chunks and of cached prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_worker.kernels.paged_attention import paged_decode_attention


@dataclass
class PrefillSegment:
    start: int  # offset of the chunk's first token in the step's flattened tokens
    length: int  # query tokens in this chunk
    context_len: int  # tokens of the sequence in the cache after this step (cached prefix + chunk)
    block_table: torch.Tensor  # [ceil(context_len / block_size)] int64 block ids


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each token
    prefills: list[PrefillSegment]
    num_prefill_tokens: int
    decode_block_tables: torch.Tensor | None  # [Bd, max_blocks] int32
    decode_context_lens: torch.Tensor | None  # [Bd] int32, including the token of this step


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k_cache: [num_blocks, block_size, Hkv, D]; k: [T, Hkv, D]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, Hkv, D] for this step's tokens; returns [T, H, D]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if not meta.prefills:  # a decode-only step: the kernel's output is the whole result
        return paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                      scale)
    out = torch.empty_like(q)
    for seg in meta.prefills:
        rows = slice(seg.start, seg.start + seg.length)
        out[rows] = _prefill_segment(q[rows], k[rows], v[rows], k_cache, v_cache, seg, scale)
    p = meta.num_prefill_tokens
    if p < q.shape[0]:
        out[p:] = paged_decode_attention(q[p:], k_cache, v_cache, meta.decode_block_tables,
                                         meta.decode_context_lens, scale)
    return out


def _prefill_segment(q, k, v, k_cache, v_cache, seg: PrefillSegment, scale: float) -> torch.Tensor:
    if seg.context_len == seg.length:  # nothing cached before the chunk: attend to its own K/V
        return _sdpa(q, k, v, scale, mask=None)
    keys = k_cache[seg.block_table].flatten(0, 1)[: seg.context_len]  # [L, Hkv, D]
    values = v_cache[seg.block_table].flatten(0, 1)[: seg.context_len]
    first_pos = seg.context_len - seg.length
    q_pos = torch.arange(first_pos, seg.context_len, device=q.device)
    k_pos = torch.arange(seg.context_len, device=q.device)
    return _sdpa(q, keys, values, scale, mask=k_pos[None, :] <= q_pos[:, None])


def _sdpa(q, k, v, scale, mask):
    # [L, H, D] -> [1, H, L, D]; causal when no explicit mask (query i sees keys 0..i)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=qh.shape[1] != kh.shape[1])
    return out.squeeze(0).transpose(0, 1)
