"""Continuous batching policy: which sequences run this step, and how many tokens each feeds.

Every step mixes decode rows (1 token) and prefill chunks under a token budget. Order of service:
running decodes, then running partial prefills, then admissions from the waiting queue, each by
(priority, deadline, arrival). When the KV pool runs out, the lowest-priority running sequence not yet
scheduled this step is preempted: its blocks are released (full ones stay in the prefix cache) and it
waits to be recomputed. Pure policy: no tensors, testable without a model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from gpu_worker.block_manager import BlockManager, block_hash
from gpu_worker.request import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to feed)
    expired: list[Sequence] = field(default_factory=list)  # deadline passed while waiting
    failed: list[Sequence] = field(default_factory=list)  # cannot run (e.g. an adapter failed to load)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


def _order(seq: Sequence):
    return (seq.priority, seq.deadline if seq.deadline is not None else math.inf, seq.arrival)


class NoAdapters:
    """Adapter hooks of a scheduler without multi-LoRA: every sequence is ready."""

    def acquire(self, seq: Sequence) -> bool:
        return True

    def release(self, seq: Sequence) -> None:
        pass


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True, clock=time.monotonic, adapters=None):
        self.blocks = blocks
        # acquire(seq) -> bool: True when the sequence's adapters are resident (and now held); False to
        # retry at a later step; ValueError when it can never run. release(seq) undoes acquire.
        self.adapters = adapters or NoAdapters()
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.clock = clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache at admission
        self.prefix_hit_tokens = 0
        self.prefix_by_stack: dict[str, list[int]] = {}  # stack -> [query tokens, hit tokens]

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._free(seq)
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(expired=self._expire_waiting())
        budget = self.token_budget
        self.running.sort(key=_order)
        taken: set[int] = set()
        for decode_pass in (True, False):
            for seq in list(self.running):
                skip = id(seq) in taken or seq.status is not SeqStatus.RUNNING
                if skip or (seq.remaining == 1) != decode_pass:
                    continue
                n = min(seq.remaining, budget)
                if n == 0 or not self._grow_or_preempt(seq, n, taken, batch):
                    continue
                taken.add(id(seq))
                batch.chunks.append((seq, n))
                budget -= n
        self._admit(batch, budget, taken)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int, taken: set[int]) -> None:
        self.waiting.sort(key=_order)
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                return
            if seq in batch.preempted:  # never re-admit in the step that preempted it
                return
            if not self._acquire_adapters(seq, batch):
                continue  # its adapters are not resident yet: later ones may still run
            n = self._fit(seq, budget, taken, batch)
            if n is None:
                self.adapters.release(seq)
                return
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            taken.add(id(seq))
            batch.chunks.append((seq, n))
            budget -= n

    def _fit(self, seq: Sequence, budget: int, taken: set[int], batch: ScheduledBatch) -> int | None:
        """Takes the prefix-cache hits and the blocks of the first chunk; None when the pool cannot."""
        while True:
            hits = self._lookup_prefix(seq)
            cached_tokens = len(hits) * self.blocks.block_size
            n = min(len(seq.token_ids) - cached_tokens, budget)
            need = math.ceil((cached_tokens + n) / self.blocks.block_size) - len(hits)
            reusable = sum(1 for h in hits if self.blocks.ref_counts[self.blocks.hash_to_block[h]] == 0)
            if need <= self.blocks.num_available - reusable:
                break
            if not self._preempt_below(seq, taken, batch):
                return None
        seq.block_table = self.blocks.acquire_cached(hits) + self.blocks.allocate(need)
        seq.block_hashes = list(hits)
        seq.num_computed = cached_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = cached_tokens
            self._count_prefix(seq, cached_tokens)
        return n

    def _count_prefix(self, seq: Sequence, cached_tokens: int) -> None:
        self.prefix_query_tokens += seq.prompt_len
        self.prefix_hit_tokens += cached_tokens
        per_stack = self.prefix_by_stack.setdefault("+".join(seq.adapters) or "<base>", [0, 0])
        per_stack[0] += seq.prompt_len
        per_stack[1] += cached_tokens

    def _acquire_adapters(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        try:
            return self.adapters.acquire(seq)
        except ValueError as e:
            self.waiting.remove(seq)
            seq.error = str(e)
            batch.failed.append(seq)
            return False

    def _lookup_prefix(self, seq: Sequence) -> list[bytes]:
        if not self.enable_prefix_caching:
            return []
        # At least the last token is always computed: its logits are needed to sample.
        return self.blocks.match_prefix(seq.token_ids, seq.cache_key, len(seq.token_ids) - 1)

    def _grow_or_preempt(self, seq: Sequence, n: int, taken: set[int], batch: ScheduledBatch) -> bool:
        need = math.ceil((seq.num_computed + n) / self.blocks.block_size) - len(seq.block_table)
        while need > self.blocks.num_available:
            victim = self._lowest_untaken(taken)
            self._preempt(victim, batch)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table += self.blocks.allocate(need)
        return True

    def _lowest_untaken(self, taken: set[int]) -> Sequence:
        candidates = [s for s in self.running if id(s) not in taken]
        return max(candidates, key=_order)  # the sequence being grown is always a candidate

    def _preempt_below(self, seq: Sequence, taken: set[int], batch: ScheduledBatch) -> bool:
        """Frees room for an admission by preempting a running sequence of strictly lower priority."""
        candidates = [s for s in self.running if id(s) not in taken and s.priority > seq.priority]
        if not candidates:
            return False
        self._preempt(max(candidates, key=_order), batch)
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)
        self.add(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.adapters.release(seq)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0

    def _expire_waiting(self) -> list[Sequence]:
        now = self.clock()
        expired = [s for s in self.waiting
                   if s.deadline is not None and s.deadline < now and s.num_outputs == 0]
        for seq in expired:
            self.waiting.remove(seq)
        return expired

    def on_computed(self, batch: ScheduledBatch) -> None:
        """After the model ran the batch: advance each sequence and publish blocks that became full."""
        bs = self.blocks.block_size
        for seq, n in batch.chunks:
            seq.num_computed += n
            full = seq.num_computed // bs
            while len(seq.block_hashes) < full:
                j = len(seq.block_hashes)
                prev = seq.block_hashes[-1] if seq.block_hashes else b""
                h = block_hash(prev, seq.token_ids[j * bs:(j + 1) * bs], seq.cache_key)
                if self.enable_prefix_caching:
                    self.blocks.register(seq.block_table[j], h)
                seq.block_hashes.append(h)
