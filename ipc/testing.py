"""A worker without an engine, for tests and benchmarks of the transport (the real one is gpu_worker.worker).

It answers every client message over a real WorkerEndpoint: BATCH_ACK for a batch and, with echo=True,
COMPLETIONS whose tokens are each request's prompt (so a client can check what arrived); STATS with the
endpoint's counters; HEARTBEAT, ABORT, ADAPTER_* and WARM_PREFIX with plausible replies.

    config = IpcConfig().with_limits(vocab_size=1000)
    with StubWorker(config) as stub, ClientEndpoint(config, stub.endpoint) as client:
        client.connect()
        client.request(batch)  # BATCH_ACK; then client.recv() gives the COMPLETIONS
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np

from ipc.messages import (
    AbortReply,
    AdapterLoadReply,
    AdapterPinReply,
    AdapterUnloadReply,
    BatchAck,
    Completions,
    HeartbeatReply,
    MsgType,
    RequestResult,
    StatsReply,
    StepResult,
    WarmPrefixReply,
)
from ipc.transport import Incoming, IpcConfig, WorkerEndpoint


class StubWorker:
    """Serves one WorkerEndpoint in a background thread (the sockets live and die in that thread)."""

    def __init__(self, config: IpcConfig, worker_id: str = "stub", echo: bool = True):
        self.config, self.worker_id, self.echo = config, worker_id, echo
        self.handled: Counter[str] = Counter()  # valid messages, by type name
        self.counters: dict = {}  # the endpoint's counters, final once stopped
        self.endpoint = ""
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ipc-stub-worker", daemon=True)

    def start(self) -> StubWorker:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    @property
    def error(self) -> BaseException | None:
        """What stopped the serving thread, if anything did."""
        return self._error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._thread.is_alive():
            raise TimeoutError("the stub worker's thread did not stop within 10 s")
        if self._error is not None:
            raise self._error

    def __enter__(self) -> StubWorker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            endpoint = WorkerEndpoint(self.config, self.worker_id)
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            return
        self.endpoint = endpoint.endpoint
        self._ready.set()
        try:
            serve(endpoint, self._stop, self.handled, self.echo)
        except BaseException as e:  # reported by stop(): recv must never raise for anything a peer sends
            self._error = e
        finally:
            self.counters = endpoint.counters()
            endpoint.close()


def serve(endpoint: WorkerEndpoint, stop: threading.Event, handled: Counter, echo: bool = True) -> None:
    """The stub's receive loop: answers until `stop` is set."""
    while not stop.is_set():
        incoming = endpoint.recv(timeout_ms=20)
        if incoming is not None:
            handled[incoming.msg_type.name] += 1
            respond(endpoint, incoming, echo)


def respond(endpoint: WorkerEndpoint, incoming: Incoming, echo: bool = True) -> None:
    msg, kind = incoming.msg, incoming.msg_type
    if kind == MsgType.SUBMIT_BATCH:
        # The prompts are copied out before the ack: the ack hands the ring slot back to the client.
        results = [RequestResult(rid, "length", (StepResult(tuple(msg.prompt_tokens(i).tolist())),))
                   for i, rid in enumerate(msg.request_id)] if echo else []
        endpoint.reply(incoming, BatchAck(accepted=len(msg)))
        if results:
            endpoint.send(incoming.peer, Completions(tuple(results)))
        return
    replies = {
        MsgType.ABORT: lambda: AbortReply(unknown=msg.request_ids),
        MsgType.ADAPTER_LOAD: lambda: AdapterLoadReply(msg.name, True, msg.pin),
        MsgType.ADAPTER_UNLOAD: lambda: AdapterUnloadReply(msg.name, False, False),
        MsgType.ADAPTER_PIN: lambda: AdapterPinReply(msg.name, True, msg.pinned),
        MsgType.WARM_PREFIX: lambda: WarmPrefixReply(tuple(np.diff(msg.offsets).tolist())),
        MsgType.STATS: lambda: StatsReply(endpoint.counters()),
        MsgType.HEARTBEAT: lambda: HeartbeatReply(msg.seq, endpoint.worker_id),
    }
    if kind in replies:
        endpoint.reply(incoming, replies[kind]())


def stub_process_main(config: IpcConfig, conn) -> None:
    """Entry point of a stub worker in its own (spawned) process: sends back its endpoint, then serves
    until anything arrives on `conn`, then sends back its counters."""
    stub = StubWorker(config, worker_id="stub-process").start()
    conn.send(stub.endpoint)
    conn.recv()
    try:
        stub.stop()
    finally:  # the parent waits for this answer, even when the stub failed
        conn.send(stub.counters | {"handled": dict(stub.handled), "error": repr(stub.error)})
