"""Request / Completion / TokenDelta (the engine's API types) and Sequence (its per-request state)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from gpu_worker.grammar import Grammar
from gpu_worker.sampling_params import SamplingParams

_ids = itertools.count()


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    adapters: tuple[str, ...] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None  # generated when None
    priority: int = 0  # 0 is the highest
    deadline_ms: float | None = None  # dropped with finish_reason "deadline" if not admitted in time
    grammar: Grammar | None = None  # constrains the output (gpu_worker/grammar.py)


@dataclass
class Completion:
    request_id: str
    prompt: list[int]
    token_ids: list[int]
    logprobs: list[float] | None  # natural log of each chosen token under the raw model distribution
    finish_reason: str  # "stop" | "length" | "abort" | "deadline" | "error"
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None  # why it ended with finish_reason "error"


@dataclass
class TokenDelta:
    """One step's news for one request: a new token, and/or its end."""

    request_id: str
    token_id: int | None
    logprob: float | None
    finish_reason: str | None = None
    error: str | None = None
    step: int = 0  # index of the chain step that produced it (0 for a plain request)


class RequestRejected(ValueError):
    """A ValueError that also says why, for callers that map refusals to codes (the worker's protocol)."""

    UNKNOWN_ADAPTER = "unknown_adapter"
    ADAPTER_FAILED = "adapter_failed"
    DUPLICATE = "duplicate"
    OVERLOADED = "overloaded"
    TOKEN_OUT_OF_RANGE = "token_out_of_range"

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_len: int
    token_ids: list[int]  # prompt followed by the outputs so far
    params: SamplingParams
    adapters: tuple[str, ...]
    cache_key: bytes  # folded into block hashes: what besides the tokens changes the KV
    priority: int
    deadline: float | None  # time.monotonic() seconds
    arrival: int = field(default_factory=lambda: next(_ids))
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of the leading full blocks
    logprobs: list[float] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    adapter_slots: tuple[int, ...] = ()  # device slots of the adapter stack while running
    matcher: Any = None  # xgrammar GrammarMatcher of a grammar-constrained sequence (state of its outputs)

    @property
    def outputs(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens still to be fed through the model before the next sample."""
        return len(self.token_ids) - self.num_computed

    def to_completion(self) -> Completion:
        return Completion(self.request_id, self.token_ids[: self.prompt_len], self.outputs,
                          self.logprobs if self.params.logprobs else None, self.finish_reason or "abort",
                          self.num_cached_tokens, self.stop_reason, self.error)
