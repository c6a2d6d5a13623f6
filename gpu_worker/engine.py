"""Engine: the offline API (`generate`) and the step-level API the worker process drives.

    engine = Engine(EngineConfig(model="path/to/hf_model_dir"))
    engine.add_request(Request(prompt=[1, 2, 3], params=SamplingParams(max_tokens=8)))
    while engine.has_unfinished():
        for delta in engine.step(): ...
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from gpu_worker.block_manager import BlockManager
from gpu_worker.chains import ChainCompletion, ChainRequest, ChainRunner, validate_chain
from gpu_worker.config import EngineConfig
from gpu_worker.grammar import GrammarRuntime
from gpu_worker.kernels import cpu_ops
from gpu_worker.lora.layer import attach_lora
from gpu_worker.lora.pool import AdapterNotReady, AdapterPool
from gpu_worker.model.loader import load_model
from gpu_worker.model_runner import ModelRunner, kv_block_bytes
from gpu_worker.request import Completion, Request, RequestRejected, SeqStatus, Sequence, TokenDelta
from gpu_worker.sampler import Sampler, SamplingBatch, make_generator
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.scheduler import Scheduler


class Engine:
    def __init__(self, config: EngineConfig, detokenize: Callable[[list[int]], str] | None = None):
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            cpu_ops.cpu_ops_available()  # builds (once per machine) or loads the native ops before any step
        self.model, self.hf_config = load_model(config.model, config.torch_dtype, self.device)
        if config.quantization == "nf4":
            for layer in self.model.linear_layers().values():
                layer.quantize_nf4(config.torch_dtype)
        args = self.model.args
        self.vocab_size = args.vocab_size
        self.max_model_len = min(config.max_model_len or args.max_position, args.max_position)
        if args.sliding_window:
            self.max_model_len = min(self.max_model_len, args.sliding_window)
        self.eos_ids = _eos_ids(self.hf_config)
        num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_bytes // kv_block_bytes(self.model, config.block_size, config.torch_dtype))
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.lora: AdapterPool | None = None  # created by the first load_adapter
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_prefix_caching, adapters=_SchedulerAdapters(self))
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, config.torch_dtype, self.device)
        self.sampler = Sampler()
        self._detokenize = detokenize or load_detokenizer(config.tokenizer or config.model)
        self._seqs: dict[str, Sequence] = {}
        self._finished: dict[str, Sequence] = {}
        self.chains = ChainRunner(self)
        self._grammars: GrammarRuntime | None = None  # created by the first grammar request
        self.num_steps = 0

    # --- step-level API -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> str:
        """Validates and queues a request; raises ValueError naming the bad field (nothing is queued then)."""
        self.validate(request)
        request_id = self._admission_id(request.request_id, "Request")
        self._enqueue(request, request_id)
        return request_id

    def add_chain(self, chain: ChainRequest) -> str:
        """Validates and queues a chain (gpu_worker/chains.py); its deltas carry its id and step index."""
        validate_chain(chain, self.validate)
        request_id = self._admission_id(chain.request_id, "ChainRequest")
        self.chains.add(chain, request_id)
        return request_id

    def _admission_id(self, request_id: str | None, kind: str) -> str:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._seqs or request_id in self.chains.running:
            raise RequestRejected(RequestRejected.DUPLICATE,
                                  f"{kind}.request_id {request_id!r} is already in flight")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise RequestRejected(RequestRejected.OVERLOADED, f"engine queue full ({self.config.max_waiting} "
                                  "waiting requests); retry later")
        return request_id

    def _enqueue(self, request: Request, request_id: str, arrival: int | None = None) -> Sequence:
        """Queues a validated request as a sequence; `arrival` gives it an earlier place in the queue order
        (a chain's later steps keep their first step's)."""
        deadline = None if request.deadline_ms is None else time.monotonic() + request.deadline_ms / 1000
        seq = Sequence(request_id=request_id, prompt_len=len(request.prompt), token_ids=list(request.prompt),
                       params=request.params, adapters=tuple(request.adapters),
                       cache_key=b"", priority=request.priority,
                       deadline=deadline, generator=make_generator(request.params.seed, self.device))
        if arrival is not None:
            seq.arrival = arrival
        if request.grammar is not None:
            seq.matcher = self._grammar_runtime().matcher(request.grammar)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Aborts a request, or a chain (its running step; the rest are skipped). No delta is emitted."""
        if request_id in self.chains.running:
            return self.chains.abort(request_id)
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(request_id)
        seq.finish_reason, seq.status = "abort", SeqStatus.FINISHED
        self._finished[request_id] = seq
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[TokenDelta]:
        """Runs one batched forward pass; returns the new tokens and the ends of requests and chains."""
        return self.chains.route(self._step())

    def _step(self) -> list[TokenDelta]:
        if self.lora is not None:
            self.lora.poll()
        batch = self.scheduler.schedule()
        deltas = [self._end(seq, "deadline") for seq in batch.expired]
        deltas += [self._end(seq, "error") for seq in batch.failed]
        if not batch.chunks:
            return deltas
        logits, samplers = self.runner.run(batch.chunks, self.lora)
        self.scheduler.on_computed(batch)
        self.num_steps += 1
        if samplers:
            deltas += self._sample(logits, samplers)
        return deltas

    def take_completion(self, request_id: str) -> Completion:
        return self._finished.pop(request_id).to_completion()

    def take_chain_completion(self, request_id: str) -> ChainCompletion:
        return self.chains.take(request_id)

    # --- offline API ----------------------------------------------------------------------------------

    def generate(self, requests: list[Request], progress: bool = False) -> list[Completion]:
        """Runs the requests to completion; returns completions in the order given.

        Every request is validated first: a bad one raises ValueError (naming its index and field) before
        any of them is queued.
        """
        for i, request in enumerate(requests):
            try:
                self.validate(request)
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from None
        ids = [self.add_request(r) for r in requests]
        self._run_until_done(ids, progress)
        return [self.take_completion(i) for i in ids]

    def generate_chains(self, chains: list[ChainRequest], progress: bool = False) -> list[ChainCompletion]:
        """Runs the chains to completion; returns their completions in the order given (all validated
        before any is queued, like `generate`)."""
        for i, chain in enumerate(chains):
            try:
                validate_chain(chain, self.validate)
            except ValueError as e:
                raise ValueError(f"chain {i}: {e}") from None
        ids = [self.add_chain(c) for c in chains]
        self._run_until_done(ids, progress)
        return [self.take_chain_completion(i) for i in ids]

    def _run_until_done(self, ids: list[str], progress: bool) -> None:
        pending = set(ids)
        bar = _progress_bar(len(ids)) if progress else None
        while pending:
            for delta in self.step():
                if delta.finish_reason is not None and delta.request_id in pending:
                    pending.discard(delta.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()

    def stats(self) -> dict:
        s = self.scheduler
        return {
            "running": len(s.running), "waiting": len(s.waiting), "steps": self.num_steps,
            "kv_blocks_total": self.blocks.num_blocks, "kv_blocks_free": len(self.blocks.free),
            "kv_blocks_cached": len(self.blocks.cached), "preemptions": s.num_preemptions,
            "prefix_query_tokens": s.prefix_query_tokens, "prefix_hit_tokens": s.prefix_hit_tokens,
            "prefix_hit_rate": s.prefix_hit_tokens / s.prefix_query_tokens if s.prefix_query_tokens else 0.0,
            "prefix_by_stack": {stack: {"query_tokens": q, "hit_tokens": h, "hit_rate": h / q if q else 0.0}
                                for stack, (q, h) in s.prefix_by_stack.items()},
            "adapters": self.lora.stats() if self.lora is not None else None,
            "chains_running": len(self.chains.running),
        }

    # --- internals ------------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenDelta]:
        batch = SamplingBatch.build([s.params for s in seqs], [s.token_ids[: s.prompt_len] for s in seqs],
                                    [s.outputs for s in seqs], [s.generator for s in seqs], self.vocab_size,
                                    self.device)
        if self._grammars is not None:
            constraint = self._grammars.fill([s.matcher for s in seqs])
            if constraint is not None:
                batch.token_bitmask, batch.bitmask_rows = constraint
        token_ids, logprobs = self.sampler(logits, batch)
        deltas = []
        logprob_list = logprobs.tolist() if logprobs is not None else [None] * len(seqs)
        for seq, token, logprob in zip(seqs, token_ids.tolist(), logprob_list):
            logprob = logprob if seq.params.logprobs else None  # computed for the batch, reported on request
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            reason = self._stop_reason(seq, token)
            deltas.append(TokenDelta(seq.request_id, token, logprob, reason))
            if reason is not None:
                self.scheduler.finish(seq)
                self._retire(seq, reason)
        return deltas

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if seq.matcher is not None and (reason := self._grammars.advance(seq, token)) is not None:
            return reason
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if p.stop and self._detokenize is not None:
            # Checked every token, so a match must end in the newest one: decode only a tail that is
            # sure to hold the longest stop string (every token is at least one byte, a char at most 4).
            tail = 4 * max(len(s) for s in p.stop) + 4
            text = self._detokenize(seq.outputs[-tail:])
            for s in p.stop:
                if s in text:
                    seq.stop_reason = s
                    return "stop"
        if seq.num_outputs >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _end(self, seq: Sequence, reason: str) -> TokenDelta:
        self._retire(seq, reason)
        return TokenDelta(seq.request_id, None, None, reason, seq.error)

    def _retire(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason, seq.status = reason, SeqStatus.FINISHED
        self._finished[seq.request_id] = self._seqs.pop(seq.request_id)

    # --- adapters -------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path, pin: bool = False, wait: bool = True):
        """Loads a PEFT adapter on the loader thread. wait=True blocks until it is in host memory and
        raises ValueError if it is invalid; wait=False returns a future, and requests that use the adapter
        wait in the queue (no step waits on disk)."""
        if not name or not isinstance(name, str):
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        future = self._adapter_pool().load(name, str(path), pin=pin)
        if wait:
            self.lora.wait(name)
        return future

    def unload_adapter(self, name: str) -> None:
        self._adapter_pool().unload(name)

    def pin_adapter(self, name: str, pinned: bool = True) -> None:
        """A pinned adapter is never evicted from its device slot or from host memory."""
        self._adapter_pool().pin(name, pinned)

    def _grammar_runtime(self) -> GrammarRuntime:
        if self._grammars is None:
            self._grammars = GrammarRuntime(self.config.tokenizer or self.config.model, self.vocab_size,
                                            self.eos_ids, self.config.max_num_seqs, self.device)
        return self._grammars

    def _adapter_pool(self) -> AdapterPool:
        if self.lora is None:
            pool = AdapterPool(self.model.args, self.config.lora, self.config.torch_dtype, self.device)
            attach_lora(self.model, pool)  # hooks first: a pool is never kept without them
            self.lora = pool
        return self.lora

    def validate(self, request: Request) -> None:
        """Raises what add_request would for this request (ValueError, RequestRejected), adding nothing."""
        prompt = request.prompt
        if not isinstance(request.params, SamplingParams):
            raise ValueError("Request.params must be a SamplingParams")
        if len(prompt) == 0:
            raise ValueError("Request.prompt is empty")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(RequestRejected.TOKEN_OUT_OF_RANGE, "Request.prompt has token ids outside "
                                  f"the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"Request.prompt has {len(prompt)} tokens; the context is {self.max_model_len} "
                             f"(prompt + at least one new token must fit)")
        if request.adapters:
            if self.lora is None:
                raise RequestRejected(RequestRejected.UNKNOWN_ADAPTER,
                                      f"Request.adapters: unknown adapter(s) {list(request.adapters)}")
            self.lora.check_stack(tuple(request.adapters))
        if request.priority < 0:
            raise ValueError(f"Request.priority must be >= 0, got {request.priority}")
        if request.deadline_ms is not None and request.deadline_ms <= 0:
            raise ValueError(f"Request.deadline_ms must be > 0, got {request.deadline_ms}")
        if request.grammar is not None:  # compiled once per distinct grammar; ValueError when invalid
            self._grammar_runtime().compile(request.grammar)
        total = min(len(prompt) + request.params.max_tokens, self.max_model_len)
        need = -(-total // self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(f"Request.prompt + params.max_tokens need {need} KV blocks; the pool has "
                             f"{self.blocks.num_blocks}")

class _SchedulerAdapters:
    """The scheduler's adapter hooks: resident slots and the prefix-cache key of a sequence's stack."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def acquire(self, seq: Sequence) -> bool:
        pool = self.engine.lora
        if not seq.adapters:
            return True
        try:
            seq.adapter_slots = pool.acquire(seq.adapters)
        except AdapterNotReady:
            return False
        # The KV of every layer after the first depends on every adapter below it: key on the whole stack.
        seq.cache_key = "|".join(pool.uid(n) for n in seq.adapters).encode()
        return True

    def release(self, seq: Sequence) -> None:
        if seq.adapters and seq.adapter_slots:
            self.engine.lora.release(seq.adapters)
            seq.adapter_slots = ()


def _eos_ids(hf_config: dict) -> set[int]:
    eos = hf_config.get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")


def load_detokenizer(path: str | Path) -> Callable[[list[int]], str] | None:
    """A detokenize callback from a folder's tokenizer.json, or None when there is none."""
    if not (Path(path) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    return lambda ids: tok.decode(ids, skip_special_tokens=False)
