"""The CPU LoRA path (gpu_worker/lora/batch.py) against a per-pair fp32 loop, over every grouping path."""

from __future__ import annotations

import random

import pytest
import torch

from gpu_worker.lora.batch import add_lora, build_lora_batch


def reference(token_slots, x, y, at, bts):
    """Per (token, slot, sub-module) fp64 loop: y[t, slice_j] += (x[t] @ At[s])[j*R:(j+1)*R] @ Bt_j[s]."""
    out = y.clone().double()
    rank = bts[0].shape[1]
    for t, stack in enumerate(token_slots):
        for s in stack:
            z = x[t].double() @ at[s].double()
            offset = 0
            for j, bt in enumerate(bts):
                size = bt.shape[-1]
                out[t, offset:offset + size] += z[j * rank:(j + 1) * rank] @ bt[s].double()
                offset += size
    return out


def case(token_slots, num_slots=8, rank=4, sizes=(18, 6, 6), seed=0):
    """A fused projection of len(sizes) sub-modules (like q, k, v), rank width 4, in_features 20."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(token_slots), 20, generator=g)
    at = torch.randn(num_slots, 20, len(sizes) * rank, generator=g)
    bts = [torch.randn(num_slots, rank, size, generator=g) for size in sizes]
    y = torch.randn(len(token_slots), sum(sizes), generator=g)
    return x, y, at, bts


def sorted_decode(num_slots, per_slot):
    return [(s,) for s in range(num_slots) for _ in range(per_slot)]


LAYOUTS = {
    "identity (equal sorted groups)": (sorted_decode(8, 4), "bgmv", "identity"),
    "padded groups": ([(s,) for s in (0, 0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 7)], "bgmv", "gather"),
    "sparse slots gathered": ([(s,) for s in (1, 7, 7, 3, 3, 1)], "bgmv", "slot_ids"),
    "stacks": ([(0, 1), (0, 1), (2,), (3, 4), (0,), (5, 6, 7), (), (1,)], "bgmv", "gather"),
    "one long group (prefill)": ([(2,)] * 40, "sgmv", "contiguous"),
    "two prefill segments + decode rows": ([(1,)] * 20 + [(3,)] * 15 + [(1,), (3,), ()], "sgmv", "scattered"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_path_matches_the_reference(name):
    token_slots, path, detail = LAYOUTS[name]
    x, y, at, bt = case(token_slots, sizes=(30,) if "prefill" in name else (18, 6, 6))
    batch = build_lora_batch(token_slots, torch.device("cpu"))
    assert batch.bgmv == (path == "bgmv")
    if detail == "identity":
        assert batch.gather is None and batch.slot_ids is None
    if detail == "slot_ids":
        assert batch.slot_ids is not None
    if detail == "scattered":
        assert any(g.tokens is not None for g in batch.groups)
    expected = reference(token_slots, x, y, at, bt)
    add_lora(batch, x, y, at, bt)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5)


def test_no_adapter_rows_build_nothing():
    assert build_lora_batch([(), (), ()], torch.device("cpu")) is None


@pytest.mark.parametrize("seed", range(20))
def test_random_mixes(seed):
    rng = random.Random(seed)
    tokens = rng.randrange(1, 70)
    popular = [rng.randrange(8) for _ in range(rng.randrange(1, 5))]
    token_slots = []
    for _ in range(tokens):
        depth = rng.choice([0, 1, 1, 1, 2, 3])
        pool = range(8) if rng.random() < 0.5 else popular
        stack = rng.sample(pool, min(depth, len(pool)))
        token_slots.append(tuple(stack))
    x, y, at, bt = case(token_slots, seed=seed)
    expected = reference(token_slots, x, y, at, bt)
    batch = build_lora_batch(token_slots, torch.device("cpu"))
    if batch is not None:
        add_lora(batch, x, y, at, bt)
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-5)
