"""Block allocator and scheduler invariants under random traffic (no model: pure policy)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.block_manager import BlockManager
from gpu_worker.request import Sequence
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.scheduler import Scheduler


def make_seq(i: int, prompt: list[int], max_tokens: int, priority: int = 0, key: bytes = b"") -> Sequence:
    return Sequence(request_id=f"r{i}", prompt_len=len(prompt), token_ids=list(prompt),
                    params=SamplingParams(max_tokens=max_tokens), adapters=(), cache_key=key,
                    priority=priority, deadline=None)


def live_tables(scheduler: Scheduler) -> list[list[int]]:
    return [s.block_table for s in scheduler.running + scheduler.waiting]


def fake_step(scheduler: Scheduler, next_token: int) -> list[Sequence]:
    """One engine step without a model: feed the scheduled chunks, append a token to rows that sample."""
    batch = scheduler.schedule()
    for seq, n in batch.chunks:
        assert 1 <= n <= seq.remaining
        assert len(seq.block_table) * scheduler.blocks.block_size >= seq.num_computed + n
    assert batch.num_tokens <= scheduler.token_budget
    scheduler.on_computed(batch)
    done = []
    for seq, _ in batch.chunks:
        if seq.remaining == 0:
            seq.token_ids.append(next_token)
            if seq.num_outputs >= seq.params.max_tokens:
                scheduler.finish(seq)
                done.append(seq)
    return done


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 6),
              st.integers(0, 2), st.sampled_from([b"", b"adapter-a"])),
    st.tuples(st.just("step"), st.integers(0, 3)),
    st.tuples(st.just("abort"), st.integers(0, 60)),
), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(ops=ops, num_blocks=st.integers(12, 40), block_size=st.sampled_from([1, 2, 4, 8]),
       budget=st.integers(1, 64))
def test_random_traffic_keeps_the_pool_consistent(ops, num_blocks, block_size, budget):
    blocks = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(blocks, max_num_seqs=6, max_num_batched_tokens=budget)
    added = 0
    for op in ops:
        if op[0] == "add":
            _, prompt, max_tokens, priority, key = op
            if -(-(len(prompt) + max_tokens) // block_size) <= num_blocks:  # the engine rejects bigger ones
                scheduler.add(make_seq(added, prompt, max_tokens, priority, key))
                added += 1
        elif op[0] == "step":
            fake_step(scheduler, op[1])
        else:
            scheduler.abort(f"r{op[1]}")
        blocks.check_invariants(live_tables(scheduler))
    for _ in range(2000):  # drain: everything finishes, nothing is stuck
        if not scheduler.has_work():
            break
        fake_step(scheduler, 1)
        blocks.check_invariants(live_tables(scheduler))
    assert not scheduler.has_work()
    assert blocks.num_available == num_blocks


def test_many_thousand_random_operations():
    import random

    rng = random.Random(7)
    blocks = BlockManager(64, 4)
    scheduler = Scheduler(blocks, max_num_seqs=16, max_num_batched_tokens=48)
    n = 0
    for i in range(5000):
        r = rng.random()
        if r < 0.3:
            prompt = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
            scheduler.add(make_seq(n, prompt, rng.randrange(1, 12), rng.randrange(3)))
            n += 1
        elif r < 0.4:
            scheduler.abort(f"r{rng.randrange(max(n, 1))}")
        else:
            fake_step(scheduler, rng.randrange(4))
        if i % 10 == 0:
            blocks.check_invariants(live_tables(scheduler))
    while scheduler.has_work():
        fake_step(scheduler, 0)
    blocks.check_invariants([])
    assert blocks.num_available == 64
    assert scheduler.prefix_hit_tokens > 0  # tiny alphabet: shared prefixes are common


def test_prefix_blocks_are_shared_and_keyed():
    blocks = BlockManager(16, 4)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    a = make_seq(0, list(range(10)), 3)
    scheduler.add(a)
    fake_step(scheduler, 0)  # a's prompt computed: its two full blocks are published, a keeps running
    b, c = make_seq(1, list(range(10)) + [3], 1), make_seq(2, list(range(10)), 1, key=b"other-stack")
    scheduler.add(b)
    scheduler.add(c)
    batch = scheduler.schedule()
    assert {s.request_id: s.num_computed for s, _ in batch.chunks} == {"r0": 10, "r1": 8, "r2": 0}
    assert b.block_table[:2] == a.block_table[:2]  # shared, not copied
    assert not set(c.block_table) & set(a.block_table)  # another stack never sees a's KV
    assert all(blocks.ref_counts[x] == 2 for x in a.block_table[:2])


def test_lru_evicts_the_oldest_cached_block_first():
    blocks = BlockManager(4, 2)
    first = blocks.allocate(2)
    blocks.register(first[0], b"h0")
    blocks.register(first[1], b"h1")
    blocks.release(first)  # both cached; the tail (h1) released first is the oldest
    fresh = blocks.allocate(3)  # 2 free + 1 eviction
    assert first[1] in fresh and first[0] not in fresh
    assert b"h0" in blocks.hash_to_block and b"h1" not in blocks.hash_to_block


def test_release_twice_is_an_error():
    blocks = BlockManager(2, 2)
    b = blocks.allocate(1)
    blocks.release(b)
    with pytest.raises(RuntimeError, match="released more times"):
        blocks.release(b)


def test_exhausted_pool_raises_memory_error():
    blocks = BlockManager(2, 2)
    blocks.allocate(2)
    with pytest.raises(MemoryError, match="exhausted"):
        blocks.allocate(1)
