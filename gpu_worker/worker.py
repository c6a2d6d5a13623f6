"""The worker process: one engine, one bound ROUTER socket, the engine loop between them (ipc/PROTOCOL.md).

    npc-worker serve --model DIR --endpoint ipc:///run/user/1000/npc-ipc/w0.sock --adapters-dir ADAPTERS
    python -m gpu_worker.worker serve ...                     # the same

Between two engine steps the loop drains the socket without blocking (it sleeps in poll only when no
request is running), takes batches in, streams each step's deltas to the clients that own them (one
TOKEN_DELTAS message per client and step) and then their COMPLETIONS. Everything received was checked by
ipc (WorkerEndpoint.recv answers bad frames itself); what the engine refuses (ValueError) is answered
per request in BATCH_ACK.rejected or with ERROR, and the loop goes on.

Heartbeats during a long step: the engine step runs without the socket; meanwhile a responder thread takes
the socket (a lock hands it over, so only one thread uses it at a time) every HEARTBEAT_POLL_MS, answers
HEARTBEATs at once and queues everything else, in arrival order, for the loop to handle after the step. A
long prefill (seconds on a slow CPU, a long prompt on a GPU) so never looks like a dead worker, while a
hung or crashed process still stops answering.

SIGTERM (or SIGINT): no new batches (ERROR SHUTTING_DOWN), in-flight requests may finish within
--drain-timeout, the rest end with finish_reason "error"; then the socket closes (its ipc:// file is
removed) and the clients' rings are unmapped. The worker never creates shared memory: clients do, and
unlink their segment once the worker has mapped it, so nothing is left in /dev/shm either way.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq

from gpu_worker.chains import ChainRequest, OutputRef
from gpu_worker.chains import ChainStep as EngineChainStep
from gpu_worker.config import EngineConfig
from gpu_worker.engine import Engine
from gpu_worker.grammar import Grammar as EngineGrammar
from gpu_worker.lora.pool import LoRAConfig
from gpu_worker.request import Request, RequestRejected, TokenDelta
from gpu_worker.sampling_params import SamplingParams
from ipc.errors import ErrorCode, ProtocolError
from ipc.messages import (
    ADAPTER_NAME,
    AbortReply,
    AdapterLoadReply,
    AdapterPinReply,
    AdapterUnloadReply,
    BatchAck,
    Completions,
    Delta,
    Grammar,
    HeartbeatReply,
    MsgType,
    Rejection,
    RequestResult,
    StatsReply,
    StepResult,
    SubmitBatch,
    TokenDeltas,
    WarmPrefix,
    WarmPrefixReply,
)
from ipc.transport import Incoming, IpcConfig, WorkerEndpoint

log = logging.getLogger("npc-worker")

IDLE_POLL_MS = 50  # sleep in poll at most this long with nothing running (signals are checked after)
LOADING_POLL_MS = 5  # while an adapter load is pending: how often its future is looked at
STALLED_POLL_MS = 1  # work exists but the last step ran nothing (adapters loading): don't spin hot
HEARTBEAT_POLL_MS = 50  # during an engine step: how often the responder thread answers heartbeats
MAX_EARLY = 4096  # messages the responder queues during one step; more wait in the socket
SHUTDOWN_ERROR = "the worker is shutting down (SIGTERM); the request was not finished"


@dataclass(frozen=True)
class WorkerConfig:
    """The worker's one configuration: the engine's, the transport's, and its own."""

    engine: EngineConfig
    ipc: IpcConfig
    adapters_dir: str | None = None  # one PEFT folder per adapter name: loaded at start, and ADAPTER_LOAD's
    worker_id: str = ""
    drain_timeout_s: float = 5.0  # after SIGTERM: how long in-flight requests may run before they fail
    client_timeout_s: float = 5.0  # a heartbeating client silent this long is gone: its requests abort

    def __post_init__(self) -> None:
        if self.drain_timeout_s < 0 or self.client_timeout_s <= 0:
            raise ValueError(f"WorkerConfig.drain_timeout_s must be >= 0 and client_timeout_s > 0, got "
                             f"{self.drain_timeout_s}, {self.client_timeout_s}")
        if self.adapters_dir is not None and not Path(self.adapters_dir).is_dir():
            raise ValueError(f"WorkerConfig.adapters_dir {self.adapters_dir!r} is not a directory")


@dataclass
class _Owned:
    """A request in flight: which client owns it, and whether it is a chain (its completion differs)."""

    peer: bytes
    chain: bool


@dataclass
class _Warm:
    """A WARM_PREFIX in flight: its reply waits until every segment's prefill is done."""

    incoming: Incoming
    cached: list[int]
    pending: set[str] = field(default_factory=set)


# --- building engine requests from a checked batch ----------------------------------------------------------


def _engine_grammar(grammar: Grammar | None) -> EngineGrammar | None:
    return None if grammar is None else EngineGrammar(grammar.kind, grammar.text)


def engine_item(batch: SubmitBatch, i: int) -> Request | ChainRequest:
    """Request i of a batch as the engine takes it (prompts copied out of the ring); ValueError if invalid."""
    spec = batch.spec(i)
    prompt = batch.prompt_tokens(i).tolist()
    if not spec.chain:
        return Request(prompt=prompt, adapters=spec.adapters, params=spec.params, request_id=spec.request_id,
                       priority=spec.priority, deadline_ms=spec.deadline_ms,
                       grammar=_engine_grammar(spec.grammar))
    steps = [EngineChainStep(prompt, spec.adapters, spec.params, _engine_grammar(spec.grammar))]
    for step in spec.chain:
        parts: list[int | OutputRef] = []
        for part in step.parts:
            if part.segment is not None:
                parts += batch.segment(part.segment).tolist()
            else:
                parts.append(OutputRef(part.output_of))
        steps.append(EngineChainStep(parts, step.adapters, step.params, _engine_grammar(step.grammar)))
    return ChainRequest(steps, spec.request_id, spec.priority, spec.deadline_ms)


_REFUSAL_CODES = {
    RequestRejected.UNKNOWN_ADAPTER: ErrorCode.UNKNOWN_ADAPTER,
    RequestRejected.ADAPTER_FAILED: ErrorCode.ADAPTER_LOAD_FAILED,
    RequestRejected.DUPLICATE: ErrorCode.DUPLICATE_REQUEST,
    RequestRejected.OVERLOADED: ErrorCode.OVERLOADED,
    RequestRejected.TOKEN_OUT_OF_RANGE: ErrorCode.TOKEN_OUT_OF_RANGE,
}


def refusal_code(error: ValueError) -> ErrorCode:
    """The protocol code of an engine ValueError: from its reason when it is a RequestRejected."""
    return _REFUSAL_CODES.get(getattr(error, "reason", None), ErrorCode.INVALID_REQUEST)


def plain(value: object) -> object:
    """A stats value as msgpack-safe plain data: string keys, lists for tuples and sets."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def adapter_folders(root: str | Path) -> dict[str, Path]:
    """name -> PEFT folder for every subfolder of root with an adapter_config.json and a valid name."""
    found = {}
    for path in sorted(Path(root).iterdir()):
        if (path / "adapter_config.json").is_file() and ADAPTER_NAME.fullmatch(path.name):
            found[path.name] = path
    return found


# --- the worker ---------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine | None = None):
        self.config = config
        self.engine = engine or Engine(config.engine)
        self.adapter_paths = adapter_folders(config.adapters_dir) if config.adapters_dir else {}
        for name, path in self.adapter_paths.items():
            self.engine.load_adapter(name, path)  # before binding: the first client finds them ready
        ipc = config.ipc.with_limits(vocab_size=self.engine.vocab_size)
        self.endpoint = WorkerEndpoint(ipc, config.worker_id or f"worker-{os.getpid()}",
                                       self.engine.max_model_len)
        self.owned: dict[str, _Owned] = {}
        self.loads: dict[str, tuple[Incoming, object]] = {}  # adapter name -> (its ADAPTER_LOAD, future)
        self.warming: dict[str, _Warm] = {}  # warm-up sequence id -> its WARM_PREFIX
        self.last_seen: dict[bytes, float] = {}  # clients that heartbeat -> time of their last message
        self.draining = False
        self.drain_deadline = float("inf")
        self.stopped = False
        # The socket belongs to whoever holds this lock: the loop, except during engine.step(), when the
        # responder thread may take it (see the module doc). `early`: what the responder read, in order.
        self.socket_lock = threading.Lock()
        self.early: deque[Incoming] = deque()
        self.heartbeats_during_steps = 0
        self.handlers = {
            MsgType.SUBMIT_BATCH: self._submit, MsgType.ABORT: self._abort,
            MsgType.ADAPTER_LOAD: self._adapter_load, MsgType.ADAPTER_UNLOAD: self._adapter_unload,
            MsgType.ADAPTER_PIN: self._adapter_pin, MsgType.WARM_PREFIX: self._warm_prefix,
            MsgType.STATS: self._stats, MsgType.HEARTBEAT: self._heartbeat, MsgType.GOODBYE: self._goodbye,
        }

    # --- the loop -------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Runs until drained after request_stop(); closes the socket on the way out."""
        stalled = False
        self.socket_lock.acquire()
        responder = threading.Thread(target=self._respond_during_steps, name="npc-worker-heartbeats",
                                     daemon=True)
        responder.start()
        try:
            while not self.stopped:
                running = self.engine.has_unfinished()
                if not running:
                    timeout = LOADING_POLL_MS if self.loads else IDLE_POLL_MS
                else:
                    timeout = STALLED_POLL_MS if stalled else 0
                self._drain_socket(timeout)
                self._poll_loads()
                self._check_clients()
                if self.draining:
                    self._drain_step()
                if self.engine.has_unfinished():
                    self.socket_lock.release()  # the responder may answer heartbeats while the step runs
                    try:
                        deltas = self.engine.step()
                    finally:
                        self.socket_lock.acquire()
                    stalled = not deltas
                    self._dispatch(deltas)
        finally:
            self.stopped = True
            self.socket_lock.release()
            responder.join(5)
            with self.socket_lock:
                self.close()

    def _respond_during_steps(self) -> None:
        """The responder thread: while the loop is inside engine.step() (it has released the socket), answer
        HEARTBEATs and queue the rest for the loop, in arrival order."""
        while not self.stopped:
            if not self.socket_lock.acquire(timeout=HEARTBEAT_POLL_MS / 1000):
                continue
            try:
                if self.stopped:
                    return
                while len(self.early) < MAX_EARLY:
                    incoming = self.endpoint.recv(0)
                    if incoming is None:
                        break
                    if incoming.msg_type == MsgType.HEARTBEAT:  # answered now, even ahead of queued messages:
                        self.heartbeats_during_steps += 1  # its reply only says the worker is alive
                        self._handle(incoming)
                    else:
                        self.early.append(incoming)
            except Exception:  # the loop handles the socket again after the step; never die silently
                log.exception("answering heartbeats during a step failed")
            finally:
                self.socket_lock.release()
            time.sleep(HEARTBEAT_POLL_MS / 1000)

    def request_stop(self, *_signal_args) -> None:
        """SIGTERM: take no new work; a second one cuts the drain short."""
        if self.draining:
            self.drain_deadline = 0.0
            return
        self.draining = True
        self.drain_deadline = time.monotonic() + self.config.drain_timeout_s

    def _drain_step(self) -> None:
        if time.monotonic() >= self.drain_deadline:
            self._fail_all(SHUTDOWN_ERROR)
        if not self.owned and not self.warming:
            self.stopped = True

    def _drain_socket(self, timeout_ms: int) -> None:
        if self.early:  # read by the responder during the last step: first, in their order
            while self.early:
                self._handle(self.early.popleft())
            timeout_ms = 0
        incoming = self.endpoint.recv(timeout_ms)
        while incoming is not None:
            self._handle(incoming)
            incoming = self.endpoint.recv(0)

    def _handle(self, incoming: Incoming) -> None:
        if incoming.peer in self.last_seen or incoming.msg_type == MsgType.HEARTBEAT:
            self.last_seen[incoming.peer] = time.monotonic()
        handler = self.handlers.get(incoming.msg_type)
        if handler is None:  # HELLO: answered by the endpoint
            return
        try:
            handler(incoming)
        except ProtocolError as e:
            self.endpoint.refuse(incoming.peer, e.attributed(incoming.corr_id, incoming.msg_type))
        except Exception as e:  # a bug must not take the worker down: answer INTERNAL and go on
            log.exception("handling %s failed", incoming.msg_type.name)
            error = ProtocolError(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
            self.endpoint.refuse(incoming.peer, error.attributed(incoming.corr_id, incoming.msg_type))

    # --- requests -------------------------------------------------------------------------------------

    def _submit(self, incoming: Incoming) -> None:
        if self.draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN,
                                "the worker is shutting down and takes no new batches")
        batch: SubmitBatch = incoming.msg
        accepted, rejected = 0, []
        for i in range(len(batch)):
            rid = batch.request_id[i]
            error = self._admit(incoming.peer, batch, i)
            if error is None:
                accepted += 1
            else:
                rejected.append(Rejection(rid, int(refusal_code(error)), str(error)))
        # The prompts are copied into the engine: the ack hands the ring slot back to the client.
        self.endpoint.reply(incoming, BatchAck(accepted, tuple(rejected)))

    def _admit(self, peer: bytes, batch: SubmitBatch, i: int) -> ValueError | None:
        """Queues request i; returns why not, or None."""
        rid = batch.request_id[i]
        if rid in self.owned:
            return RequestRejected(RequestRejected.DUPLICATE, f"request id {rid!r} is already in flight")
        try:
            item = engine_item(batch, i)
            if isinstance(item, ChainRequest):
                self.engine.add_chain(item)
            else:
                self.engine.add_request(item)
        except ValueError as e:
            return e
        self.owned[rid] = _Owned(peer, isinstance(item, ChainRequest))
        return None

    def _abort(self, incoming: Incoming) -> None:
        aborted, unknown, results = [], [], []
        for rid in incoming.msg.request_ids:
            owner = self.owned.get(rid)
            if owner is None or owner.peer != incoming.peer or not self.engine.abort(rid):
                unknown.append(rid)  # a client may only abort its own requests
                continue
            aborted.append(rid)
            results.append(self._result(rid, self.owned.pop(rid)))
        self.endpoint.reply(incoming, AbortReply(tuple(aborted), tuple(unknown)))
        if results:
            ends = tuple(Delta(r.request_id, finish_reason="abort") for r in results)
            self.endpoint.send(incoming.peer, TokenDeltas(ends))
            self.endpoint.send(incoming.peer, Completions(tuple(results)))

    def _result(self, rid: str, owner: _Owned) -> RequestResult:
        """Takes a finished request's completion out of the engine."""
        if not owner.chain:
            return RequestResult.from_engine(self.engine.take_completion(rid))
        done = self.engine.take_chain_completion(rid)
        return RequestResult(rid, done.finish_reason, tuple(StepResult.from_engine(c) for c in done.steps),
                             done.error)

    def _dispatch(self, deltas: list[TokenDelta]) -> None:
        """One TOKEN_DELTAS per client with news this step, then its COMPLETIONS (so a result comes last)."""
        news: dict[bytes, list[Delta]] = {}
        ends: dict[bytes, list[RequestResult]] = {}
        for d in deltas:
            if d.request_id in self.warming:
                if d.finish_reason is not None:
                    self.engine.take_completion(d.request_id)
                    self._warm_done(d.request_id, d.finish_reason in ("stop", "length"))
                continue
            owner = self.owned.get(d.request_id)
            if owner is None:
                continue
            news.setdefault(owner.peer, []).append(Delta.from_engine(d, d.step))
            if d.finish_reason is not None:
                del self.owned[d.request_id]
                ends.setdefault(owner.peer, []).append(self._result(d.request_id, owner))
        for peer, items in news.items():
            self._send(peer, TokenDeltas(tuple(items)))
        for peer, results in ends.items():
            self._send(peer, Completions(tuple(results)))

    def _send(self, peer: bytes, msg) -> None:
        gone = self.endpoint.dropped["peer_gone"]
        if not self.endpoint.send(peer, msg) and self.endpoint.dropped["peer_gone"] > gone:
            self._drop_client(peer)  # disconnected: nobody will read its requests' tokens

    def _fail_all(self, error: str) -> None:
        """Ends every request in flight with finish_reason "error" (drain timeout)."""
        ends: dict[bytes, list[RequestResult]] = {}
        for rid, owner in list(self.owned.items()):
            if self.engine.abort(rid):
                result = self._result(rid, owner)
                steps = result.steps
                ends.setdefault(owner.peer, []).append(RequestResult(rid, "error", steps, error))
            del self.owned[rid]
        for seq_id in list(self.warming):
            self.engine.abort(seq_id)
            self.engine.take_completion(seq_id)
            self._warm_done(seq_id, ok=False)
        for peer, results in ends.items():
            self.endpoint.send(peer, TokenDeltas(tuple(Delta(r.request_id, finish_reason="error", error=error)
                                                       for r in results)))
            self.endpoint.send(peer, Completions(tuple(results)))

    def _drop_client(self, peer: bytes) -> None:
        """A client that is gone: abort its requests, forget its ring."""
        for rid, owner in list(self.owned.items()):
            if owner.peer == peer and self.engine.abort(rid):
                self._result(rid, owner)
                del self.owned[rid]
        self.last_seen.pop(peer, None)
        self.endpoint.forget(peer)

    def _check_clients(self) -> None:
        now = time.monotonic()
        for peer, seen in list(self.last_seen.items()):
            if now - seen > self.config.client_timeout_s:
                log.warning("client %r silent for %.1f s: aborting its requests", peer, now - seen)
                self._drop_client(peer)

    def _goodbye(self, incoming: Incoming) -> None:
        self._drop_client(incoming.peer)  # the endpoint already unmapped the ring and replied

    # --- warm-up --------------------------------------------------------------------------------------

    def _warm_prefix(self, incoming: Incoming) -> None:
        if self.draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the worker is shutting down and takes no new work")
        msg: WarmPrefix = incoming.msg
        requests = []
        for j in range(len(msg.offsets) - 1):
            prompt = msg.segment(j).tolist()
            # max_tokens=1: the prefill fills the cache; the one sampled token is thrown away.
            requests.append(Request(prompt=prompt, adapters=msg.adapters(j),
                                    request_id=f"warm:{uuid.uuid4().hex}",
                                    params=SamplingParams(max_tokens=1, temperature=0.0)))
        for j, request in enumerate(requests):  # all checked before any is queued
            try:
                self.engine.validate(request)
            except ValueError as e:
                raise ProtocolError(refusal_code(e), f"segment {j}: {e}") from None
        block = self.engine.blocks.block_size
        warm = _Warm(incoming, [len(r.prompt) // block * block for r in requests])
        for request in requests:
            self.engine.add_request(request)
            warm.pending.add(request.request_id)
            self.warming[request.request_id] = warm

    def _warm_done(self, seq_id: str, ok: bool) -> None:
        """One warm-up sequence ended (its completion already taken); replies once all of them have."""
        warm = self.warming.pop(seq_id)
        warm.pending.discard(seq_id)
        if not ok:
            warm.cached = [0] * len(warm.cached)  # aborted or failed: claim nothing
        if not warm.pending:
            self.endpoint.reply(warm.incoming, WarmPrefixReply(tuple(warm.cached)))

    # --- adapters -------------------------------------------------------------------------------------

    def _adapter_path(self, name: str, path: str | None) -> str:
        if path is not None:
            return path
        folder = Path(self.config.adapters_dir) / name if self.config.adapters_dir else None
        if folder is None or not (folder / "adapter_config.json").is_file():
            raise ProtocolError(ErrorCode.UNKNOWN_ADAPTER, f"adapter {name!r}: no path given and no folder "
                                f"of that name in the worker's adapters dir")
        return str(folder)

    def _adapter_load(self, incoming: Incoming) -> None:
        msg = incoming.msg
        if msg.name in self.loads:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"adapter {msg.name!r} is already loading")
        path = self._adapter_path(msg.name, msg.path)
        try:  # loading runs on the pool's loader thread: steps go on meanwhile
            future = self.engine.load_adapter(msg.name, path, pin=msg.pin, wait=False)
        except ValueError as e:
            raise ProtocolError(ErrorCode.ADAPTER_LOAD_FAILED, f"adapter {msg.name!r}: {e}") from None
        self.loads[msg.name] = (incoming, future)

    def _poll_loads(self) -> None:
        for name, (incoming, future) in list(self.loads.items()):
            if not future.done():
                continue
            del self.loads[name]
            error = future.exception()
            if error is not None:
                self.endpoint.refuse(incoming.peer, ProtocolError(
                    ErrorCode.ADAPTER_LOAD_FAILED, f"adapter {name!r}: {error}").attributed(
                        incoming.corr_id, incoming.msg_type))
                continue
            self.engine.lora.poll()  # into the host tier now, so the reply's "resident" is true
            self.endpoint.reply(incoming, AdapterLoadReply(name, True, name in self.engine.lora.pinned))

    def _adapter_unload(self, incoming: Incoming) -> None:
        name = incoming.msg.name
        try:
            self.engine.unload_adapter(name)
        except ValueError as e:
            raise ProtocolError(refusal_code(e), str(e)) from None
        self.endpoint.reply(incoming, AdapterUnloadReply(name, False, False))

    def _adapter_pin(self, incoming: Incoming) -> None:
        msg = incoming.msg
        try:
            self.engine.pin_adapter(msg.name, msg.pinned)
        except ValueError as e:
            raise ProtocolError(refusal_code(e), str(e)) from None
        resident = msg.name in self.engine.lora.cpu or msg.name in self.engine.lora.slot_of
        self.endpoint.reply(incoming, AdapterPinReply(msg.name, resident, msg.pinned))

    # --- stats and liveness ---------------------------------------------------------------------------

    def _stats(self, incoming: Incoming) -> None:
        stats = plain(self.engine.stats() | {"endpoint": self.endpoint.counters(),
                                             "in_flight": len(self.owned), "draining": self.draining,
                                             "heartbeats_during_steps": self.heartbeats_during_steps})
        self.endpoint.reply(incoming, StatsReply(stats))

    def _heartbeat(self, incoming: Incoming) -> None:
        s = self.engine.scheduler
        self.endpoint.reply(incoming, HeartbeatReply(incoming.msg.seq, self.endpoint.worker_id,
                                                     len(s.running), len(s.waiting), self.draining))

    def close(self) -> None:
        self.endpoint.close()
        if self.engine.lora is not None:
            self.engine.lora.close()


# --- command line -------------------------------------------------------------------------------------------


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--endpoint", default=None, help="ipc:///abs/path.sock or tcp://host:port (default: a "
                   "fresh ipc:// path in a 0700 directory, printed at start)")
    p.add_argument("--adapters-dir", default=None, help="one PEFT folder per adapter name, loaded at start")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--worker-id", default="")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one engine step (decode rows + prefill chunks)")
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--max-loras", type=int, default=16)
    p.add_argument("--lora-kernel", default="auto", choices=["auto", "torch", "triton"],
                   help="how LoRA deltas are added: auto = Triton kernels on CUDA, torch otherwise")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, one per core); give a co-located "
                        "scheduler a core by setting fewer")
    p.add_argument("--transport", default="shm", choices=["shm", "inline"])
    p.add_argument("--drain-timeout", type=float, default=5.0, help="seconds in-flight work may run after "
                   "SIGTERM before it fails")
    p.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    lora = LoRAConfig(max_loras=args.max_loras, max_cpu_loras=max(64, args.max_loras),
                      kernel=args.lora_kernel)
    engine = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_bytes=args.kv_cache_mb << 20, lora=lora)
    ipc = IpcConfig(endpoint=args.endpoint, transport=args.transport)
    return WorkerConfig(engine, ipc, args.adapters_dir, args.worker_id, args.drain_timeout)


def serve_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        config = config_from_args(args)
        worker = Worker(config)
    except (ValueError, OSError, zmq.ZMQError) as e:
        print(f"npc-worker: cannot start: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    # One line on stdout that launchers wait for: the address to connect to.
    print(f"npc-worker ready {worker.endpoint.endpoint} adapters={sorted(worker.adapter_paths)}", flush=True)
    worker.serve()
    log.info("stopped; %s", worker.endpoint.counters())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npc-worker", description="NPC inference worker")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_args(sub.add_parser("serve", help="run the engine behind a ZeroMQ endpoint"))
    from gpu_worker.profile import add_profile_args

    add_profile_args(sub.add_parser("profile", help="kernel, engine and IPC benchmarks"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_main(args)
    from gpu_worker.profile import profile_main

    return profile_main(args)


if __name__ == "__main__":
    sys.exit(main())
