"""Vectorized next-token sampling over a batch of rows, each with its own SamplingParams.

Per step, for logits ``[B, V]``:

    logits[constrained rows] = -inf where the row's grammar forbids the token   (grammar.py)
    logits = penalties(logits)                   # repetition (prompt + output), frequency / presence (output)
    greedy rows: token = argmax(logits)
    logits = logits / temperature
    logits = top_k(logits); top_p(logits); min_p(logits)   # masked tokens get -inf
    token = argmax(softmax(logits) / q),  q ~ Exp(1) per token   # exponential race == categorical draw
    logprob = log_softmax(raw logits)[token]

A feature no row uses costs nothing: ``SamplingBatch`` carries a flag per feature and ``Sampler`` skips it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_worker.grammar import apply_token_bitmask
from gpu_worker.sampling_params import SamplingParams

# Exp(1) draws can be exactly 0 in float32; dividing a masked token's zero probability by 0 gives NaN, and
# argmax treats NaN as the maximum, so the noise is floored at the smallest normal float.
_NOISE_FLOOR = torch.finfo(torch.float32).tiny


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The per-request generator for a seeded request (None for an unseeded one).

    Create it once per request and pass the same object every step: its state carries the request's
    random stream from one step to the next.
    """
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _padded(rows: list[list[int]], pad: int, device: torch.device | str) -> torch.Tensor:
    """rows as an int64 tensor [B, max_len], right-padded with ``pad`` (max_len >= 1)."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)


def _token_counts(rows: list[list[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """counts[b, v] = how many times token v occurs in rows[b]; float32 [B, V]."""
    # Padding goes to an extra column V that is sliced off, so ragged rows need no mask.
    ids = _padded(rows, vocab_size, device)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _column(values: list[float], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step as tensors; all [B] unless noted.

    Disabled features hold neutral values (temperature 1 on greedy rows, top_k = V, top_p = 1, min_p = 0,
    penalties 1 / 0), so a row that does not use a feature passes through it unchanged.
    """

    temperatures: torch.Tensor  # float32; 1.0 on greedy rows (their sampled token is discarded)
    greedy_rows: torch.Tensor  # bool
    top_ks: torch.Tensor  # int64 in [1, V]
    top_ps: torch.Tensor  # float32 in (0, 1]
    min_ps: torch.Tensor  # float32 in [0, 1]
    repetition_penalties: torch.Tensor  # float32 > 0
    frequency_penalties: torch.Tensor  # float32
    presence_penalties: torch.Tensor  # float32
    generators: list[torch.Generator | None]  # per row; None rows draw from the default generator
    seeded_rows: tuple[int, ...]  # sampled (non-greedy) rows that own a generator
    all_greedy: bool
    want_logprobs: bool  # some row asked for logprobs; otherwise the [B, V] logsumexp is skipped
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool
    do_repetition: bool
    do_frequency_presence: bool
    seen_tokens: torch.Tensor | None = None  # bool [B, V]: in prompt or output; only if do_repetition
    output_counts: torch.Tensor | None = None  # float32 [B, V]; only if do_frequency_presence
    # Grammar constraints (set by the engine after build): int32 [B, ceil(V / 32)], applied to these rows.
    token_bitmask: torch.Tensor | None = None
    bitmask_rows: list[int] | None = None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Tensors for one step. Row b uses params[b], prompt_ids[b], output_ids[b] (tokens generated so
        far) and generators[b] (the request's persistent generator, or None to use the default one)."""
        n = len(params)
        if not n or not len(prompt_ids) == len(output_ids) == len(generators) == n:
            raise ValueError(
                "SamplingBatch.build needs one prompt, output and generator per params row, got "
                f"{n} params, {len(prompt_ids)} prompts, {len(output_ids)} outputs, "
                f"{len(generators)} generators"
            )
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        do_repetition = any(p.repetition_penalty != 1 for p in params)
        do_frequency_presence = any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params)
        batch = cls(
            temperatures=_column([p.temperature or 1.0 for p in params], torch.float32, device),
            greedy_rows=_column([p.greedy for p in params], torch.bool, device),
            top_ks=_column(top_ks, torch.int64, device),
            top_ps=_column([p.top_p for p in params], torch.float32, device),
            min_ps=_column([p.min_p for p in params], torch.float32, device),
            repetition_penalties=_column([p.repetition_penalty for p in params], torch.float32, device),
            frequency_penalties=_column([p.frequency_penalty for p in params], torch.float32, device),
            presence_penalties=_column([p.presence_penalty for p in params], torch.float32, device),
            generators=list(generators),
            seeded_rows=tuple(b for b, p in enumerate(params) if generators[b] is not None and not p.greedy),
            all_greedy=all(p.greedy for p in params),
            want_logprobs=any(p.logprobs for p in params),
            do_top_k=any(k < vocab_size for k in top_ks),
            do_top_p=any(p.top_p < 1 for p in params),
            do_min_p=any(p.min_p > 0 for p in params),
            do_repetition=do_repetition,
            do_frequency_presence=do_frequency_presence,
        )
        if do_repetition or do_frequency_presence:
            output_counts = _token_counts(output_ids, vocab_size, device)
            if do_frequency_presence:
                batch.output_counts = output_counts
            if do_repetition:
                batch.seen_tokens = (_token_counts(prompt_ids, vocab_size, device) + output_counts) > 0
        return batch

    @property
    def do_penalties(self) -> bool:
        return self.do_repetition or self.do_frequency_presence

    @property
    def constrained(self) -> bool:
        return self.token_bitmask is not None


class Sampler:
    """Picks one token per row from logits [B, V].

    ``__call__`` returns ``(token_ids [B] int64, logprobs [B] float32)``, logprobs None when no row asked
    for them. ``logprobs[b]`` is the natural log-probability of the chosen token under the RAW model
    distribution, ``log_softmax(logits[b])``, before penalties, temperature, truncation and grammar masks:
    what transformers reports for greedy decoding, and a value that does not depend on the sampling settings.
    """

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = logits.float()
        # log p(chosen) = logit - logsumexp: one reduction instead of a full [B, V] log_softmax; skipped
        # (logprobs None) when no row asked for logprobs.
        log_norm = torch.logsumexp(logits, dim=-1) if batch.want_logprobs else None
        if batch.all_greedy and not batch.do_penalties and not batch.constrained:
            best, token_ids = logits.max(dim=-1)  # max(dim) is ~3x faster than argmax on the CPU
            return token_ids, None if log_norm is None else best - log_norm
        raw = logits
        if batch.constrained:
            logits = apply_token_bitmask(logits, batch.token_bitmask, batch.bitmask_rows)
        logits = apply_penalties(logits, batch)
        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            sampled_ids = self._sample(logits, batch)
            token_ids = torch.where(batch.greedy_rows, greedy_ids, sampled_ids)
        if log_norm is None:
            return token_ids, None
        return token_ids, raw.gather(1, token_ids[:, None]).squeeze(1) - log_norm

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.temperatures[:, None]
        if batch.do_top_k or batch.do_top_p:
            logits = apply_top_k_top_p(logits, batch)
        if batch.do_min_p:
            logits = apply_min_p(logits, batch.min_ps)
        probs = torch.softmax(logits, dim=-1)
        return (probs / exponential_noise(probs, batch)).argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [B, V] with repetition, frequency and presence penalties applied (a new tensor)."""
    if batch.do_repetition:
        penalty = batch.repetition_penalties[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_tokens, penalized, logits)
    if batch.do_frequency_presence:
        counts = batch.output_counts
        logits = (
            logits
            - batch.frequency_penalties[:, None] * counts
            - batch.presence_penalties[:, None] * (counts > 0).float()
        )
    return logits


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [B, V] with tokens outside each row's top k, then outside its top-p nucleus, set to -inf.

    Tokens tied with the k-th largest logit are all kept. The nucleus is the shortest prefix of tokens,
    most likely first, whose probability reaches top_p; the most likely token is always kept.
    """
    # One descending sort serves both filters: k-th value for top-k, cumulative mass for top-p.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    if batch.do_top_k:
        kth_largest = sorted_logits.gather(1, (batch.top_ks - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if batch.do_top_p:
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # top_p = 1 must keep everything: float rounding can push mass_before to 1 on the far tail.
        outside = (mass_before >= batch.top_ps[:, None]) & (batch.top_ps < 1)[:, None]
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with tokens whose probability is below min_p * max probability set to -inf.

    Compared in log space (p < min_p * p_max  <=>  logit < max_logit + log(min_p)), so no softmax is
    needed; min_p = 0 gives a threshold of -inf and keeps every token.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_ps)[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def exponential_noise(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Exp(1) noise shaped like probs [B, V]; argmax(probs / noise) is a draw from probs.

    A seeded row's noise comes from its own generator alone, so its token does not depend on which rows
    share the batch or where it sits; the other rows use one draw from the default generator.
    """
    noise = torch.empty_like(probs)
    batch_size, vocab_size = probs.shape
    if len(batch.seeded_rows) < batch_size:
        noise.exponential_()
    for row in batch.seeded_rows:
        generator = batch.generators[row]
        # A generator is bound to one device; draw there and move, so a CPU generator works with CUDA logits.
        row_noise = torch.empty(vocab_size, dtype=probs.dtype, device=generator.device)
        noise[row] = row_noise.exponential_(generator=generator).to(probs.device)
    return noise.clamp_min_(_NOISE_FLOOR)
