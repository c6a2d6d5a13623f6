"""The IPC transport: every message round trip, packed batches over real ZeroMQ sockets through shared memory
(zero-copy views) and inline frames, stale / forged ring references, permissions, CURVE, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import stat
import tempfile

import msgpack
import numpy as np
import pytest
import zmq

from gpu_worker import Request, SamplingParams
from ipc.errors import ErrorCode, ProtocolError
from ipc.frames import decode_frames, encode_frames
from ipc.messages import (
    CLIENT_TYPES,
    HEADER,
    MAGIC,
    MESSAGES,
    WORKER_TYPES,
    Abort,
    AbortReply,
    AdapterLoad,
    AdapterLoadReply,
    AdapterPin,
    AdapterPinReply,
    AdapterUnload,
    AdapterUnloadReply,
    BatchAck,
    BatchBuilder,
    Completions,
    Delta,
    Error,
    Goodbye,
    GoodbyeReply,
    Grammar,
    Header,
    Heartbeat,
    HeartbeatReply,
    Hello,
    HelloReply,
    Limits,
    MsgType,
    Part,
    Rejection,
    RequestResult,
    RequestSpec,
    RingInfo,
    Stats,
    StatsReply,
    Step,
    StepResult,
    SubmitBatch,
    TokenDeltas,
    WarmPrefix,
    WarmPrefixReply,
    decode,
    encode,
    pack_meta,
    unpack_meta,
    warm_prefix,
)
from ipc.shm_ring import RingError, RingReader, RingWriter
from ipc.testing import StubWorker, stub_process_main
from ipc.transport import (
    ClientEndpoint,
    ClientSession,
    CurveKeys,
    IpcConfig,
    WorkerEndpoint,
    async_context,
    connect_client_socket,
    ensure_private_dir,
)

VOCAB = 1000
LIMITS = Limits(vocab_size=VOCAB)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(7,), stop=("\n",), logprobs=True)
SAMPLED = SamplingParams(max_tokens=32, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=1234,
                         repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=-0.5,
                         ignore_eos=True)


@pytest.fixture
def ipc_dir():
    # Short paths: an ipc:// path must fit a Unix socket address (107 bytes); pytest's tmp_path may not.
    path = tempfile.mkdtemp(prefix="ipc-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def config(ipc_dir):
    return IpcConfig(endpoint_dir=os.path.join(ipc_dir, "ep"), limits=LIMITS)


@pytest.fixture
def stub(config):
    with StubWorker(config) as worker:
        yield worker


@contextlib.contextmanager
def connected(config: IpcConfig, endpoint: str, **kwargs):
    client = ClientEndpoint(config, endpoint, **kwargs)
    try:
        client.connect(timeout_ms=5000)
        yield client
    finally:
        client.close()


def sample_batch(rng: np.random.Generator | None = None, n: int = 3) -> SubmitBatch:
    """Requests with every feature: stacks, two sampling settings, priority, deadline, grammar, a chain."""
    rng = rng or np.random.default_rng(0)
    builder = BatchBuilder()
    for i in range(n):
        builder.add(f"npc-{i}:turn-1", rng.integers(0, VOCAB, 5 + 3 * i),
                    ("vampire.dialogue_style", f"npc.{i}"), GREEDY if i % 2 else SAMPLED, priority=i % 2,
                    deadline_ms=150.0 if i else None)
    instruction = builder.segment([5, 6, 7])
    builder.add("npc-9:act", [1, 2, 3], ("vampire.action_policy",), GREEDY,
                grammar=Grammar("json_schema", '{"type": "object"}'),
                chain=(Step((Part(segment=0), Part(output_of=0), Part(segment=instruction)),
                            ("vampire.personality",), SAMPLED, Grammar("ebnf", 'root ::= "yes" | "no"')),
                       Step((Part(output_of=1),))))
    return builder.build()


def assert_same_batch(a: SubmitBatch, b: SubmitBatch) -> None:
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)
    for f in dataclasses.fields(SubmitBatch):
        if f.name not in ("tokens", "offsets"):
            assert getattr(a, f.name) == getattr(b, f.name), f.name


SAMPLES = [
    Hello("scheduler-1", RingInfo("npc-ipc-1-abc", 8, 4096)),
    HelloReply("w0", (1,), True, None, VOCAB, 4096, LIMITS.to_wire()),
    BatchAck(2, (Rejection("npc-3", int(ErrorCode.UNKNOWN_ADAPTER), "unknown adapter 'x'"),)),
    Abort(("npc-1", "npc-2")), AbortReply(("npc-1",), ("npc-2",)),
    AdapterLoad("vampire.dialogue_style", "/adapters/vampire/dialogue_style", pin=True),
    AdapterLoadReply("vampire.dialogue_style", True, True),
    AdapterUnload("npc.7"), AdapterUnloadReply("npc.7", False, False),
    AdapterPin("npc.7", pinned=False), AdapterPinReply("npc.7", True, False),
    WarmPrefixReply((16, 0)), Stats(),
    StatsReply({"running": 3, "prefix_by_stack": {"a+b": {"hit_rate": 0.5}}, "adapters": None}),
    Heartbeat(2**63 + 5), HeartbeatReply(7, "w0", 3, 1, draining=True), Goodbye(), GoodbyeReply(),
    TokenDeltas((Delta("npc-1", 42, -0.25), Delta("npc-2", None, None, "deadline"),
                 Delta("npc-3", 9, float("-inf"), "stop", step=2),
                 Delta("npc-4", None, None, "error", "boom"))),
    Completions((RequestResult("npc-1", "stop", (StepResult((1, 2, 3), (-0.1, -0.2, -0.3), "stop", 16, 3),
                                                 StepResult((4,), None, "length", 0, "\n"))),
                 RequestResult("npc-2", "error", (), "out of KV blocks"))),
    Error(int(ErrorCode.BAD_FIELD), "request_id[0]: bad", "npc-1", int(MsgType.SUBMIT_BATCH)),
]


def all_samples() -> list:
    return [*SAMPLES, sample_batch(), warm_prefix([([1, 2, 3], ("vampire.dialogue_style",)), ([4, 5], ())])]


def same_message(a, b) -> bool:
    if isinstance(a, SubmitBatch):
        assert_same_batch(a, b)
        return True
    if isinstance(a, WarmPrefix):
        return (np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)
                and (a.stack, a.stack_table) == (b.stack, b.stack_table))
    return a == b


def test_samples_cover_every_message_type():
    assert {type(m).TYPE for m in all_samples()} == set(MsgType) == set(MESSAGES)


@pytest.mark.parametrize("msg", all_samples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    body, arrays = encode(msg)
    assert same_message(msg, decode(type(msg).TYPE, unpack_meta(pack_meta(body)), arrays, LIMITS))
    accept = CLIENT_TYPES if type(msg).TYPE in CLIENT_TYPES else WORKER_TYPES
    frames, _ = encode_frames(msg, 77)
    envelope = decode_frames(frames, LIMITS, accept)
    assert (envelope.msg_type, envelope.corr_id) == (type(msg).TYPE, 77)
    assert same_message(msg, envelope.msg)


@pytest.mark.parametrize("msg", [sample_batch(), warm_prefix([([1, 2, 3], ("a.b",))])], ids=["batch", "warm"])
def test_arrays_round_trip_through_the_ring(msg):
    writer = RingWriter(2, 4096)
    reader = RingReader(writer.name, 2, 4096)
    try:
        frames, slot = encode_frames(msg, 5, writer)
        assert slot is not None and len(frames) == 2  # no payload frames: the arrays are in the slot
        envelope = decode_frames(frames, LIMITS, CLIENT_TYPES, reader)
        assert envelope.slot == slot and same_message(msg, envelope.msg)
        assert np.shares_memory(envelope.msg.tokens, reader.buffer)
    finally:
        writer.close()
        reader.close()


def test_batch_built_in_a_reserved_slot_is_not_copied():
    writer = RingWriter(2, 4096)
    reader = RingReader(writer.name, 2, 4096)
    try:
        builder = BatchBuilder()
        builder.add("a", [1, 2, 3])
        builder.add("b", [4, 5])
        views = writer.reserve([4 * builder.num_tokens, 4 * (builder.num_segments + 1)])
        batch = builder.build(tokens_out=views[0].view(np.int32))
        assert np.shares_memory(batch.tokens, writer.buffer)
        frames, slot = encode_frames(batch, 1, writer)
        assert writer.free_slots == 1 and np.shares_memory(views[0], writer.buffer[128 + slot.slot * 4160:])
        assert decode_frames(frames, LIMITS, CLIENT_TYPES, reader).msg.prompt_tokens(1).tolist() == [4, 5]
        writer.release(slot.slot)
        writer.reserve([8])  # reserved, then not used: the next write takes another slot and frees it
        _, other = encode_frames(sample_batch(), 2, writer)
        assert writer.free_slots == 1 and other is not None
    finally:
        writer.close()
        reader.close()


def test_batch_reads_back_as_engine_requests():
    batch = sample_batch()
    spec = batch.spec(3)
    assert spec.request_id == "npc-9:act" and spec.adapters == ("vampire.action_policy",)
    assert spec.grammar == Grammar("json_schema", '{"type": "object"}')
    assert [s.adapters for s in spec.chain] == [("vampire.personality",), ()]
    assert spec.chain[0].params == SAMPLED and spec.chain[1].params == SamplingParams()
    assert batch.segment(spec.chain[0].parts[2].segment).tolist() == [5, 6, 7]
    assert batch.engine_request(1) == Request(prompt=batch.prompt_tokens(1).tolist(),
                                              adapters=("vampire.dialogue_style", "npc.1"), params=GREEDY,
                                              request_id="npc-1:turn-1", priority=1, deadline_ms=150.0)
    builder = BatchBuilder()
    builder.add_request(batch.engine_request(1))
    assert builder.build().engine_request(0) == batch.engine_request(1)


def test_default_columns_are_sent_empty():
    builder = BatchBuilder()
    builder.add("a", [1, 2])
    builder.add("b", [3])
    batch = builder.build()
    body, _ = encode(batch)
    assert set(body) == {"request_id", "prompt"}  # every other field at its default
    assert batch.spec(1) == RequestSpec("b", 1)


def test_builder_refuses_ids_int32_cannot_hold():
    with pytest.raises(ValueError, match="int32"):
        BatchBuilder().add("a", np.array([2**32 + 5]))  # would wrap around to 5
    assert BatchBuilder().segment([1, 2]) == 0


# --- over real sockets ------------------------------------------------------------------------------------


def test_packed_batch_through_shared_memory_is_zero_copy(config):
    batch = sample_batch()
    with WorkerEndpoint(config, "w0") as worker, ClientEndpoint(config, worker.endpoint) as client:
        client.send(client.session.hello())
        assert worker.recv(timeout_ms=5000).msg_type == MsgType.HELLO  # answered inside recv
        assert client.recv(timeout_ms=5000).msg.ring_mapped and client.session.shm
        corr_id = client.send(batch)
        incoming = worker.recv(timeout_ms=5000)
        assert incoming.corr_id == corr_id and incoming.slot is not None
        ring = worker.ring(incoming.peer)
        for array in (incoming.msg.tokens, incoming.msg.offsets, incoming.msg.prompt_tokens(2)):
            assert np.shares_memory(array, ring.buffer) and not array.flags.writeable
        assert_same_batch(batch, incoming.msg)
        assert client.session.ring.free_slots == config.ring_slots - 1  # lent until the reply
        assert worker.is_current(incoming)
        worker.reply(incoming, BatchAck(len(batch)))
        reply = client.recv(timeout_ms=5000)
        assert reply.msg == BatchAck(4) and reply.corr_id == corr_id
        assert client.session.ring.free_slots == config.ring_slots


def test_inline_frames_give_the_same_batch(config):
    batch = sample_batch()
    inline = dataclasses.replace(config, transport="inline")
    with WorkerEndpoint(config, "w0") as worker, ClientEndpoint(inline, worker.endpoint) as client:
        client.send(client.session.hello())
        worker.recv(timeout_ms=5000)
        assert not client.recv(timeout_ms=5000).msg.ring_mapped and client.session.ring is None
        client.send(batch)
        incoming = worker.recv(timeout_ms=5000)
        assert incoming.slot is None and worker.ring(incoming.peer) is None
        assert_same_batch(batch, incoming.msg)


def echo_round_trip(client: ClientEndpoint, batch: SubmitBatch | BatchBuilder) -> dict[str, tuple[int, ...]]:
    """Sends a batch (or a builder's, packed straight into the ring) to a stub worker; returns each
    request's echoed tokens."""
    corr_id = client.send(batch) if isinstance(batch, SubmitBatch) else client.send_batch(batch)
    assert client.wait_for(corr_id, MsgType.SUBMIT_BATCH).msg == BatchAck(len(batch))
    results = client.recv(timeout_ms=5000).msg.results
    return {r.request_id: r.steps[0].token_ids for r in results}


def test_stub_worker_echoes_the_same_prompts_by_shm_and_inline(config, stub):
    batch = sample_batch(n=16)
    expected = {rid: tuple(batch.prompt_tokens(i).tolist()) for i, rid in enumerate(batch.request_id)}
    with connected(config, stub.endpoint) as shm_client:
        assert shm_client.session.shm
        assert echo_round_trip(shm_client, batch) == expected
        assert shm_client.session.counters["inline_fallback"] == 0
    with connected(dataclasses.replace(config, transport="inline"), stub.endpoint) as inline_client:
        assert not inline_client.session.shm
        assert echo_round_trip(inline_client, batch) == expected


@pytest.mark.timeout(240)
def test_worker_in_another_process_maps_the_ring(config):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=stub_process_main, args=(config, child), daemon=True)
    process.start()
    child.close()  # the child's end lives in the child alone: its exit shows here as EOF, not a hang
    try:
        assert parent.poll(120), "the worker process did not start"
        endpoint = parent.recv()
        batch = sample_batch(np.random.default_rng(1), n=64)
        with connected(config, endpoint) as client:
            assert client.session.shm and not os.path.exists(client.session.ring.path)  # unlinked once mapped
            builder = BatchBuilder()
            for i, rid in enumerate(batch.request_id):
                builder.add(rid, batch.prompt_tokens(i))
            for k in range(3 * config.ring_slots):  # slots come back with every reply
                echoed = echo_round_trip(client, batch if k % 2 else builder)
            assert echoed == {rid: tuple(batch.prompt_tokens(i).tolist())
                              for i, rid in enumerate(batch.request_id)}
            assert client.session.counters["inline_fallback"] == 0
        parent.send("stop")
        assert parent.poll(30), "the worker process did not stop"
        counters = parent.recv()
        assert counters["error"] == "None"
        assert counters["handled"]["SUBMIT_BATCH"] == 3 * config.ring_slots and not counters["errors"]
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()


def test_a_ring_the_worker_cannot_map_falls_back_to_inline(config, ipc_dir):
    # As if the worker were on another host: it looks for segments in another directory.
    elsewhere = os.path.join(ipc_dir, "other-shm")
    os.mkdir(elsewhere)
    with StubWorker(dataclasses.replace(config, shm_dir=elsewhere)) as remote:
        client = ClientEndpoint(config, remote.endpoint)
        try:
            reply = client.connect()
            assert not reply.ring_mapped and "cannot open segment" in reply.ring_error
            assert not client.session.shm and client.session.ring is None
            batch = sample_batch()
            assert echo_round_trip(client, batch)["npc-9:act"] == (1, 2, 3)
        finally:
            client.close()


def test_ring_full_sends_inline(config, stub):
    one_slot = dataclasses.replace(config, ring_slots=1)
    with connected(one_slot, stub.endpoint) as client:
        batch = sample_batch()
        first, second = client.send(batch), client.send(batch)
        replies = [client.recv(timeout_ms=5000) for _ in range(4)]  # two acks, two completions
        assert {r.corr_id for r in replies if r.msg_type == MsgType.BATCH_ACK} == {first, second}
        assert client.session.counters["inline_fallback"] == 1
        assert client.session.ring.free_slots == 1


def test_an_asyncio_client_shares_the_session(config, stub):
    """What the scheduler's asyncio client does: a ClientSession around a zmq.asyncio DEALER."""

    async def run():
        session = ClientSession(config, "async")
        sock = connect_client_socket(config, stub.endpoint, async_context())

        async def exchange(msg):
            corr_id, frames = session.encode(msg)
            await sock.send_multipart(frames, copy=False)
            while True:
                envelope = session.decode(await sock.recv_multipart(copy=False))
                if envelope is not None and envelope.corr_id == corr_id:
                    return envelope

        try:
            assert (await asyncio.wait_for(exchange(session.hello()), 5)).msg.ring_mapped
            batch = sample_batch()
            assert (await asyncio.wait_for(exchange(batch), 5)).msg == BatchAck(len(batch))
            assert session.ring.free_slots == config.ring_slots
        finally:
            sock.close(linger=0)
            session.close()

    asyncio.run(run())


def test_stream_messages_carry_a_sequence_number(config):
    with WorkerEndpoint(config) as worker, ClientEndpoint(config, worker.endpoint) as client:
        client.send(Heartbeat(1))
        peer = worker.recv(timeout_ms=5000).peer
        for _ in range(3):
            worker.send(peer, TokenDeltas((Delta("npc-1", 5),)))
        assert [client.recv(timeout_ms=5000).corr_id for _ in range(3)] == [1, 2, 3]
        assert not worker.send(b"nobody", Goodbye()) and worker.dropped["peer_gone"] == 1


# --- stale and forged ring references ---------------------------------------------------------------------


@pytest.fixture
def ring_pair():
    writer = RingWriter(4, 4096)
    reader = RingReader(writer.name, 4, 4096)
    yield writer, reader
    writer.close()
    reader.close()


def refs(frames: list, mutate) -> list:
    """The frames with the metadata map changed by mutate(body) and the header fixed to match."""
    body = msgpack.unpackb(frames[1])
    mutate(body)
    meta = msgpack.packb(body)
    header = Header.parse(frames[0])
    return [dataclasses.replace(header, meta_len=len(meta)).pack(), meta, *frames[2:]]


def test_stale_generation_is_rejected(ring_pair):
    writer, reader = ring_pair
    batch = sample_batch()
    old_frames, old_slot = encode_frames(batch, 1, writer)
    decode_frames(old_frames, LIMITS, CLIENT_TYPES, reader)
    writer.release(old_slot.slot)
    for _ in range(writer.slots):  # reuse every slot, the old one included
        _, slot = encode_frames(batch, 2, writer)
        writer.release(slot.slot)
    with pytest.raises(ProtocolError) as e:
        decode_frames(old_frames, LIMITS, CLIENT_TYPES, reader)
    assert e.value.code == ErrorCode.STALE_GENERATION and e.value.corr_id == 1


@pytest.mark.parametrize("mutate, code", [
    (lambda b: b["shm"].update(slot=4), ErrorCode.BAD_SLOT),
    (lambda b: b["shm"].update(slot=2**40), ErrorCode.BAD_SLOT),
    (lambda b: b["shm"].update(generation=0), ErrorCode.STALE_GENERATION),
    (lambda b: b["shm"].update(generation=b["shm"]["generation"] + 1), ErrorCode.STALE_GENERATION),
    (lambda b: b["shm"].update(length=b["shm"]["length"] + 8), ErrorCode.BAD_SLOT),
    (lambda b: b["shm"].update(length=2**63), ErrorCode.BAD_SLOT),
    (lambda b: b["arrays"][1].update(offset=4096), ErrorCode.BAD_SLOT),
    (lambda b: b["arrays"][1].update(offset=b["arrays"][1]["offset"] + 4), ErrorCode.BAD_SLOT),
    (lambda b: b["arrays"][0].update(shape=[10**6]), ErrorCode.BAD_SLOT),
    (lambda b: b["arrays"][0].update(dtype="<f8"), ErrorCode.BAD_FIELD),
    (lambda b: b["shm"].update(slot=-1), ErrorCode.BAD_FIELD),
    (lambda b: b["shm"].pop("generation"), ErrorCode.BAD_FIELD),
    (lambda b: b.pop("shm"), ErrorCode.BAD_FIELD),
], ids=["slot", "slot_huge", "generation_0", "generation_next", "length", "length_huge", "offset_outside",
        "offset_misaligned", "shape_huge", "dtype", "slot_negative", "no_generation", "no_shm_map"])
def test_forged_ring_references_are_rejected(ring_pair, mutate, code):
    writer, reader = ring_pair
    frames, _ = encode_frames(sample_batch(), 9, writer)
    with pytest.raises(ProtocolError) as e:
        decode_frames(refs(frames, mutate), LIMITS, CLIENT_TYPES, reader)
    assert e.value.code == code and e.value.corr_id == 9


def test_corrupted_slot_fails_its_checksum(ring_pair):
    writer, reader = ring_pair
    frames, slot = encode_frames(sample_batch(), 3, writer)
    writer.buffer[64 + 64 + 10] ^= 0xFF  # a stray write into the lent slot 0
    with pytest.raises(ProtocolError) as e:
        decode_frames(frames, LIMITS, CLIENT_TYPES, reader)
    assert slot.slot == 0 and e.value.code == ErrorCode.CHECKSUM_MISMATCH


def test_shm_message_without_a_mapped_ring_is_refused(ring_pair):
    writer, _ = ring_pair
    frames, _ = encode_frames(sample_batch(), 3, writer)
    with pytest.raises(ProtocolError) as e:
        decode_frames(frames, LIMITS, CLIENT_TYPES, None)
    assert e.value.code == ErrorCode.NO_RING


# --- permissions and cleanup ------------------------------------------------------------------------------


def shm_names() -> set[str]:
    folder = IpcConfig().shm_dir
    return {n for n in os.listdir(folder) if n.startswith("npc-ipc")}


def test_segment_is_private_and_removed(config, stub):
    before = shm_names()
    client = ClientEndpoint(config, stub.endpoint)
    hello = client.session.hello()
    path = client.session.ring.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.stat(path).st_uid == os.geteuid()
    reply = client.request(hello)
    assert reply.msg.ring_mapped and not os.path.exists(path)  # unlinked as soon as both sides map it
    client.close()
    unconnected = ClientEndpoint(config, stub.endpoint)
    unconnected.session.hello()
    assert os.path.exists(unconnected.session.ring.path)
    unconnected.close()  # never connected: close removes it
    assert shm_names() == before


def test_endpoint_directory_is_private(config, ipc_dir):
    with WorkerEndpoint(config) as worker:
        folder = os.path.dirname(worker.endpoint[len("ipc://"):])
        assert folder == config.endpoint_dir
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert os.path.exists(worker.endpoint[len("ipc://"):])
    assert not os.path.exists(worker.endpoint[len("ipc://"):])
    shared = os.path.join(ipc_dir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o755)
    with pytest.raises(ValueError, match="must be 0700"):
        ensure_private_dir(shared)
    with pytest.raises(ValueError, match="must be 0700"):
        WorkerEndpoint(dataclasses.replace(config, endpoint=f"ipc://{shared}/w.sock"))
    os.symlink(shared, os.path.join(ipc_dir, "link"))
    with pytest.raises(ValueError, match="symlink"):
        ensure_private_dir(os.path.join(ipc_dir, "link"))


def test_reader_refuses_segments_it_should_not_trust(ipc_dir):
    writer = RingWriter(2, 4096, directory=ipc_dir)
    try:
        with pytest.raises(RingError, match="does not match"):
            RingReader("../etc/passwd", 2, 4096, directory=ipc_dir)
        with pytest.raises(RingError, match="needs"):
            RingReader(writer.name, 4, 4096, directory=ipc_dir)  # announced bigger than it is
        os.chmod(writer.path, 0o644)
        with pytest.raises(RingError, match="must be 0600"):
            RingReader(writer.name, 2, 4096, directory=ipc_dir)
        os.chmod(writer.path, 0o600)
        os.symlink(writer.path, os.path.join(ipc_dir, "npc-link"))
        with pytest.raises(RingError, match="cannot open"):
            RingReader("npc-link", 2, 4096, directory=ipc_dir)
        RingReader(writer.name, 2, 4096, directory=ipc_dir).close()
    finally:
        writer.close()
    assert not os.path.exists(writer.path)


# --- CURVE on tcp:// --------------------------------------------------------------------------------------


def tcp_config(config: IpcConfig, keys: CurveKeys) -> IpcConfig:
    return dataclasses.replace(config, endpoint="tcp://127.0.0.1:*", transport="inline", curve=keys)


def heartbeat(config: IpcConfig, endpoint: str, timeout_ms: int = 3000) -> HeartbeatReply:
    with ClientEndpoint(config, endpoint) as client:
        return client.request(Heartbeat(11), timeout_ms=timeout_ms).msg


def test_curve_lets_in_only_clients_with_the_server_key(config):
    server = CurveKeys.generate()
    with StubWorker(tcp_config(config, server)) as worker:
        assert worker.endpoint.startswith("tcp://127.0.0.1:")
        assert heartbeat(tcp_config(config, server.for_client()), worker.endpoint).seq == 11
        wrong = CurveKeys.generate().for_client()
        with pytest.raises(TimeoutError):
            heartbeat(tcp_config(config, wrong), worker.endpoint, timeout_ms=500)
        with pytest.raises(TimeoutError):  # no CURVE at all
            heartbeat(dataclasses.replace(tcp_config(config, server), curve=None), worker.endpoint, 500)


def test_curve_allow_list(config):
    friend_public, friend_secret = zmq.curve_keypair()
    server = CurveKeys.generate(allowed_clients=(friend_public,))
    with StubWorker(tcp_config(config, server)) as worker:
        friend = tcp_config(config, server.for_client(friend_public, friend_secret))
        assert heartbeat(friend, worker.endpoint).worker_id == "stub"
        with pytest.raises(TimeoutError):  # knows the server key, but is not on the list
            heartbeat(tcp_config(config, server.for_client()), worker.endpoint, timeout_ms=500)


# --- bad input: an ERROR reply naming the problem, and the worker keeps serving --------------------------


def frames_of(msg, corr_id: int = 5) -> list:
    return encode_frames(msg, corr_id)[0]


def with_header(frames: list, **fields) -> list:
    return [dataclasses.replace(Header.parse(frames[0]), **fields).pack(), *frames[1:]]


def raw_header(**fields) -> bytes:
    values = dict(magic=MAGIC, version=1, type=int(MsgType.STATS), corr_id=5, flags=0, meta_len=1, frames=0,
                  reserved=0, payload=0) | fields
    return HEADER.pack(*values.values())


def meta_frames(msg_type: MsgType, body: dict) -> list:
    meta = msgpack.packb(body)
    return [raw_header(type=int(msg_type), meta_len=len(meta)), meta]


def batch_with(**changes) -> list:
    body, arrays = encode(sample_batch())
    body.update(changes)
    body["arrays"] = [{"dtype": "<i4", "shape": [len(a)]} for a in arrays]
    meta = pack_meta(body)
    header = Header(MsgType.SUBMIT_BATCH, 5, 0, len(meta), 2, sum(a.nbytes for a in arrays))
    return [header.pack(), meta, *arrays]


def chain_of(step: dict) -> dict:
    return {"request": 0, "steps": [step]}


def batch_of(tokens, offsets, **spec) -> list:
    builder = BatchBuilder()
    builder.add("r0", [1], **spec)
    batch = dataclasses.replace(builder.build(), tokens=np.asarray(tokens, np.int32),
                                offsets=np.asarray(offsets, np.int32))
    return frames_of(batch)


BAD_INPUT = {
    "empty_frame": ([b""], ErrorCode.MALFORMED_FRAME),
    "short_header": ([frames_of(Stats())[0][:20], b"\x80"], ErrorCode.MALFORMED_FRAME),
    "bad_magic": ([raw_header(magic=b"HTTP"), b"\x80"], ErrorCode.BAD_MAGIC),
    "version_2": ([raw_header(version=2), b"\x80"], ErrorCode.UNSUPPORTED_VERSION),
    "unknown_type": ([raw_header(type=0x33), b"\x80"], ErrorCode.UNKNOWN_TYPE),
    "worker_type_from_client": (frames_of(BatchAck(1)), ErrorCode.UNKNOWN_TYPE),
    "unknown_flag": ([raw_header(flags=0x10), b"\x80"], ErrorCode.BAD_FLAGS),
    "reserved_set": ([raw_header(reserved=1), b"\x80"], ErrorCode.MALFORMED_FRAME),
    "no_metadata": ([raw_header()], ErrorCode.MALFORMED_FRAME),
    "meta_len_wrong": ([raw_header(meta_len=7), b"\x80"], ErrorCode.MALFORMED_FRAME),
    "truncated_payload": (frames_of(sample_batch())[:3] + [frames_of(sample_batch())[3][:-4]],
                          ErrorCode.MALFORMED_FRAME),
    "missing_payload_frame": (frames_of(sample_batch())[:3], ErrorCode.MALFORMED_FRAME),
    "oversized_payload": (frames_of(sample_batch())[:2] + [bytes((1 << 16) + 8), bytes(20)],
                          ErrorCode.TOO_LARGE),
    "oversized_metadata": ([raw_header(meta_len=1 << 21), bytes(1 << 21)], ErrorCode.TOO_LARGE),
    "garbage_msgpack": ([raw_header(meta_len=3), b"\xc1\xc1\xc1"], ErrorCode.BAD_METADATA),
    "trailing_bytes": ([raw_header(meta_len=2), b"\x80\x80"], ErrorCode.BAD_METADATA),
    "meta_not_a_map": ([raw_header(meta_len=1), b"\x90"], ErrorCode.BAD_METADATA),
    "msgpack_extension": ([raw_header(meta_len=3), b"\xd4\x05\x00"], ErrorCode.BAD_METADATA),
    "unknown_key": (meta_frames(MsgType.HEARTBEAT, {"seqq": 1}), ErrorCode.BAD_FIELD),
    "missing_key": (meta_frames(MsgType.ADAPTER_LOAD, {"path": "/x"}), ErrorCode.BAD_FIELD),
    "string_too_long": (meta_frames(MsgType.ADAPTER_LOAD, {"name": "a", "path": "x" * 5000}),
                        ErrorCode.LIMIT_EXCEEDED),
    "ids_not_strings": (batch_with(request_id=[1, 2, 3, 4]), ErrorCode.BAD_FIELD),
    "bool_for_int": (batch_with(priority=[True, 0, 0, 0]), ErrorCode.BAD_FIELD),
    "float_for_int": (batch_with(prompt=[0.0, 1, 2, 3]), ErrorCode.BAD_FIELD),
    "bad_top_p": (batch_with(params_table=[{"top_p": 1.5}]), ErrorCode.BAD_FIELD),
    "nan_temperature": (batch_with(params_table=[{"temperature": float("nan")}]), ErrorCode.BAD_FIELD),
    "column_length": (batch_with(priority=[0]), ErrorCode.BAD_FIELD),
    "stack_index": (batch_with(stack=[0, 0, 0, 9]), ErrorCode.BAD_FIELD),
    "adapter_name": (batch_with(stack_table=[["../../etc"]], stack=[]), ErrorCode.BAD_FIELD),
    "too_many_adapters": (batch_with(stack_table=[["a"] * 5], stack=[]), ErrorCode.LIMIT_EXCEEDED),
    "duplicate_ids": (batch_with(request_id=["a", "b", "a", "c"]), ErrorCode.DUPLICATE_REQUEST),
    "chain_forward_ref": (batch_with(chains=[{"request": 0, "steps": [{"parts": [{"output_of": 1}]}]}]),
                          ErrorCode.BAD_FIELD),
    "two_chains": (batch_with(chains=[chain_of({"parts": [{"segment": 0}]})] * 2), ErrorCode.BAD_FIELD),
    "chain_stack_index": (batch_with(chains=[chain_of({"parts": [{"segment": 0}], "stack": 99})]),
                          ErrorCode.BAD_FIELD),
    "part_sets_both": (batch_with(chains=[chain_of({"parts": [{"segment": 0, "output_of": 0}]})]),
                       ErrorCode.BAD_FIELD),
    "token_negative": (batch_of([-1], [0, 1]), ErrorCode.TOKEN_OUT_OF_RANGE),
    "token_beyond_vocab": (batch_of([VOCAB], [0, 1]), ErrorCode.TOKEN_OUT_OF_RANGE),
    "stop_id_beyond_vocab": (batch_of([1], [0, 1], params=SamplingParams(stop_token_ids=(VOCAB,))),
                             ErrorCode.TOKEN_OUT_OF_RANGE),
    "offsets_decrease": (batch_of([1, 2], [0, 2, 1, 2]), ErrorCode.BAD_PAYLOAD),
    "offsets_past_end": (batch_of([1, 2], [0, 3]), ErrorCode.BAD_PAYLOAD),
    "empty_prompt": (batch_of([1], [0, 0, 1]), ErrorCode.BAD_FIELD),
    "too_many_requests": (frames_of(SubmitBatch(tuple(f"r{i}" for i in range(1025)), (0,) * 1025,
                                                np.ones(1, np.int32), np.array([0, 1], np.int32))),
                          ErrorCode.LIMIT_EXCEEDED),
    "shm_without_ring": (with_header(frames_of(Stats()), flags=1), ErrorCode.BAD_FIELD),
}


UNATTRIBUTED = {"empty_frame", "short_header", "bad_magic"}  # no header to read a corr_id from


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_gets_an_error_reply(config, name):
    frames, code = BAD_INPUT[name]
    small = dataclasses.replace(config, limits=dataclasses.replace(LIMITS, max_frame_bytes=1 << 16,
                                                                   max_batch_tokens=1 << 14))
    with StubWorker(small) as worker, ClientEndpoint(small, worker.endpoint) as client:
        client.socket.send_multipart(frames, copy=False)
        reply = client.recv(timeout_ms=5000)
        assert reply.msg_type == MsgType.ERROR, reply
        assert reply.msg.code == code, reply.msg.message
        assert reply.msg.message
        assert reply.corr_id == (0 if name in UNATTRIBUTED else 5)
        assert client.request(Heartbeat(3)).msg.seq == 3  # still serving
    assert worker.counters["errors"] == {code.name: 1}


def test_vocab_error_names_request_and_position():
    body, arrays = encode(sample_batch())
    arrays[0] = arrays[0].copy()
    arrays[0][6] = VOCAB + 5  # request 1's prompt starts at token 5
    with pytest.raises(ProtocolError, match=r"token id 1005 \(segment 1, position 1\)"):
        decode(MsgType.SUBMIT_BATCH, unpack_meta(pack_meta(body)), arrays, LIMITS)


def test_config_is_checked_when_built():
    for bad in (dict(transport="udp"), dict(slot_bytes=1000), dict(ring_slots=0), dict(endpoint="tcp://x"),
                dict(endpoint="ipc://relative.sock"), dict(endpoint="ipc:///" + "x" * 200),
                dict(shm_dir="dev/shm"), dict(shm_prefix="a/b"), dict(hwm=0),
                dict(ring_slots=4096, slot_bytes=1 << 20)):  # 4 GiB ring: over max_ring_bytes
        with pytest.raises(ValueError):
            IpcConfig(**bad)
    with pytest.raises(ValueError, match="z85"):
        CurveKeys(b"short")
    with pytest.raises(ValueError, match="go together"):
        CurveKeys(zmq.curve_keypair()[0], client_public=zmq.curve_keypair()[0])
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Limits(max_frame_bytes=1024)
    with pytest.raises(ValueError, match="server_secret"):
        WorkerEndpoint(IpcConfig(endpoint="tcp://127.0.0.1:*", curve=CurveKeys.generate().for_client()))
