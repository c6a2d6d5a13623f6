"""SamplingParams validation and Sampler semantics: greedy, seeds, truncation, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_worker.sampler import Sampler, SamplingBatch, apply_penalties, make_generator
from gpu_worker.sampling_params import SamplingParams

VOCAB = 64


def build(params, prompts=None, outputs=None, generators=None, vocab_size=VOCAB):
    n = len(params)
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    if generators is None:
        generators = [make_generator(p.seed, "cpu") for p in params]
    return SamplingBatch.build(params, prompts, outputs, generators, vocab_size, "cpu")


def sample(logits, params, **kwargs):
    return Sampler()(logits, build(params, vocab_size=logits.shape[1], **kwargs))


def random_logits(rows, vocab_size=VOCAB, seed=0):
    return torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


def draw_many(logits_row, params, draws, seed=0):
    """Tokens of `draws` independent draws from one row: the row repeated, default generator seeded."""
    torch.manual_seed(seed)
    tokens, _ = sample(logits_row.expand(draws, -1).contiguous(), [params] * draws)
    return tokens


# --- SamplingParams -------------------------------------------------------------------------------------

BAD_VALUES = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.5),
    ("temperature", -0.1),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", "1"),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", 1.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("frequency_penalty", math.nan),
    ("presence_penalty", -3),
    ("presence_penalty", 2.1),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.0),
    ("seed", True),
    ("stop_token_ids", (1, -1)),
    ("stop_token_ids", (1, "2")),
    ("stop_token_ids", 5),
    ("stop", ("",)),
    ("stop", ("ok", 3)),
    ("stop", "end"),
    ("ignore_eos", 1),
    ("logprobs", "yes"),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**{field: value})


def test_good_values_and_list_conversion():
    params = SamplingParams(
        max_tokens=1,
        temperature=0,
        top_k=-1,
        top_p=1,
        min_p=1,
        repetition_penalty=0.5,
        frequency_penalty=-2,
        presence_penalty=2,
        seed=2**63 - 1,
        stop_token_ids=[2, 0],
        stop=["\n", "END"],
    )
    assert params.stop_token_ids == (2, 0) and params.stop == ("\n", "END")
    assert params.greedy and not SamplingParams().greedy
    hash(params)


# --- greedy and logprobs --------------------------------------------------------------------------------


# Logprobs are computed as logit - logsumexp: equal to log_softmax up to float rounding (atol 1e-6).
def test_greedy_is_argmax_with_raw_logprobs():
    logits = random_logits(8)
    tokens, logprobs = sample(logits, [SamplingParams(temperature=0, logprobs=True)] * 8)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.argmax(dim=-1))
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(logprobs, expected, atol=1e-6)


def test_top_k_1_equals_greedy():
    logits = random_logits(16)
    torch.manual_seed(3)
    tokens, _ = sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 16)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_logprobs_are_from_raw_logits_whatever_the_settings():
    logits = random_logits(4)
    params = [
        SamplingParams(temperature=0.5, top_k=5, seed=1, logprobs=True),
        SamplingParams(temperature=2.0, top_p=0.5, repetition_penalty=1.5, seed=2, logprobs=True),
        SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5, logprobs=True),
        SamplingParams(temperature=1.0, min_p=0.2, logprobs=True),
    ]
    raw = logits.clone()
    tokens, logprobs = sample(logits, params, prompts=[[1, 2]] * 4, outputs=[[3, 3], [], [4], [5]])
    assert torch.equal(logits, raw), "sampler must not modify the caller's logits"
    expected = torch.log_softmax(raw, -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(logprobs, expected, atol=1e-6)


# --- seeds ----------------------------------------------------------------------------------------------


def run_steps(logits_per_step, params, steps):
    """Tokens [steps, B] from sampling each step's logits, with one persistent generator per seeded row."""
    generators = [make_generator(p.seed, "cpu") for p in params]
    rows = []
    for step in range(steps):
        batch = build(params, generators=generators)
        rows.append(Sampler()(logits_per_step[step], batch)[0])
    return torch.stack(rows)


def test_seeded_row_is_reproducible_and_independent_of_batch_and_order():
    steps = 6
    logits = [random_logits(4, seed=s) for s in range(steps)]
    seeded = SamplingParams(temperature=0.8, seed=1234)
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, seed=9),
        SamplingParams(top_k=3),
    ]
    alone = run_steps([l[0:1] for l in logits], [seeded], steps)[:, 0]
    again = run_steps([l[0:1] for l in logits], [seeded], steps)[:, 0]
    assert torch.equal(alone, again)
    torch.manual_seed(77)  # the unseeded neighbours' draws must not matter
    first = run_steps(logits, [seeded, *others], steps)[:, 0]
    last = run_steps([l[[1, 2, 3, 0]] for l in logits], [*others, seeded], steps)[:, 3]
    assert torch.equal(alone, first) and torch.equal(alone, last)


def test_different_seeds_give_different_tokens():
    steps = 20
    logits = [torch.zeros(1, 1000)] * steps
    a = run_steps(logits, [SamplingParams(seed=1)], steps)
    b = run_steps(logits, [SamplingParams(seed=2)], steps)
    assert not torch.equal(a, b)
    assert len(set(a.flatten().tolist())) > 10, "a persistent generator must advance from step to step"


# --- truncation -----------------------------------------------------------------------------------------


def test_top_k_never_leaves_the_top_k():
    logits = random_logits(1, seed=5)[0]
    tokens = draw_many(logits, SamplingParams(temperature=2.0, top_k=3), 4000)
    top3 = set(logits.topk(3).indices.tolist())
    assert set(tokens.tolist()) == top3


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.25, 0.1])
    # Most likely first: 0.5 (mass before 0), 0.25 (0.5), then 0.1 with 0.75 before it >= 0.7: cut.
    tokens = draw_many(probs.log(), SamplingParams(top_p=0.7), 6000)
    counts = torch.bincount(tokens, minlength=5)
    assert set(tokens.tolist()) == {1, 3}
    assert abs(counts[1].item() / counts[3].item() - 2.0) < 0.25


def test_min_p_drops_tokens_under_min_p_times_max():
    probs = torch.tensor([0.3, 0.06, 0.4, 0.04, 0.2])
    # Threshold 0.2 * 0.4 = 0.08: tokens 1 (0.06) and 3 (0.04) go.
    tokens = draw_many(probs.log(), SamplingParams(min_p=0.2), 6000)
    assert set(tokens.tolist()) == {0, 2, 4}


def test_truncation_happens_after_temperature():
    probs = torch.tensor([0.6, 0.25, 0.15])
    # min_p 0.3 at temperature 1 would drop token 2 (0.15 < 0.18); at temperature 2 the probs flatten to
    # ~[0.47, 0.30, 0.23], the threshold falls to 0.14 and token 2 stays.
    tokens = draw_many(probs.log(), SamplingParams(temperature=2.0, min_p=0.3), 4000)
    assert set(tokens.tolist()) == {0, 1, 2}


# --- penalties ------------------------------------------------------------------------------------------


def penalized(logits, params, prompts, outputs):
    return apply_penalties(logits, build(params, prompts, outputs, vocab_size=logits.shape[1]))


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, 1.5, -1.0, -3.0], [-1.0, -1.5, -4.0, -5.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=True)] * 2
    # Row 0: token 0 seen in the prompt; row 1: token 0 seen in the output. Token 2 seen in both rows.
    prompts, outputs = [[0, 2], [2]], [[], [0]]
    expected = torch.tensor([[1.0, 1.5, -2.0, -3.0], [-2.0, -1.5, -8.0, -5.0]])
    assert torch.equal(penalized(logits, params, prompts, outputs), expected)
    tokens, logprobs = sample(logits, params, prompts=prompts, outputs=outputs)
    assert tokens.tolist() == [1, 1], "the penalty flips the argmax in both rows"
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[:, 1], atol=1e-6)


def test_frequency_penalty_scales_with_output_count_only():
    logits = torch.tensor([[3.0, 2.0, 0.0]] * 3)
    params = [SamplingParams(temperature=0, frequency_penalty=0.6)] * 3
    prompts, outputs = [[], [], [0, 0, 0]], [[0, 0], [0], []]
    expected = torch.tensor([[1.8, 2.0, 0.0], [2.4, 2.0, 0.0], [3.0, 2.0, 0.0]])
    assert torch.allclose(penalized(logits, params, prompts, outputs), expected)
    tokens, _ = sample(logits, params, prompts=prompts, outputs=outputs)
    assert tokens.tolist() == [1, 0, 0]


def test_presence_penalty_is_flat_and_negative_penalties_encourage():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    params = [
        SamplingParams(temperature=0, presence_penalty=1.5),
        SamplingParams(temperature=0, presence_penalty=1.5),
        SamplingParams(temperature=0, presence_penalty=-2.0, frequency_penalty=-0.5),
    ]
    outputs = [[0] * 5, [0], [2, 2]]
    expected = torch.tensor([[1.5, 2.0, 0.0], [1.5, 2.0, 0.0], [3.0, 2.0, 3.0]])
    assert torch.allclose(penalized(logits, params, [[1]] * 3, outputs), expected)
    tokens, _ = sample(logits + torch.tensor([0.0, 0.0, 0.1]), params, outputs=outputs)
    assert tokens.tolist() == [1, 1, 2]


# --- distribution ---------------------------------------------------------------------------------------


def chi_square(tokens, expected_probs):
    observed = torch.bincount(tokens, minlength=len(expected_probs)).double()
    expected = expected_probs.double() * len(tokens)
    return ((observed - expected) ** 2 / expected).sum().item()


# 4 degrees of freedom: P(chi2 > 20) ~ 5e-4, while a distribution off by a few percent gives hundreds.
CHI2_BOUND = 20.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_matches_softmax(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0])
    tokens = draw_many(logits, SamplingParams(temperature=temperature), 20_000, seed=11)
    assert chi_square(tokens, torch.softmax(logits / temperature, -1)) < CHI2_BOUND


def test_seeded_rows_match_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0])
    params = [SamplingParams(seed=seed) for seed in range(5_000)]
    tokens, _ = sample(logits.expand(len(params), -1).contiguous(), params)
    assert chi_square(tokens, torch.softmax(logits, -1)) < CHI2_BOUND


# --- mixed batch ----------------------------------------------------------------------------------------

MIXED = [
    (SamplingParams(logprobs=True, temperature=0), [1, 2], [3]),
    (SamplingParams(logprobs=True, temperature=0.7, seed=1), [5], []),
    (SamplingParams(logprobs=True, temperature=1.0, top_k=5, seed=2), [], [7, 8]),
    (SamplingParams(logprobs=True, temperature=1.2, top_p=0.6, seed=3), [9, 9], [1]),
    (SamplingParams(logprobs=True, temperature=0.9, min_p=0.15, seed=4), [2], [2]),
    (SamplingParams(logprobs=True, temperature=1.0, repetition_penalty=1.4, seed=5), [10, 11, 12], [13]),
    (SamplingParams(logprobs=True, temperature=1.0, frequency_penalty=0.8, presence_penalty=0.4, seed=6),
     [4], [4, 4, 6]),
    (SamplingParams(logprobs=True, temperature=0.5, top_k=10, top_p=0.9, min_p=0.05, seed=7), [], []),
    (SamplingParams(logprobs=True, temperature=0, repetition_penalty=1.8), [0, 1, 2, 3], [4, 5]),
]


def test_mixed_batch_rows_match_rows_sampled_alone():
    steps = 4
    logits = [random_logits(len(MIXED), vocab_size=32, seed=100 + s) for s in range(steps)]
    params = [p for p, _, _ in MIXED]
    prompts = [pr for _, pr, _ in MIXED]
    outputs = [out for _, _, out in MIXED]
    generators = [make_generator(p.seed, "cpu") for p in params]
    batched = []
    for step in range(steps):
        batch = SamplingBatch.build(params, prompts, outputs, generators, 32, "cpu")
        batched.append(Sampler()(logits[step], batch))
    for row, (p, prompt, output) in enumerate(MIXED):
        generator = make_generator(p.seed, "cpu")
        for step in range(steps):
            batch = SamplingBatch.build([p], [prompt], [output], [generator], 32, "cpu")
            token, logprob = Sampler()(logits[step][row : row + 1], batch)
            assert token.item() == batched[step][0][row].item(), f"row {row} step {step}"
            assert torch.allclose(logprob, batched[step][1][row : row + 1])


def test_unused_features_build_nothing():
    batch = build([SamplingParams(temperature=0), SamplingParams()])
    assert batch.seen_tokens is None and batch.output_counts is None
    assert not (batch.do_top_k or batch.do_top_p or batch.do_min_p or batch.do_penalties)


def test_build_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="SamplingBatch.build"):
        SamplingBatch.build([SamplingParams()], [[1], [2]], [[]], [None], VOCAB, "cpu")


def test_logprobs_are_skipped_unless_a_row_asks():
    logits = random_logits(4)
    tokens, logprobs = sample(logits, [SamplingParams(temperature=0)] * 4)
    assert logprobs is None and torch.equal(tokens, logits.argmax(-1))
    rows = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=True)] * 2
    _, mixed = sample(logits, rows)
    assert mixed is not None and mixed.shape == (4,)
