"""Per-step LoRA metadata and the two paths that add each row's adapter deltas: torch (CPU) and Triton (CUDA).

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

Triton path (LoRAConfig.kernel; "auto" picks it on CUDA): the kernels of gpu_worker/kernels/lora.py read
these same tensors in place (At and Bt through transposed views, no per-step copy), z in fp32:
    z = shrink(x, At)                              one launch per fused module, z [P, n_sub * R]
    y[:, off_j:off_j + size_j] += expand(z[:, j*R:(j+1)*R], Bt[j])   one launch per sub-module j
over the step's (token, slot) pairs. BGMV when the torch path above would use its BGMV layout (decode-like
steps): the pairs one by one in token order, a token's stack adjacent (the expand sums a stack in fp32 and
writes each row once). SGMV otherwise (prefill-like): runs of consecutive tokens with the same stack, one
segment per (run, slot), a run's segments adjacent. The int32 index tensors are built once per step (one
host-to-device copy, eagerly by build_lora_batch(kernel="triton") or on the first layer's use) and shared
by every layer and module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpu_worker.kernels import lora as kernels

KERNELS = ("auto", "torch", "triton")  # LoRAConfig.kernel


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
    # Triton path: the step's stacks, kept to build its index tensors once, on first use.
    token_slots: list[tuple[int, ...]] = field(default_factory=list, repr=False)
    device: torch.device | None = None
    _triton: TritonIndices | None = field(default=None, repr=False)

    @property
    def bgmv(self) -> bool:
        return self.num_groups > 0

    def triton_indices(self) -> TritonIndices:
        """The Triton kernels' index tensors of this step, built on the first call (one per step)."""
        if self._triton is None:
            self._triton = _triton_indices(self.token_slots, self.bgmv, self.device)
        return self._triton


@dataclass
class TritonIndices:
    """int32 device tensors of the Triton path for one step; read by every layer and module."""

    bgmv: bool
    num_pairs: int
    # BGMV: [P] token row and slot of each (token, slot) pair, in token order (a token's stack adjacent).
    tok: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    # SGMV: segment i is the pairs seg_starts[i]:seg_starts[i + 1], all slot seg_slots[i], reading tokens
    # tok_start[i] onward; the segments of one run of equal stacks are adjacent and cover the same tokens.
    seg_starts: torch.Tensor | None = None  # [n + 1]
    seg_slots: torch.Tensor | None = None  # [n]
    tok_start: torch.Tensor | None = None  # [n]
    max_seg_len: int = 0


def _triton_indices(token_slots: list[tuple[int, ...]], bgmv: bool, device) -> TritonIndices:
    if bgmv:
        tok = [t for t, stack in enumerate(token_slots) for _ in stack]
        slot = [s for stack in token_slots for s in stack]
        both = torch.tensor([tok, slot], dtype=torch.int32).to(device)  # one copy; rows are contiguous
        return TritonIndices(bgmv=True, num_pairs=len(tok), tok=both[0], slot=both[1])
    seg_starts, seg_slots, tok_start, max_len = [0], [], [], 0
    t, num_tokens = 0, len(token_slots)
    while t < num_tokens:
        stack, end = token_slots[t], t + 1
        while end < num_tokens and token_slots[end] == stack:
            end += 1
        for s in stack:  # a run of equal stacks: one segment per slot, adjacent, same tokens
            seg_starts.append(seg_starts[-1] + end - t)
            seg_slots.append(s)
            tok_start.append(t)
        if stack:
            max_len = max(max_len, end - t)
        t = end
    n = len(seg_slots)
    flat = torch.tensor(seg_starts + seg_slots + tok_start, dtype=torch.int32).to(device)
    return TritonIndices(bgmv=False, num_pairs=seg_starts[-1], seg_starts=flat[:n + 1],
                         seg_slots=flat[n + 1:2 * n + 1], tok_start=flat[2 * n + 1:], max_seg_len=max_len)


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The path that LoRAConfig.kernel selects on `device`: "torch" or "triton".

    "auto": Triton on CUDA when triton is importable and TRITON_INTERPRET is unset (interpreted kernels on a
    GPU would be far slower than torch), torch otherwise. "triton": forced; raises ValueError where it
    cannot run (triton missing, or a non-CUDA device without TRITON_INTERPRET=1).
    """
    if kernel not in KERNELS:
        raise ValueError(f"LoRAConfig.kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        usable = device.type == "cuda" and kernels.HAS_TRITON and not kernels.triton_interpreted()
        return "triton" if usable else "torch"
    if kernel == "triton":
        reason = kernels.triton_unavailable(device.type)
        if reason is not None:
            raise ValueError(f"LoRAConfig.kernel='triton' cannot run on device {str(device)!r}: {reason}; "
                             "use kernel='auto' or 'torch'")
    return kernel


def build_lora_batch(token_slots: list[tuple[int, ...]], device: torch.device,
                     kernel: str = "torch") -> LoRABatch | None:
    """token_slots[t] is the slot stack of token t (empty: no adapter). None when no token has one.

    kernel="triton" builds the Triton index tensors now and not the torch path's tensors (a torch-path batch
    builds its Triton indices on first use, for tests that run both paths on one batch).
    """
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
    batch = LoRABatch(num_tokens=len(token_slots), groups=[], token_slots=token_slots, device=device)
    bgmv = len(slots) >= 3 and len(order) * group_size <= 2 * num_pairs
    if bgmv:
        batch.num_groups, batch.group_size = len(order), group_size
    if kernel == "triton":  # its own index tensors only: the torch path's below would go unused
        batch.triton_indices()
        return batch
    if bgmv:
        batch.slot_ids = None if dense else torch.tensor(slots, dtype=torch.int64, device=device)
        pad = len(token_slots)
        flat = [t for s in order for t in by_slot.get(s, []) + [pad] * (group_size - len(by_slot.get(s, [])))]
        if flat != list(range(len(token_slots))):
            gather = torch.tensor(flat, dtype=torch.int64)
            batch.gather = gather.to(device)
            batch.scatter = gather.masked_fill(gather == len(token_slots), 0).to(device)
    else:
        for slot in slots:
            rows = by_slot[slot]
            contiguous = rows[-1] - rows[0] + 1 == len(rows)
            tokens = None if contiguous else torch.tensor(rows, dtype=torch.int64, device=device)
            batch.groups.append(Group(slot, tokens, rows[0], rows[-1] + 1))
    return batch


def add_lora(batch: LoRABatch, x: torch.Tensor, y: torch.Tensor, at: torch.Tensor,
             bts: list[torch.Tensor], kernel: str = "torch") -> None:
    """y[t] += sum over the slots s of token t's stack of the LoRA delta of slot s, in place.

    x: [T, in]; y: [T, out_total]; at: [S, in, n_sub * R]; bts[j]: [S, R, size_j], sizes summing to out_total.
    kernel: "torch" or "triton" (a resolve_kernel result).
    """
    if kernel == "triton":
        indices = batch.triton_indices()
        (_triton_bgmv if indices.bgmv else _triton_sgmv)(indices, x, y, at, bts)
    elif batch.bgmv:
        _bgmv(batch, x, y, at, bts)
    else:
        _sgmv(batch, x, y, at, bts)


def _triton_bgmv(ix: TritonIndices, x, y, at, bts):
    z = kernels.bgmv_shrink_at(x, at, ix.tok, ix.slot)  # [P, n_sub * R] float32
    rank, offset = bts[0].shape[1], 0
    for j, bt in enumerate(bts):
        kernels.bgmv_expand_bt(z[:, j * rank:(j + 1) * rank], bt, ix.tok, ix.slot, y, offset)
        offset += bt.shape[-1]


def _triton_sgmv(ix: TritonIndices, x, y, at, bts):
    segments = ix.seg_starts, ix.seg_slots, ix.tok_start
    z = kernels.sgmv_shrink_at(x, at, *segments, num_pairs=ix.num_pairs, max_seg_len=ix.max_seg_len)
    rank, offset = bts[0].shape[1], 0
    for j, bt in enumerate(bts):
        kernels.sgmv_expand_bt(z[:, j * rank:(j + 1) * rank], bt, *segments, y, offset,
                               max_seg_len=ix.max_seg_len)
        offset += bt.shape[-1]


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
        if len(bts) == 1:  # o / down: y is the whole output, contiguous: accumulate straight into it
            y.view(n, g, -1).baddbmm_(z, pick(bts[0]))
            return
        # qkv / gate_up: a sub-module's columns of y are a strided view, on which the CPU baddbmm_ falls back
        # to one addmm per group (~10 us each); one batched bmm into a temporary, then one add, is cheaper.
        offset = 0
        for j, bt in enumerate(bts):
            size = bt.shape[-1]
            y[:, offset:offset + size].view(n, g, size).add_(torch.bmm(_sub(z, j, rank), pick(bt)))
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
