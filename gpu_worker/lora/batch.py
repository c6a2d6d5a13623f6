"""Per-step LoRA metadata and the torch (CPU) path that adds each row's adapter deltas.

Weights per layer and fused projection (qkv, o, gate_up, down), slot-stacked and stored pre-transposed so
that every matmul below reads contiguous operands (a transposed view makes CPU bmm ~10x slower):
    At [S, in, n_sub * R]     the sub-modules' A^T side by side (q | k | v for qkv): one shrink per module
    Bt[j] [S, R, size_j]      one expand per sub-module j into its slice of the fused output
with R the pool's rank width (adapters of lower rank are zero-padded: padding adds exactly 0) and the
adapter's scale folded into B. For token t, each slot s of its stack and each sub-module j:
    z = x[t] @ At[s];  y[t, off_j:off_j + size_j] += z[j*R:(j+1)*R] @ Bt[j][s]
Decode is bound by reading the adapters' weights (each adapter serves only a few rows), which is why the
expands are not one block-diagonal matmul: its zero blocks would be read too.

A step's (token, slot) pairs are grouped by slot once per step and reused by every layer:
  BGMV-style (many small groups, e.g. decode rows): groups padded to the same size G and run as two batched
  matmuls; padding rows gather an all-zero input row, so they add exact zeros. When the groups are already
  equal, contiguous token ranges in slot order (decode rows are sorted by stack), x and y are just viewed
  as [n, G, *] with no gather or scatter.
  SGMV-style (few large groups, e.g. prefill chunks): one matmul pair per group on a contiguous row slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Group:
    slot: int
    tokens: torch.Tensor | None  # [g] int64 token rows, or None when contiguous
    start: int
    end: int  # contiguous range [start, end) when tokens is None


@dataclass
class LoRABatch:
    """Step metadata shared by every layer and module."""

    num_tokens: int
    groups: list[Group]  # SGMV path
    # BGMV path (num_groups == 0 when the SGMV path is used):
    num_groups: int = 0  # n padded groups
    group_size: int = 0  # G
    slot_ids: torch.Tensor | None = None  # [n] slots of the groups; None: slots 0..n-1 (a view, no copy)
    gather: torch.Tensor | None = None  # [n * G] token rows, num_tokens for padding; None: identity layout
    scatter: torch.Tensor | None = None  # gather with padding sent to row 0 (it adds exact zeros there)

    @property
    def bgmv(self) -> bool:
        return self.num_groups > 0


def build_lora_batch(token_slots: list[tuple[int, ...]], device: torch.device) -> LoRABatch | None:
    """token_slots[t] is the slot stack of token t (empty: no adapter). None when no token has one."""
    by_slot: dict[int, list[int]] = {}
    for t, stack in enumerate(token_slots):
        for slot in stack:
            by_slot.setdefault(slot, []).append(t)
    if not by_slot:
        return None
    num_pairs = sum(len(v) for v in by_slot.values())
    group_size = max(len(v) for v in by_slot.values())
    slots = sorted(by_slot)
    dense = slots[-1] + 1 <= 2 * len(slots)  # slots 0..max as a view (some groups empty), else gathered
    order = list(range(slots[-1] + 1)) if dense else slots
    batch = LoRABatch(num_tokens=len(token_slots), groups=[])
    if len(slots) >= 3 and len(order) * group_size <= 2 * num_pairs:
        batch.num_groups, batch.group_size = len(order), group_size
        batch.slot_ids = None if dense else torch.tensor(slots, dtype=torch.int64, device=device)
        pad = len(token_slots)
        flat = [t for s in order for t in by_slot.get(s, []) + [pad] * (group_size - len(by_slot.get(s, [])))]
        if flat != list(range(len(token_slots))):
            gather = torch.tensor(flat, dtype=torch.int64)
            batch.gather = gather.to(device)
            batch.scatter = gather.masked_fill(gather == len(token_slots), 0).to(device)
        return batch
    for slot in slots:
        rows = by_slot[slot]
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        tokens = None if contiguous else torch.tensor(rows, dtype=torch.int64, device=device)
        batch.groups.append(Group(slot, tokens, rows[0], rows[-1] + 1))
    return batch


def add_lora(batch: LoRABatch, x: torch.Tensor, y: torch.Tensor, at: torch.Tensor,
             bts: list[torch.Tensor]) -> None:
    """y[t] += sum over the slots s of token t's stack of the LoRA delta of slot s, in place.

    x: [T, in]; y: [T, out_total]; at: [S, in, n_sub * R]; bts[j]: [S, R, size_j], sizes summing to out_total.
    """
    if batch.bgmv:
        _bgmv(batch, x, y, at, bts)
    else:
        _sgmv(batch, x, y, at, bts)


def _bgmv(batch: LoRABatch, x, y, at, bts):
    n, g = batch.num_groups, batch.group_size
    pick = (lambda w: w[:n]) if batch.slot_ids is None else (lambda w: w.index_select(0, batch.slot_ids))
    if batch.gather is None:  # identity layout: group i is tokens [i*G, (i+1)*G)
        xg = x.view(n, g, -1)
    else:
        x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row T: the zero row that padding gathers
        xg = x_ext.index_select(0, batch.gather).view(n, g, -1)
    z = torch.bmm(xg, pick(at))  # [n, G, n_sub * R]
    rank = bts[0].shape[1]
    if batch.gather is None:
        # Accumulate straight into y's slices: no [T, out] temporary to write and read back.
        offset = 0
        for j, bt in enumerate(bts):
            size = bt.shape[-1]
            y[:, offset:offset + size].view(n, g, size).baddbmm_(_sub(z, j, rank), pick(bt))
            offset += size
        return
    outs = [torch.bmm(_sub(z, j, rank), pick(bt)) for j, bt in enumerate(bts)]  # [n, G, size_j]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    y.index_add_(0, batch.scatter, out.view(n * g, -1))


def _sub(z: torch.Tensor, j: int, rank: int) -> torch.Tensor:
    # Sub-module j's columns of the fused shrink, contiguous for the fast bmm path (a tiny copy).
    return z if z.shape[-1] == rank else z[..., j * rank:(j + 1) * rank].contiguous()


def _sgmv(batch: LoRABatch, x, y, at, bts):
    rank = bts[0].shape[1]
    for group in batch.groups:
        s = group.slot
        contiguous = group.tokens is None
        xs = x[group.start:group.end] if contiguous else x.index_select(0, group.tokens)
        z = xs @ at[s]
        offset = 0
        for j, bt in enumerate(bts):
            size = bt.shape[-1]
            if contiguous:
                y[group.start:group.end, offset:offset + size].addmm_(z[:, j * rank:(j + 1) * rank], bt[s])
            else:
                y[:, offset:offset + size].index_add_(0, group.tokens, z[:, j * rank:(j + 1) * rank] @ bt[s])
            offset += size
