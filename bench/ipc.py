"""IPC round trip of a packed batch: ZeroMQ + shared memory vs inline frames vs pickle, in one run.

    python -m bench.ipc            # rich table
    python -m bench.ipc --json     # one JSON object on the last line of stdout
    python -m bench.ipc --quick    # fewer round trips, a smoke run

A peer process (spawned: it shares nothing with the client but the sockets and the segment) serves a
WorkerEndpoint and a plain ROUTER. The scheduler collects requests during its batching window and sends
when the window closes, so each mode gathers the 64 requests (64 x 512 tokens, ids, 3-adapter stacks,
SamplingParams, priority, deadline; prompts as int32 arrays) before the clock starts, and every round trip
is timed on the client from the window's close to holding the decoded reply:
  shm           BatchBuilder packs the gathered requests (one int32 token array + offsets, columns,
                tables), the tokens straight into a slot of the client's shared-memory ring, the metadata
                into a msgpack frame. The peer checks every field (token ids against the vocabulary, slot
                generation, xor64 checksum), views the tokens without copying, reads each prompt's last
                token (one vectorized read of the packed array) and answers BATCH_ACK.
  inline        the same, the tokens in a payload frame sent without copying (what a remote worker gets).
  pickle        the same requests as the engine's own `Request` objects (prompt: list[int], as the engine
                API and tokenizers hand them over, and as pickle-based servers send them) pickled (protocol
                5) into one frame; the peer unpickles, reads each prompt's last token, answers a 3-byte ack.
  pickle_numpy  the same fields with the prompts as int32 arrays, pickled likewise: the strongest baseline
                (numpy arrays pickle as one memcpy each).
The pickle peers check nothing, so both baselines do less work than the protocol. All modes alternate
round by round, so load drift on a shared machine hits all of them alike; `load_avg_1m` records how busy
the machine was (on 2 cores, other work shows in every percentile). Both processes gc.freeze() after
set-up, as a long-running server would: the ~170k objects torch brings are then never re-scanned.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import pickle
import time
from dataclasses import asdict, dataclass

import numpy as np
import zmq

from bench.common import emit, log, parse_args, percentile
from gpu_worker import Request, SamplingParams
from ipc.messages import BatchAck, BatchBuilder, Limits, MsgType
from ipc.transport import ClientEndpoint, IpcConfig, WorkerEndpoint, bind_worker_socket, connect_client_socket

TARGETS = {"roundtrip_p99_us": "<= 1000", "speedup_vs_pickle": ">= 1.5"}
MODES = ("shm", "inline", "pickle", "pickle_numpy")


@dataclass(frozen=True)
class Sizes:
    num_requests: int = 64
    prompt_len: int = 512
    vocab_size: int = 32000
    warmup: int = 200  # round trips per mode before timing
    round_trips: int = 3000  # timed round trips per mode


QUICK = Sizes(warmup=50, round_trips=300)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    sizes = QUICK if args.quick else Sizes()
    config = IpcConfig(limits=Limits(vocab_size=sizes.vocab_size))
    requests = make_requests(sizes, np.random.default_rng(0))
    with Peer(config) as peer:
        seconds, shapes = run_round_trips(config, peer, requests, sizes)
    result = summarize(seconds) | shapes | asdict(sizes)
    result |= {"load_avg_1m": os.getloadavg()[0], "targets": TARGETS}
    emit(result, args, title="bench.ipc (packed batch round trip, one host)")
    return result


@dataclass(frozen=True)
class Item:
    """One request as the scheduler holds it just before sending."""

    request_id: str
    adapters: tuple[str, ...]
    params: SamplingParams
    priority: int
    deadline_ms: float
    prompt: np.ndarray  # int32 [prompt_len]


def make_requests(sizes: Sizes, rng: np.random.Generator) -> list[Item]:
    """Gold and Silver NPCs of two archetypes: per-NPC stacks, two sampling settings per tier."""
    settings = [SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, stop_token_ids=(2,), logprobs=True),
                SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=(2,))]
    archetypes = ("vampire", "werewolf")
    items = []
    for i in range(sizes.num_requests):
        archetype = archetypes[i % 2]
        stack = (f"{archetype}.dialogue_style", f"{archetype}.sub.clan_{i % 3}", f"npc.{i}.dialogue_style")
        items.append(Item(f"npc-{i}:turn-7", stack, settings[i % 2], i % 2, 150.0 if i % 2 == 0 else 250.0,
                          rng.integers(0, sizes.vocab_size, sizes.prompt_len, dtype=np.int32)))
    return items


def engine_requests(items: list[Item]) -> list[Request]:
    return [Request(prompt=r.prompt.tolist(), adapters=r.adapters, params=r.params, request_id=r.request_id,
                    priority=r.priority, deadline_ms=r.deadline_ms) for r in items]


def gather(requests: list[Item]) -> BatchBuilder:
    """The requests added one by one, as the scheduler does while its batching window is open."""
    builder = BatchBuilder()
    for r in requests:
        builder.add(r.request_id, r.prompt, r.adapters, r.params, r.priority, r.deadline_ms)
    return builder


# --- the peer process -------------------------------------------------------------------------------------


class Peer:
    """The worker side in a spawned process: a WorkerEndpoint and a plain ROUTER for the pickle baseline."""

    def __init__(self, config: IpcConfig):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_peer_main, args=(config, child), daemon=True)

    def __enter__(self) -> Peer:
        self._process.start()
        if not self._conn.poll(120):
            raise RuntimeError("the peer process did not start")
        self.endpoint, self.pickle_endpoint = self._conn.recv()
        return self

    def __exit__(self, *exc) -> None:
        self._conn.send("stop")
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


def _peer_main(config: IpcConfig, conn) -> None:
    endpoint = WorkerEndpoint(config, "bench-peer")
    plain, plain_address = bind_worker_socket(dataclasses.replace(config, endpoint=None))
    conn.send((endpoint.endpoint, plain_address))
    gc.freeze()
    poller = zmq.Poller()
    poller.register(endpoint.socket, zmq.POLLIN)
    poller.register(plain, zmq.POLLIN)
    while not conn.poll():
        events = dict(poller.poll(100))
        if endpoint.socket in events:
            _answer_protocol(endpoint)
        if plain in events:
            _answer_pickle(plain)
    endpoint.close()
    plain.close(linger=0)


def _answer_protocol(endpoint: WorkerEndpoint) -> None:
    incoming = endpoint.recv(timeout_ms=0)  # HELLO is answered inside; None: nothing valid queued
    if incoming is None or incoming.msg_type != MsgType.SUBMIT_BATCH:
        return
    batch = incoming.msg
    last = batch.tokens[batch.offsets[1:] - 1]  # every segment's last token, read in place
    endpoint.reply(incoming, BatchAck(accepted=len(batch) if last.min() >= 0 else 0))


def _answer_pickle(plain: zmq.Socket) -> None:
    peer, payload = plain.recv_multipart(copy=False)
    requests = pickle.loads(payload.buffer)  # our own bytes, from our own client: a baseline only
    last = sum(int(r.prompt[-1]) for r in requests)
    plain.send_multipart([peer.bytes, b"ack" if last >= 0 else b"nak"])


# --- the client side --------------------------------------------------------------------------------------


def run_round_trips(config: IpcConfig, peer: Peer, requests: list[Item], sizes: Sizes):
    """Seconds of each timed round trip per mode, and the sizes of what went over the wire."""
    shm = ClientEndpoint(config, peer.endpoint, "bench-shm")
    inline = ClientEndpoint(dataclasses.replace(config, transport="inline"), peer.endpoint, "bench-inline")
    plain = connect_client_socket(config, peer.pickle_endpoint)
    try:
        if not shm.connect().ring_mapped:
            raise RuntimeError("the peer did not map the client's ring")
        inline.connect()
        as_engine, builder = engine_requests(requests), gather(requests)
        trips = {"shm": lambda: _protocol_trip(shm, builder),
                 "inline": lambda: _protocol_trip(inline, builder),
                 "pickle": lambda: _pickle_trip(plain, as_engine),
                 "pickle_numpy": lambda: _pickle_trip(plain, requests)}
        log(f"ipc: {sizes.warmup} warm-up + {sizes.round_trips} timed round trips per mode")
        gc.freeze()
        seconds = {mode: [] for mode in MODES}
        for i in range(sizes.warmup + sizes.round_trips):
            for mode in MODES:
                elapsed = trips[mode]()
                if i >= sizes.warmup:
                    seconds[mode].append(elapsed)
        if shm.session.counters["inline_fallback"]:
            raise RuntimeError("some shm round trips fell back to inline frames (ring full)")
        return seconds, _wire_shapes(requests)
    finally:
        shm.close()
        inline.close()
        plain.close(linger=0)


def _protocol_trip(client: ClientEndpoint, builder: BatchBuilder) -> float:
    start = time.perf_counter()
    reply = client.wait_for(client.send_batch(builder), MsgType.SUBMIT_BATCH, timeout_ms=10_000)
    elapsed = time.perf_counter() - start
    if reply.msg_type != MsgType.BATCH_ACK or reply.msg.accepted != len(builder):
        raise RuntimeError(f"unexpected reply {reply}")
    return elapsed


def _pickle_trip(sock: zmq.Socket, requests: list) -> float:
    start = time.perf_counter()
    sock.send(pickle.dumps(requests, protocol=5), copy=False)
    reply = sock.recv()
    elapsed = time.perf_counter() - start
    if reply != b"ack":
        raise RuntimeError(f"unexpected reply {reply!r}")
    return elapsed


def _wire_shapes(requests: list[Item]) -> dict:
    from ipc.frames import encode_frames

    frames, _ = encode_frames(gather(requests).build(), 1)
    return {"meta_bytes": len(frames[1]), "token_bytes": sum(f.nbytes for f in frames[2:]),
            "pickle_bytes": len(pickle.dumps(engine_requests(requests), protocol=5)),
            "pickle_numpy_bytes": len(pickle.dumps(requests, protocol=5))}


def summarize(seconds: dict[str, list[float]]) -> dict:
    def us(mode: str, q: float) -> float:
        return percentile(seconds[mode], q) * 1e6

    return {"roundtrip_p50_us": us("shm", 50), "roundtrip_p99_us": us("shm", 99),
            "inline_p50_us": us("inline", 50), "inline_p99_us": us("inline", 99),
            "pickle_p50_us": us("pickle", 50), "pickle_p99_us": us("pickle", 99),
            "pickle_numpy_p50_us": us("pickle_numpy", 50), "pickle_numpy_p99_us": us("pickle_numpy", 99),
            "speedup_vs_pickle": us("pickle", 99) / us("shm", 99),
            "speedup_vs_pickle_p50": us("pickle", 50) / us("shm", 50),
            "speedup_vs_pickle_numpy": us("pickle_numpy", 99) / us("shm", 99)}


if __name__ == "__main__":
    main()
