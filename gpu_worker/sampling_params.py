"""Per-request sampling settings, validated when built (vLLM / OpenAI semantics)."""

from __future__ import annotations

import math
from dataclasses import dataclass

_SEED_LIMIT = 2**63


def _is_int(value: object) -> bool:
    # bool is a subclass of int; True as a top_k or a seed is almost surely a caller's bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)


def _fail(field: str, rule: str, value: object) -> None:
    raise ValueError(f"SamplingParams.{field} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    - temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    - top_k: keep the k most likely tokens; 0 or -1 disables it.
    - top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1 disables it.
    - min_p: drop tokens whose probability is below min_p * (probability of the most likely token).
    - repetition_penalty: HF / vLLM semantics over tokens seen in prompt + output: a positive logit is
      divided by it, a negative one multiplied; 1 disables it.
    - frequency_penalty, presence_penalty: OpenAI semantics over output tokens only:
      ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
    - seed: makes a request's tokens reproducible whatever else shares its batch.
    - stop_token_ids / stop: finish when one of these tokens / strings is produced (strings are matched
      by the engine through the detokenizer); ignore_eos keeps generating past the EOS token.
    - logprobs: return the natural log-probability of each chosen token (from the raw model logits).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience (e.g. from JSON); stored as tuples to keep the object hashable.
        for field in ("stop_token_ids", "stop"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        self._check_lengths_and_seed()
        self._check_distribution()
        self._check_penalties()
        self._check_stops()

    def _check_lengths_and_seed(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _fail("max_tokens", "an int >= 1", self.max_tokens)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _SEED_LIMIT):
            _fail("seed", "None or an int in [0, 2**63)", self.seed)

    def _check_distribution(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            _fail("temperature", "a finite number >= 0", t)
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", "an int >= -1 (0 or -1 disables it)", self.top_k)
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", "in (0, 1]", self.top_p)
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            _fail("min_p", "in [0, 1]", self.min_p)

    def _check_penalties(self) -> None:
        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or r <= 0:
            _fail("repetition_penalty", "a finite number > 0", r)
        for field in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, field)
            if not _is_real(value) or not -2 <= value <= 2:
                _fail(field, "in [-2, 2]", value)

    def _check_stops(self) -> None:
        ids = self.stop_token_ids
        if not isinstance(ids, tuple) or not all(_is_int(i) and i >= 0 for i in ids):
            _fail("stop_token_ids", "a tuple of ints >= 0", ids)
        stop = self.stop
        if not isinstance(stop, tuple) or not all(isinstance(s, str) and s for s in stop):
            _fail("stop", "a tuple of non-empty strings", stop)
        for field in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, "a bool", getattr(self, field))

    @property
    def greedy(self) -> bool:
        """True when the request always takes the most likely token (temperature 0)."""
        return self.temperature == 0
