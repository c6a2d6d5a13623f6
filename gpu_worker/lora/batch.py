"""Per-step LoRA metadata and the torch (CPU) path that adds each row's adapter deltas.

A step's rows carry adapter stacks; we flatten them to (token, slot) pairs: token t with stack (s0, s1)
gives pairs (t, s0) and (t, s1). Pairs are grouped by slot once per step and reused by every layer:

  BGMV-style (many small groups, e.g. decode rows of 16 adapters): the groups are padded to the same size G
  and run as two batched matmuls, `z = x[gather] @ A[slots]^T` ([n, G, r]) then `out = z @ B[slots]^T`,
  added back with one index_add. Padding rows point at an all-zero input row, so they add exactly 0.
  SGMV-style (few large groups, e.g. prefill chunks): one matmul pair per group, on a slice of x when the
  group's tokens are contiguous (rows of one sequence are), so no per-token weight is ever gathered.

For `y = W x + sum_i B_i A_i x` the order of additions differs from merging adapters into W one by one only
by float rounding.
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
    ranks: dict[str, int]  # per PEFT module: the largest rank among this step's adapters (0: none target it)
    groups: list[Group]  # SGMV path
    # BGMV path (None when the SGMV path is used):
    slot_ids: torch.Tensor | None = None  # [n] slots of the padded groups (None: slots 0..n-1, a view)
    num_slots: int = 0
    gather: torch.Tensor | None = None  # [n * G] token rows, num_tokens for padding (the zero row)
    scatter: torch.Tensor | None = None  # gather with padding sent to row 0 (it adds exact zeros there)
    group_size: int = 0

    @property
    def bgmv(self) -> bool:
        return self.gather is not None


def build_lora_batch(token_slots: list[tuple[int, ...]], ranks: dict[str, int],
                     device: torch.device) -> LoRABatch | None:
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
    dense = slots[-1] + 1 <= 2 * len(slots)  # run slots 0..max as a view (some groups empty) or gather
    num_groups = slots[-1] + 1 if dense else len(slots)
    batch = LoRABatch(num_tokens=len(token_slots), ranks=ranks, groups=[])
    if len(slots) >= 3 and num_groups * group_size <= 2 * num_pairs:
        gather = torch.full((num_groups, group_size), len(token_slots), dtype=torch.int64)
        for i, slot in enumerate(range(num_groups) if dense else slots):
            rows = by_slot.get(slot, [])
            gather[i, : len(rows)] = torch.tensor(rows, dtype=torch.int64)
        gather = gather.view(-1)
        scatter = gather.masked_fill(gather == len(token_slots), 0)
        batch.gather, batch.scatter = gather.to(device), scatter.to(device)
        batch.group_size, batch.num_slots = group_size, num_groups
        batch.slot_ids = None if dense else torch.tensor(slots, dtype=torch.int64, device=device)
        return batch
    for slot in slots:
        rows = by_slot[slot]
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        tokens = None if contiguous else torch.tensor(rows, dtype=torch.int64, device=device)
        batch.groups.append(Group(slot, tokens, rows[0], rows[-1] + 1))
    return batch


def add_lora(batch: LoRABatch, x: torch.Tensor, y: torch.Tensor, subs: list[tuple[str, int, int]],
             weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """y[:, off:off+size] += sum over the token's adapters of B[slot] @ (A[slot] @ x), for each sub-module.

    x: [T, in]; y: [T, out_total] (a fused projection's output); subs: (module, offset, size) slices of y;
    weights[module] = (A [S, R, in], B [S, size, R]) slot-stacked, scale folded into B.
    """
    active = [(m, off, size, batch.ranks[m]) for m, off, size in subs if batch.ranks.get(m, 0) > 0]
    if not active:
        return
    if batch.bgmv:
        _bgmv(batch, x, y, active, weights)
    else:
        _sgmv(batch, x, y, active, weights)


def _bgmv(batch, x, y, active, weights):
    n, g = batch.num_slots, batch.group_size
    x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row T is the zero row padding points at
    xg = x_ext.index_select(0, batch.gather).view(n, g, -1)  # [n, G, in]
    for module, off, size, r in active:
        a, b = weights[module]
        a, b = (a[:n, :r], b[:n, :, :r]) if batch.slot_ids is None else (
            a[:, :r].index_select(0, batch.slot_ids), b[:, :, :r].index_select(0, batch.slot_ids))
        z = torch.bmm(xg, a.transpose(1, 2))  # [n, G, r]
        out = torch.bmm(z, b.transpose(1, 2))  # [n, G, size]
        y[:, off:off + size].index_add_(0, batch.scatter, out.view(n * g, size))


def _sgmv(batch, x, y, active, weights):
    for group in batch.groups:
        xs = x[group.start:group.end] if group.tokens is None else x.index_select(0, group.tokens)
        for module, off, size, r in active:
            a, b = weights[module]
            delta = (xs @ a[group.slot, :r].T) @ b[group.slot, :, :r].T
            if group.tokens is None:
                y[group.start:group.end, off:off + size] += delta
            else:
                y[:, off:off + size].index_add_(0, group.tokens, delta)
