"""Paged KV block pool with ref counts and prefix caching by chained block hashes.

A block is in exactly one of three states:
  in use      ref_count > 0 (owned by one or more sequences' block tables)
  cached      ref_count == 0 but holds a full block whose hash is registered: reusable on a hit, and
              evictable in LRU order when the pool needs room
  free        ref_count == 0, no hash
A full block's hash chains the previous block's hash, its token ids and the sequence's `cache_key` (what
else changes the KV, e.g. the adapter stack), so a hit implies the whole prefix and key are equal.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np


def block_hash(prev: bytes, token_ids: Sequence[int], cache_key: bytes) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(cache_key)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.cached: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first (LRU)
        self.hash_to_block: dict[bytes, int] = {}

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.cached)

    def match_prefix(self, token_ids: Sequence[int], cache_key: bytes, max_tokens: int) -> list[bytes]:
        """Hashes of the leading full blocks (within max_tokens) that are in the cache, in order."""
        hits, prev = [], b""
        for start in range(0, max_tokens - self.block_size + 1, self.block_size):
            prev = block_hash(prev, token_ids[start:start + self.block_size], cache_key)
            if prev not in self.hash_to_block:
                break
            hits.append(prev)
        return hits

    def acquire_cached(self, hashes: list[bytes]) -> list[int]:
        """Takes a reference on each hit block (found by match_prefix just before)."""
        blocks = [self.hash_to_block[h] for h in hashes]
        for b in blocks:
            self._ref(b)
        return blocks

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref 1), evicting LRU cached blocks when no free one is left."""
        if n > self.num_available:
            raise MemoryError(f"KV pool exhausted: need {n} blocks, {self.num_available} available")
        blocks = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.cached.popitem(last=False)
                del self.hash_to_block[self.hashes[b]]
                self.hashes[b] = None
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def register(self, block: int, h: bytes) -> None:
        """Publishes a block that just became full; if an equal block exists, the older one stays."""
        if self.hashes[block] is None and h not in self.hash_to_block:
            self.hashes[block] = h
            self.hash_to_block[h] = block

    def release(self, blocks: Sequence[int]) -> None:
        # Last block first, so that LRU eviction takes the tails of prefixes before their heads.
        for b in reversed(blocks):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] < 0:
                raise RuntimeError(f"block {b} released more times than acquired")
            if self.ref_counts[b] == 0:
                if self.hashes[b] is None:
                    self.free.append(b)
                else:
                    self.cached[b] = None

    def _ref(self, b: int) -> None:
        if self.ref_counts[b] == 0:
            self.cached.pop(b)
        self.ref_counts[b] += 1

    def check_invariants(self, live_tables: Sequence[Sequence[int]]) -> None:
        """For tests: every block in exactly one state, ref counts equal to table membership."""
        counts = [0] * self.num_blocks
        for table in live_tables:
            for b in table:
                counts[b] += 1
        assert counts == self.ref_counts, "ref counts differ from block-table membership"
        free, cached = set(self.free), set(self.cached)
        assert len(free) == len(self.free), "a block is twice in the free list"
        assert not free & cached, "a block is both free and cached"
        for b in range(self.num_blocks):
            in_use = self.ref_counts[b] > 0
            states = in_use + (b in free) + (b in cached)
            assert states == 1, f"block {b} is in {states} states"
            if b in cached:
                assert self.hashes[b] is not None and self.hash_to_block[self.hashes[b]] == b
            if b in free:
                assert self.hashes[b] is None
        assert all(self.hashes[b] == h for h, b in self.hash_to_block.items())
