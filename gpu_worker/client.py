"""The scheduler's side of a worker connection: asyncio + zmq.asyncio over ipc's ClientSession.

    async with WorkerClient("ipc:///run/user/1000/npc-ipc/w0.sock") as client:
        streams = await client.submit([Request(prompt=ids, adapters=("vampire.dialogue_style",),
                                               params=talk, request_id="npc-7:turn-3")])
        async for delta in streams[0]:          # ipc Delta: token_id, logprob, finish_reason, step
            ...
        result = await streams[0].result()      # ipc RequestResult: one StepResult per chain step
        results = await client.generate([...])  # submit + wait for every result

Requests are the engine's own types (Request, ChainRequest with OutputRef), so what runs offline runs
remotely unchanged. Liveness: a HEARTBEAT every heartbeat_interval_s; when nothing has come from the worker
for heartbeat_timeout_s, every request in flight fails with WorkerLost (code 504) and the client keeps
offering HELLO on a fresh socket until a worker answers at the same endpoint (a restart), then serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

import zmq

from gpu_worker.chains import ChainRequest, OutputRef
from gpu_worker.grammar import Grammar as EngineGrammar
from gpu_worker.request import Request
from ipc.errors import ErrorCode
from ipc.messages import (
    REPLY_BIT,
    Abort,
    AbortReply,
    AdapterLoad,
    AdapterPin,
    AdapterReply,
    AdapterUnload,
    BatchAck,
    BatchBuilder,
    Delta,
    Goodbye,
    Grammar,
    Heartbeat,
    HelloReply,
    MsgType,
    Part,
    RequestResult,
    Stats,
    Step,
    WarmPrefixReply,
    warm_prefix,
)
from ipc.transport import ClientSession, IpcConfig, async_context, connect_client_socket

log = logging.getLogger(__name__)


class WorkerError(Exception):
    """The worker refused a message or a request (an ERROR reply or a BATCH_ACK rejection)."""

    def __init__(self, code: int, message: str, request_id: str | None = None):
        self.code, self.message, self.request_id = int(code), message, request_id
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = "UNKNOWN_CODE"  # a newer worker's code: still reported
        where = f" (request {request_id!r})" if request_id else ""
        super().__init__(f"{name} ({code}){where}: {message}")


class WorkerLost(WorkerError):
    """The worker stopped answering heartbeats (crashed, killed, hung) or the client is not connected."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(ErrorCode.WORKER_LOST, message, request_id)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: a failed stream nobody awaits must not log a warning


class RequestStream:
    """One request's deltas in order (`async for`), then its RequestResult (`await stream.result()`)."""

    def __init__(self, request_id: str, idle_timeout_s: float | None):
        self.request_id = request_id
        self.idle_timeout_s = idle_timeout_s  # longest wait for the next delta; None: no limit
        self._queue: asyncio.Queue = asyncio.Queue()
        self._result: asyncio.Future = asyncio.get_running_loop().create_future()
        self._result.add_done_callback(_retrieve)

    def push(self, delta: Delta) -> None:
        self._queue.put_nowait(delta)

    def finish(self, result: RequestResult) -> None:
        if not self._result.done():
            self._result.set_result(result)
            self._queue.put_nowait(result)

    def fail(self, error: Exception) -> None:
        if not self._result.done():
            self._result.set_exception(error)
            self._queue.put_nowait(error)

    @property
    def done(self) -> bool:
        return self._result.done()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), self.idle_timeout_s)
            except TimeoutError:
                raise TimeoutError(f"request {self.request_id!r}: no delta within {self.idle_timeout_s} s "
                                   f"(the worker still answers heartbeats)") from None
            if isinstance(item, Delta):
                yield item
            elif isinstance(item, Exception):
                raise item
            else:
                return  # the RequestResult: the stream is complete

    async def result(self, timeout_s: float | None = None) -> RequestResult:
        return await asyncio.wait_for(asyncio.shield(self._result), timeout_s)


# --- engine types to wire batches ---------------------------------------------------------------------------


def _wire_grammar(grammar: EngineGrammar | None) -> Grammar | None:
    return None if grammar is None else Grammar(grammar.kind, grammar.source)


def _parts(builder: BatchBuilder, prompt: list) -> tuple[Part, ...]:
    """A chain step's prompt as parts: each run of literal ids becomes one segment of the batch."""
    parts, run = [], []
    for item in prompt:
        if isinstance(item, OutputRef):
            if run:
                parts.append(Part(segment=builder.segment(run)))
                run = []
            parts.append(Part(output_of=item.step))
        else:
            run.append(item)
    if run:
        parts.append(Part(segment=builder.segment(run)))
    return tuple(parts)


def add_item(builder: BatchBuilder, item: Request | ChainRequest) -> str:
    """Adds a Request or ChainRequest (an id is made when it has none); returns its request_id."""
    rid = item.request_id or uuid.uuid4().hex
    if isinstance(item, Request):
        builder.add(rid, item.prompt, tuple(item.adapters), item.params, item.priority, item.deadline_ms,
                    _wire_grammar(item.grammar))
        return rid
    if not isinstance(item, ChainRequest) or not item.steps:
        raise ValueError(f"expected a Request or a non-empty ChainRequest, got {item!r:.80}")
    first = item.steps[0]
    if any(isinstance(t, OutputRef) for t in first.prompt):
        raise ValueError("ChainRequest.steps[0].prompt cannot refer to an earlier step's output")
    chain = tuple(Step(_parts(builder, s.prompt), tuple(s.adapters), s.params, _wire_grammar(s.grammar))
                  for s in item.steps[1:])
    builder.add(rid, first.prompt, tuple(first.adapters), first.params, item.priority, item.deadline_ms,
                _wire_grammar(first.grammar), chain)
    return rid


# --- the client ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    heartbeat_interval_s: float = 0.1
    heartbeat_timeout_s: float = 0.8  # silence after which in-flight requests fail (within 1 s of a death)
    request_timeout_s: float = 30.0  # control replies (ack, stats, abort, adapter ops)
    connect_timeout_s: float = 30.0  # first HELLO; a worker still loading its model answers late
    stream_idle_timeout_s: float | None = None  # per-delta wait in `async for`; None: heartbeats guard it

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError(f"ClientConfig: need 0 < heartbeat_interval_s < heartbeat_timeout_s, got "
                             f"{self.heartbeat_interval_s}, {self.heartbeat_timeout_s}")
        if self.request_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("ClientConfig.request_timeout_s and connect_timeout_s must be > 0")


class WorkerClient:
    def __init__(self, endpoint: str, ipc: IpcConfig | None = None, config: ClientConfig | None = None,
                 client_id: str = ""):
        self.endpoint = endpoint
        self.ipc = ipc or IpcConfig()
        self.config = config or ClientConfig()
        self.session = ClientSession(self.ipc, client_id or f"client-{uuid.uuid4().hex[:8]}")
        self._ctx = async_context()
        self._socket = None
        self._reader: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._replies: dict[int, tuple[int, asyncio.Future]] = {}  # corr_id -> (reply type, future)
        self._streams: dict[str, RequestStream] = {}
        self._connected = asyncio.Event()
        self._last_heard = 0.0
        self._stream_seq = 0  # last TOKEN_DELTAS / COMPLETIONS sequence number seen
        self._closed = False
        self.counters = {"reconnects": 0, "workers_lost": 0, "stream_gaps": 0}

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def worker(self) -> HelloReply | None:
        return self.session.worker

    async def __aenter__(self) -> WorkerClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- connection -----------------------------------------------------------------------------------

    async def connect(self) -> HelloReply:
        """Says HELLO until a worker answers (TimeoutError after connect_timeout_s); starts heartbeats."""
        deadline = time.monotonic() + self.config.connect_timeout_s
        while not await self._hello(min(1.0, self.config.connect_timeout_s)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no worker answered HELLO at {self.endpoint} within "
                                   f"{self.config.connect_timeout_s} s")
        self._supervisor = asyncio.create_task(self._supervise())
        return self.session.worker

    async def _hello(self, timeout_s: float) -> bool:
        """A fresh socket (dropping whatever a dead worker left queued) and one HELLO; True when answered."""
        self._reset_socket()
        try:
            await self._request(self.session.hello(), timeout_s, require_connected=False)
        except (TimeoutError, WorkerError):
            return False
        self._stream_seq = 0
        self._last_heard = time.monotonic()
        self._connected.set()
        return True

    def _reset_socket(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = connect_client_socket(self.ipc, self.endpoint, self._ctx)
        self._reader = asyncio.create_task(self._read(self._socket))

    async def _supervise(self) -> None:
        """Heartbeats while connected; declares the worker lost after heartbeat_timeout_s of silence; then
        offers HELLO again until a worker answers."""
        cfg, seq = self.config, 0
        while not self._closed:
            await asyncio.sleep(cfg.heartbeat_interval_s)
            if not self.connected:
                if await self._hello(cfg.heartbeat_timeout_s):
                    self.counters["reconnects"] += 1
                    log.info("reconnected to %s (worker %s)", self.endpoint, self.session.worker.worker_id)
                continue
            silent = time.monotonic() - self._last_heard
            if silent > cfg.heartbeat_timeout_s:
                self._lose(f"worker at {self.endpoint} missed heartbeats: nothing heard for {silent:.2f} s")
                continue
            seq += 1
            corr_id, frames = self.session.encode(Heartbeat(seq))
            with contextlib.suppress(zmq.ZMQError):
                await self._socket.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)

    def _lose(self, why: str) -> None:
        """Fails everything in flight with WorkerLost; the supervisor reconnects."""
        self._connected.clear()
        self.counters["workers_lost"] += 1
        self.session.worker_lost()
        log.warning("%s; failing %d requests", why, len(self._streams))
        for rid, stream in list(self._streams.items()):
            stream.fail(WorkerLost(why, rid))
        self._streams.clear()
        for _, future in self._replies.values():
            if not future.done():
                future.set_exception(WorkerLost(why))
        self._replies.clear()

    async def _read(self, socket) -> None:
        while True:
            try:
                frames = await socket.recv_multipart(copy=False)
            except (zmq.ZMQError, asyncio.CancelledError):
                return  # closed or replaced by _reset_socket
            env = self.session.decode(frames)
            if env is None:
                log.warning("bad message from the worker: %s", self.session.last_error)
                continue
            self._last_heard = time.monotonic()
            self._route(env)

    def _route(self, env) -> None:
        kind, msg = env.msg_type, env.msg
        if kind == MsgType.TOKEN_DELTAS or kind == MsgType.COMPLETIONS:
            self._check_seq(env.corr_id)
        if kind == MsgType.TOKEN_DELTAS:
            for delta in msg.deltas:
                stream = self._streams.get(delta.request_id)
                if stream is not None:
                    stream.push(delta)
        elif kind == MsgType.COMPLETIONS:
            for result in msg.results:
                stream = self._streams.pop(result.request_id, None)
                if stream is not None:
                    stream.finish(result)
        else:
            self._resolve(env.corr_id, kind, msg)

    def _resolve(self, corr_id: int, kind: int, msg) -> None:
        expected, future = self._replies.pop(corr_id, (None, None))
        if future is None or future.done():
            return  # a heartbeat reply, or the answer to a request that timed out
        if kind == MsgType.ERROR:
            future.set_exception(WorkerError(msg.code, msg.message, msg.request_id))
        elif kind != expected:
            future.set_exception(WorkerError(ErrorCode.INTERNAL, f"expected type 0x{expected:02x}, got "
                                             f"0x{int(kind):02x}"))
        else:
            future.set_result(msg)

    def _check_seq(self, seq: int) -> None:
        if seq != self._stream_seq + 1:
            self.counters["stream_gaps"] += 1  # the worker dropped messages: our queue was full
            log.warning("stream sequence jumped from %d to %d", self._stream_seq, seq)
        self._stream_seq = seq

    async def _request(self, msg, timeout_s: float | None = None, require_connected: bool = True):
        """Sends a message and awaits its reply; WorkerError on ERROR, TimeoutError without an answer."""
        if require_connected and not self.connected:
            raise WorkerLost(f"not connected to a worker at {self.endpoint}")
        return await self._exchange(msg.TYPE, self.session.encode(msg), timeout_s)

    async def _exchange(self, msg_type: int, encoded: tuple[int, list], timeout_s: float | None):
        corr_id, frames = encoded
        future = asyncio.get_running_loop().create_future()
        self._replies[corr_id] = (msg_type | REPLY_BIT, future)
        await self._socket.send_multipart(frames, copy=False)
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no reply to {MsgType(msg_type).name} within {timeout_s} s from "
                               f"{self.endpoint}") from None
        finally:
            self._replies.pop(corr_id, None)

    # --- requests -------------------------------------------------------------------------------------

    async def submit(self, items: list[Request | ChainRequest], timeout_s: float | None = None
                     ) -> list[RequestStream]:
        """Sends one batch; returns a stream per item, in order. A request the worker rejected has a stream
        that fails with its WorkerError; a batch refused as a whole raises WorkerError here."""
        builder = BatchBuilder()
        ids = [add_item(builder, item) for item in items]
        streams = [RequestStream(rid, self.config.stream_idle_timeout_s) for rid in ids]
        for stream in streams:  # before sending: deltas may follow the ack immediately
            self._streams[stream.request_id] = stream
        try:
            if not self.connected:
                raise WorkerLost(f"not connected to a worker at {self.endpoint}")
            # The tokens are packed straight into a ring slot when the worker mapped our ring.
            ack: BatchAck = await self._exchange(MsgType.SUBMIT_BATCH, self.session.encode_batch(builder),
                                                 timeout_s)
        except BaseException:
            for rid in ids:
                self._streams.pop(rid, None)
            raise
        for rejection in ack.rejected:
            stream = self._streams.pop(rejection.request_id, None)
            if stream is not None:
                stream.fail(WorkerError(rejection.code, rejection.message, rejection.request_id))
        return streams

    async def stream(self, item: Request | ChainRequest) -> AsyncIterator[Delta]:
        """The deltas of one request (`async for delta in client.stream(request)`)."""
        (stream,) = await self.submit([item])
        async for delta in stream:
            yield delta

    async def generate(self, items: list[Request | ChainRequest], timeout_s: float | None = None
                       ) -> list[RequestResult]:
        """Submits and waits for every result (raises the first request's error, if any failed)."""
        streams = await self.submit(items)
        return [await s.result(timeout_s) for s in streams]

    async def abort(self, request_ids: list[str]) -> AbortReply:
        return await self._request(Abort(tuple(request_ids)))

    async def load_adapter(self, name: str, path: str | None = None, pin: bool = False,
                           timeout_s: float | None = None) -> AdapterReply:
        """Answered once the adapter is loaded (off the worker's hot path); WorkerError if it cannot be."""
        return await self._request(AdapterLoad(name, path, pin), timeout_s)

    async def unload_adapter(self, name: str) -> AdapterReply:
        return await self._request(AdapterUnload(name))

    async def pin_adapter(self, name: str, pinned: bool = True) -> AdapterReply:
        return await self._request(AdapterPin(name, pinned))

    async def warm_prefix(self, prefixes: list[tuple[list[int], tuple[str, ...]]],
                          timeout_s: float | None = None) -> WarmPrefixReply:
        """Prefills (tokens, adapter stack) pairs into the worker's prefix cache."""
        return await self._request(warm_prefix(prefixes), timeout_s)

    async def stats(self) -> dict:
        return (await self._request(Stats())).stats

    async def close(self) -> None:
        """GOODBYE (best effort), then closes; requests still in flight fail with WorkerError."""
        if self._closed:
            return
        self._closed = True
        for task in (self._supervisor, self._reader):
            if task is not None:
                task.cancel()
        if self._socket is not None:
            if self.connected:
                with contextlib.suppress(zmq.ZMQError):
                    await self._socket.send_multipart(self.session.encode(Goodbye())[1], flags=zmq.NOBLOCK)
            self._socket.close(linger=100 if self.connected else 0)
        self._connected.clear()
        for rid, stream in list(self._streams.items()):
            stream.fail(WorkerError(ErrorCode.INTERNAL, "the client was closed", rid))
        self._streams.clear()
        self.session.close()
