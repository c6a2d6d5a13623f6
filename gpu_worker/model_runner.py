"""Mechanics of one step: KV pool tensors, input packing, the forward pass, logits of the sampling rows."""

from __future__ import annotations

import torch

from gpu_worker.attention import AttentionMetadata, PrefillSegment
from gpu_worker.lora.batch import LoRABatch, build_lora_batch
from gpu_worker.lora.pool import AdapterPool
from gpu_worker.model.llama import CausalLM
from gpu_worker.request import Sequence


def kv_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
    a = model.args
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return 2 * a.num_layers * block_size * a.num_kv_heads * a.head_dim * itemsize


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.model, self.block_size, self.device = model, block_size, device
        a = model.args
        shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
        # One (K, V) pair per layer: [num_blocks, block_size, Hkv, D]
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(a.num_layers)]

    @torch.inference_mode()
    def run(self, chunks: list[tuple[Sequence, int]], lora: AdapterPool | None = None
            ) -> tuple[torch.Tensor, list[Sequence]]:
        """Feeds each (sequence, n) chunk; returns logits [S, V] (float32) of the sequences that sample."""
        # Rows sorted by adapter stack: the rows of one adapter are contiguous, so LoRA groups are slices.
        prefills = sorted(((s, n) for s, n in chunks if n > 1), key=lambda c: c[0].adapter_slots)
        decodes = sorted(((s, n) for s, n in chunks if n == 1), key=lambda c: c[0].adapter_slots)
        ordered = prefills + decodes  # the attention metadata expects prefills first
        input_ids, positions, slots, sample_rows, samplers = [], [], [], [], []
        segments = []
        for seq, n in ordered:
            start = len(input_ids)
            first = seq.num_computed
            input_ids += seq.token_ids[first:first + n]
            positions += range(first, first + n)
            slots += self._slots(seq.block_table, first, n)
            if n > 1:
                table = seq.block_table[: -(-(first + n) // self.block_size)]
                segments.append(PrefillSegment(start, n, first + n, self._tensor(table)))
            if first + n == len(seq.token_ids):
                sample_rows.append(start + n - 1)
                samplers.append(seq)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots), prefills=segments,
            num_prefill_tokens=sum(n for _, n in prefills),
            decode_block_tables=self._block_tables([s for s, _ in decodes]),
            decode_context_lens=self._tensor([s.num_computed + 1 for s, _ in decodes], torch.int32)
            if decodes else None)
        if lora is not None:
            lora.current = self._lora_batch(ordered, lora.kernel)
        try:
            hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.kv_caches, meta)
        finally:
            if lora is not None:
                lora.current = None
        if not samplers:
            return hidden.new_empty(0, self.model.args.vocab_size), []
        return self.model.compute_logits(hidden[self._tensor(sample_rows)]), samplers

    def _lora_batch(self, ordered: list[tuple[Sequence, int]], kernel: str) -> LoRABatch | None:
        if not any(s.adapters for s, _ in ordered):  # base-only steps skip the per-token list
            return None
        token_slots = [s.adapter_slots for s, n in ordered for _ in range(n)]
        return build_lora_batch(token_slots, self.device, kernel)

    def _slots(self, block_table: list[int], first: int, n: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(first, first + n)]

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor | None:
        if not seqs:
            return None
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
