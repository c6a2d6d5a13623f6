"""Chains: steps run back to back inside the engine, each an ordinary sequence with its own adapter stack,
prompt, sampling params and stop rules, and optional grammar (the studio's rule: a chain stays on one
server, with no round trip to the caller between steps).

    engine.add_chain(ChainRequest(steps=[
        ChainStep(prompt=persona + history, adapters=("vampire.dialogue_style",), params=talk),
        ChainStep(prompt=persona + history + [OutputRef(0)] + act_cue, adapters=("vampire.action_policy",),
                  params=act, grammar=Grammar("ebnf", 'root ::= "attack" | "flee" | "wander"')),
    ]))

- A step's prompt is complete in itself: literal token ids, and OutputRef(k) for the output tokens of an
  earlier step k, spliced exactly as in step k's Completion (including a final stop token such as EOS).
- Step i is queued inside `Engine.step()` as soon as step i-1 ends; it keeps the chain's priority and its
  first step's arrival, so it does not queue behind requests that came later. The chain's deadline applies
  to the admission of its first step only.
- Each step is its own sequence, so its prefix is served from the prefix cache of its own adapter stack:
  a second turn whose steps extend the first turn's prompts prefills only the new tokens of each step.
- Deltas carry the chain's request_id and the step index (non-decreasing within a chain); finish_reason
  is set once, on the chain's last delta. A step that ends with "error", "deadline" or "abort" ends the
  chain with that reason and the remaining steps are skipped; otherwise the chain's reason is its last
  step's ("stop" or "length").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpu_worker.grammar import Grammar
from gpu_worker.request import Completion, Request, RequestRejected, TokenDelta
from gpu_worker.sampling_params import SamplingParams

if TYPE_CHECKING:
    from gpu_worker.engine import Engine


@dataclass(frozen=True)
class OutputRef:
    """The output tokens of step `step` of the same chain, spliced into a later step's prompt."""

    step: int


@dataclass(frozen=True)
class ChainStep:
    prompt: list[int | OutputRef]
    adapters: tuple[str, ...] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    grammar: Grammar | None = None


@dataclass(frozen=True)
class ChainRequest:
    steps: list[ChainStep]
    request_id: str | None = None  # generated when None
    priority: int = 0  # 0 is the highest; every step runs at it
    deadline_ms: float | None = None  # "deadline" if step 0 is not admitted in time (later steps: none)


@dataclass
class ChainCompletion:
    request_id: str
    steps: list[Completion]  # one per step that ran or failed to start, in order; skipped ones are absent
    # The last step's ("stop" | "length"), or the "abort" | "deadline" | "error" of the step that ended it.
    finish_reason: str
    error: str | None = None  # "step i: ..." when finish_reason is "error"


def validate_chain(chain: ChainRequest, validate_request: Callable[[Request], None]) -> None:
    """Raises ValueError naming the bad field; each step is checked as the request it becomes at worst
    (every OutputRef at its step's max_tokens), so a valid chain never outgrows the context or the pool."""
    if not isinstance(chain, ChainRequest):
        raise ValueError(f"expected a ChainRequest, got {type(chain).__name__}")
    if not isinstance(chain.steps, list | tuple) or not chain.steps:
        raise ValueError("ChainRequest.steps is empty")
    if not isinstance(chain.priority, int) or chain.priority < 0:
        raise ValueError(f"ChainRequest.priority must be an int >= 0, got {chain.priority!r}")
    if chain.deadline_ms is not None and not chain.deadline_ms > 0:
        raise ValueError(f"ChainRequest.deadline_ms must be > 0, got {chain.deadline_ms!r}")
    for i, step in enumerate(chain.steps):
        where = f"ChainRequest.steps[{i}]"
        if not isinstance(step, ChainStep):
            raise ValueError(f"{where} must be a ChainStep, got {type(step).__name__}")
        if not isinstance(step.prompt, list | tuple):
            raise ValueError(f"{where}.prompt must be a list of token ids and OutputRefs")
        _check_refs(step.prompt, i, where)
        try:
            validate_request(step_request(chain, i, _worst_case_outputs(chain, i)))
        except ValueError as e:  # name the step; keep the reason of a RequestRejected
            if isinstance(e, RequestRejected):
                raise RequestRejected(e.reason, f"{where}: {e}") from None
            raise ValueError(f"{where}: {e}") from None


def _check_refs(prompt: list[int | OutputRef], i: int, where: str) -> None:
    for j, item in enumerate(prompt):
        if isinstance(item, OutputRef) and not (isinstance(item.step, int) and 0 <= item.step < i):
            earlier = f"an earlier step (0..{i - 1})" if i else "an earlier step, and step 0 has none"
            raise ValueError(f"{where}.prompt[{j}]: OutputRef(step={item.step!r}) must refer to {earlier}")


def _worst_case_outputs(chain: ChainRequest, i: int) -> list[list[int]]:
    # Token 0 stands in for every output token: only the lengths matter to the checks.
    return [[0] * step.params.max_tokens for step in chain.steps[:i]]


def step_request(chain: ChainRequest, i: int, outputs: list[list[int]]) -> Request:
    """Step i as a plain request, its OutputRefs replaced by outputs[k] (the output tokens of step k)."""
    step = chain.steps[i]
    prompt = [t for item in step.prompt
              for t in (outputs[item.step] if isinstance(item, OutputRef) else (item,))]
    return Request(prompt=prompt, adapters=tuple(step.adapters), params=step.params,
                   priority=chain.priority, deadline_ms=chain.deadline_ms if i == 0 else None,
                   grammar=step.grammar)


@dataclass(eq=False)
class _RunningChain:
    request_id: str
    chain: ChainRequest
    arrival: int = 0  # the first step's place in the queue order, kept by the later steps
    seq_id: str = ""  # the engine sequence of the running step
    done: list[Completion] = field(default_factory=list)  # completions of the steps that ended

    @property
    def step(self) -> int:
        return len(self.done)


class ChainRunner:
    """Runs chains on the engine's sequences: starts each step when the previous one ends, and turns the
    running step's deltas into the chain's."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.running: dict[str, _RunningChain] = {}  # chain request_id -> state
        self.by_seq: dict[str, _RunningChain] = {}  # running step's sequence id -> state
        self.finished: dict[str, ChainCompletion] = {}

    def add(self, chain: ChainRequest, request_id: str) -> None:
        """Starts a validated chain (its first step goes to the waiting queue)."""
        state = _RunningChain(request_id, chain)
        self.running[request_id] = state
        failed = self._start_step(state)
        if failed is not None:  # step 0 is the request validate_chain checked: only a guard
            del self.finished[request_id]
            raise ValueError(failed.error)

    def abort(self, request_id: str) -> bool:
        """Aborts the running step and skips the rest; False when the chain is not running."""
        state = self.running.get(request_id)
        if state is None:
            return False
        self.by_seq.pop(state.seq_id)
        self.engine.abort(state.seq_id)
        self._take_step(state)
        self._finish(state, "abort")
        return True

    def take(self, request_id: str) -> ChainCompletion:
        return self.finished.pop(request_id)

    def route(self, deltas: list[TokenDelta]) -> list[TokenDelta]:
        """The step's deltas rewritten as the chain's (same order, one for one); starts the next step of
        every chain whose step just ended."""
        if not self.by_seq:
            return deltas
        return [self._route(d) if d.request_id in self.by_seq else d for d in deltas]

    def _route(self, delta: TokenDelta) -> TokenDelta:
        state = self.by_seq[delta.request_id]
        step = state.step
        reason, error = None, None
        if delta.finish_reason is not None:
            reason, error = self._on_step_end(state, delta)
        return TokenDelta(state.request_id, delta.token_id, delta.logprob, reason, error, step=step)

    def _on_step_end(self, state: _RunningChain, delta: TokenDelta) -> tuple[str | None, str | None]:
        """Takes the step's completion and starts the next step; returns the chain's end, if it ended."""
        del self.by_seq[state.seq_id]
        self._take_step(state)
        more = state.step < len(state.chain.steps)
        if delta.finish_reason in ("stop", "length") and more:
            failed = self._start_step(state)
            return (None, None) if failed is None else (failed.finish_reason, failed.error)
        error = f"step {state.step - 1}: {delta.error}" if delta.error else None
        done = self._finish(state, delta.finish_reason, error)
        return done.finish_reason, done.error

    def _start_step(self, state: _RunningChain) -> ChainCompletion | None:
        """Queues the next step; on a request that is no longer valid (e.g. its adapter was unloaded or
        failed to load meanwhile) ends the chain with "error" and returns its completion."""
        i = state.step
        request = step_request(state.chain, i, [c.token_ids for c in state.done])
        try:
            self.engine.validate(request)
        except ValueError as e:
            state.done.append(Completion(state.request_id, request.prompt, [], None, "error", error=str(e)))
            return self._finish(state, "error", f"step {i}: {e}")
        seq_id = f"{state.request_id}:step{i}:{uuid.uuid4().hex[:12]}"
        seq = self.engine._enqueue(request, seq_id, arrival=state.arrival if i else None)
        state.arrival, state.seq_id = seq.arrival, seq_id
        self.by_seq[seq_id] = state
        return None

    def _take_step(self, state: _RunningChain) -> None:
        completion = self.engine.take_completion(state.seq_id)
        completion.request_id = state.request_id
        state.done.append(completion)

    def _finish(self, state: _RunningChain, reason: str, error: str | None = None) -> ChainCompletion:
        del self.running[state.request_id]
        done = self.finished[state.request_id] = ChainCompletion(state.request_id, state.done, reason, error)
        return done
