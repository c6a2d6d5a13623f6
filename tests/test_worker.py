"""The worker process over real sockets: a subprocess serving the async client (gpu_worker/client.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import zmq

from gpu_worker import (
    ChainRequest,
    ChainStep,
    Engine,
    EngineConfig,
    Grammar,
    OutputRef,
    Request,
    SamplingParams,
)
from gpu_worker.client import ClientConfig, WorkerClient, WorkerError, WorkerLost
from ipc.errors import ErrorCode
from ipc.transport import IpcConfig

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=True)
LONG = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)  # seconds of steps on the CPU


def private_endpoint() -> tuple[str, str]:
    folder = tempfile.mkdtemp(prefix="npc-wt-")
    os.chmod(folder, 0o700)
    return folder, f"ipc://{folder}/w.sock"


def start_worker(model: Path, endpoint: str, adapters_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gpu_worker.worker", "serve", "--model", str(model), "--endpoint", endpoint,
           "--adapters-dir", str(adapters_dir), "--log-level", "WARNING", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the worker's "ready" line, once its socket is bound
    assert line.startswith("npc-worker ready"), f"worker did not start: {line!r}"
    return proc


def serve_adapters(model: Path, adapters: dict[str, str], folder: Path, files: dict[str, str]):
    """A worker subprocess serving `files` (served name -> conftest adapter fixture name), linked into
    `folder`; yields its endpoint and stops it afterwards (for module-scoped fixtures)."""
    for name, fixture in files.items():
        (folder / name).symlink_to(Path(adapters[fixture]), target_is_directory=True)
    _, endpoint = private_endpoint()
    proc = start_worker(model, endpoint, folder)
    try:
        yield endpoint
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def adapters_dir(adapters):
    return Path(adapters["all_r8"]).parent


@pytest.fixture(scope="module")
def worker(qwen2_dir, adapters_dir):
    folder, endpoint = private_endpoint()
    proc = start_worker(qwen2_dir, endpoint, adapters_dir)
    yield endpoint
    stop(proc)


@pytest.fixture(scope="module")
def offline(qwen2_dir, adapters):
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def with_client(endpoint: str, fn):
    # Heartbeats are answered between engine steps: a loaded CI machine can stretch a step (first LoRA
    # swap-in, grammar compile) past the 0.8 s default, which would read as a dead worker here.
    async with WorkerClient(endpoint, config=ClientConfig(heartbeat_timeout_s=5.0)) as client:
        return await fn(client)


def mixed_batch(tag: str) -> list[Request]:
    stacks = [(), ("all_r8",), ("attn_r4",), ("mlp_r16", "attn_r4"), ("rslora_r32",), ("all_r8",)]
    return [Request(prompt=[3 + i, 17, 42, 99 + 7 * i, 5], adapters=s, params=GREEDY, request_id=f"{tag}-{i}")
            for i, s in enumerate(stacks)]


def test_mixed_adapter_batch_matches_offline(worker, offline):
    requests = mixed_batch("mix")
    results = run(with_client(worker, lambda c: c.generate(requests)))
    expected = offline.generate([Request(r.prompt, r.adapters, r.params) for r in requests])
    for got, want in zip(results, expected):
        (step,) = got.steps
        assert list(step.token_ids) == want.token_ids
        assert step.finish_reason == want.finish_reason == "length"
        assert step.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_streaming_order_and_completion_last(worker):
    async def go(client):
        streams = await client.submit(mixed_batch("order"))
        seen = []
        for stream in streams:
            deltas = [d async for d in stream]
            seen.append((deltas, await stream.result()))
        return seen

    for deltas, result in run(with_client(worker, go)):
        assert [d.token_id for d in deltas] == list(result.steps[0].token_ids)
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].finish_reason == result.finish_reason == "length"


def test_chain_of_three_adapters_matches_steps_offline(worker, offline):
    p2 = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    chain = ChainRequest(request_id="chain-1", steps=[
        ChainStep([11, 12, 13, 14], ("all_r8",), GREEDY),
        ChainStep([11, 12, OutputRef(0), 20, 21], ("attn_r4",), p2),
        ChainStep([30, OutputRef(0), 31, OutputRef(1), 32], ("mlp_r16",), p2),
    ])
    (result,) = run(with_client(worker, lambda c: c.generate([chain])))
    outputs = []
    for step in chain.steps:
        prompt = [t for item in step.prompt
                  for t in (outputs[item.step] if isinstance(item, OutputRef) else [item])]
        (done,) = offline.generate([Request(prompt, step.adapters, step.params)])
        outputs.append(done.token_ids)
    assert [list(s.token_ids) for s in result.steps] == outputs
    assert result.finish_reason == "length"


def test_grammar_rows_parse_beside_free_rows(worker, qwen2_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(qwen2_dir / "tokenizer.json"))
    schema = {"type": "object", "properties": {"action": {"enum": ["attack", "flee", "wander"]},
                                               "mood": {"enum": ["calm", "angry"]}},
              "required": ["action", "mood"]}
    grammar = Grammar.from_json_schema(schema)
    sampled = [SamplingParams(max_tokens=200, temperature=0.9, seed=s) for s in range(4)]
    requests = [Request([7, 8, 9 + i], params=p, request_id=f"json-{i}", grammar=grammar)
                for i, p in enumerate(sampled)]
    requests.append(Request([7, 8, 9], params=GREEDY, request_id="free"))
    results = run(with_client(worker, lambda c: c.generate(requests)))
    for result in results[:-1]:
        assert result.finish_reason == "stop"
        value = json.loads(tok.decode(list(result.steps[0].token_ids)))
        assert value["action"] in ("attack", "flee", "wander") and value["mood"] in ("calm", "angry")
    assert len(results[-1].steps[0].token_ids) == GREEDY.max_tokens


def test_bad_input_gets_error_replies_and_worker_keeps_serving(worker):
    async def go(client):
        streams = await client.submit([Request([1, 2, 3], ("no_such_adapter",), GREEDY, request_id="bad-a"),
                                       Request([1, 2, 3], (), GREEDY, request_id="good-a")])
        with pytest.raises(WorkerError) as unknown:
            await streams[0].result()
        assert unknown.value.code == ErrorCode.UNKNOWN_ADAPTER and "no_such_adapter" in unknown.value.message
        assert (await streams[1].result()).finish_reason == "length"
        with pytest.raises(WorkerError) as out_of_range:
            await client.submit([Request([1, 10**6], (), GREEDY, request_id="bad-b")])
        assert out_of_range.value.code == ErrorCode.TOKEN_OUT_OF_RANGE
        assert "1000000" in out_of_range.value.message
        with pytest.raises(WorkerError) as failed:
            await client.load_adapter("broken", path="/nonexistent/adapter")
        assert failed.value.code == ErrorCode.ADAPTER_LOAD_FAILED
        return await client.generate([Request([4, 5, 6], ("attn_r4",), GREEDY, request_id="after")])

    (result,) = run(with_client(worker, go))
    assert len(result.steps[0].token_ids) == GREEDY.max_tokens
    # Raw garbage from a plain DEALER: an ERROR reply, and the worker still answers the client above.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(worker)
    sock.send_multipart([b"not a header", b"\xc1"])
    assert sock.poll(5000)
    header = sock.recv_multipart()[0]
    assert header[:4] == b"NPCW" and int.from_bytes(header[6:8], "little") == 0xFF
    sock.close()
    assert run(with_client(worker, lambda c: c.stats()))["endpoint"]["errors"]


def test_control_messages_load_abort_warm_stats(worker, adapters):
    async def go(client):
        reply = await client.load_adapter("wire.loaded", path=str(adapters["pattern_r8"]), pin=True)
        assert reply.resident and reply.pinned
        (result,) = await client.generate([Request([9, 8, 7], ("wire.loaded",), GREEDY, request_id="uses")])
        assert len(result.steps[0].token_ids) == GREEDY.max_tokens
        (stream,) = await client.submit([Request([2, 3, 4], (), LONG, request_id="to-abort")])
        async for _ in stream:
            break
        aborted = await client.abort(["to-abort", "never-sent"])
        assert aborted.aborted == ("to-abort",) and aborted.unknown == ("never-sent",)
        assert (await stream.result()).finish_reason == "abort"
        warm = await client.warm_prefix([(list(range(1, 40)), ("all_r8",))])
        assert warm.cached_tokens == (32,)
        return await client.stats()

    stats = run(with_client(worker, go))
    assert stats["in_flight"] == 0 and stats["prefix_query_tokens"] > 0


def test_worker_killed_fails_in_flight_fast_then_reconnects(qwen2_dir, adapters_dir):
    folder, endpoint = private_endpoint()
    proc = start_worker(qwen2_dir, endpoint, adapters_dir)

    async def go():
        async with WorkerClient(endpoint) as client:
            (stream,) = await client.submit([Request([1, 2, 3], (), LONG, request_id="doomed")])
            async for _ in stream:
                break
            proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(WorkerLost) as lost:
                async for _ in stream:
                    pass
            assert time.monotonic() - killed < 1.5
            assert lost.value.code == ErrorCode.WORKER_LOST and "heartbeat" in str(lost.value)
            restarted = start_worker(qwen2_dir, endpoint, adapters_dir)
            try:
                deadline = time.monotonic() + 20
                while not client.connected and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert client.connected and client.counters["reconnects"] == 1
                again = Request([1, 2, 3], ("all_r8",), GREEDY, request_id="again")
                (result,) = await client.generate([again])
                assert len(result.steps[0].token_ids) == GREEDY.max_tokens
            finally:
                stop(restarted)

    try:
        run(go())
    finally:
        stop(proc)


def test_sigterm_errors_in_flight_and_leaves_no_shared_memory(qwen2_dir, adapters_dir):
    folder, endpoint = private_endpoint()
    proc = start_worker(qwen2_dir, endpoint, adapters_dir, "--drain-timeout", "0.2")
    prefix = f"npct{uuid.uuid4().hex[:8]}"
    ipc = IpcConfig(shm_prefix=prefix)

    async def go():
        async with WorkerClient(endpoint, ipc, ClientConfig(heartbeat_timeout_s=5.0)) as client:
            assert client.session.shm  # the batch goes through the ring
            (stream,) = await client.submit([Request([1, 2, 3], (), LONG, request_id="cut")])
            async for _ in stream:
                break
            proc.send_signal(signal.SIGTERM)
            deltas = [d async for d in stream]
            result = await stream.result()
            assert deltas[-1].finish_reason == "error" and "SIGTERM" in deltas[-1].error
            assert result.finish_reason == "error" and "shutting down" in result.error

    try:
        run(go())
        assert proc.wait(10) == 0
    finally:
        stop(proc)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    assert not os.path.exists(endpoint[len("ipc://"):])


def test_a_step_longer_than_the_heartbeat_timeout_is_not_a_dead_worker(tmp_path):
    """One prefill step of 6,000 tokens on the bench-sized model takes seconds here: the responder thread
    answers heartbeats meanwhile, so a client with a 0.4 s timeout keeps the request; a worker stopped with
    SIGSTOP (hung: no thread runs) is still declared lost."""
    from gpu_worker.testing import build_model

    model = build_model(tmp_path / "model", hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2,
                        vocab=4096, max_position=8192)
    _, endpoint = private_endpoint()
    proc = start_worker(model, endpoint, tmp_path, "--max-num-batched-tokens", "8192", "--max-model-len",
                        "8192", "--kv-cache-mb", "512")
    prompt = [(7 * i) % 4000 + 1 for i in range(6000)]
    fast = ClientConfig(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.4)

    async def go():
        async with WorkerClient(endpoint, config=fast) as client:
            start = time.monotonic()
            (result,) = await client.generate([Request(prompt, (), GREEDY, request_id="long-prefill")])
            elapsed = time.monotonic() - start
            stats = await client.stats()
            assert len(result.steps[0].token_ids) == GREEDY.max_tokens
            assert client.counters["workers_lost"] == 0
            # The test means something only if one step outlasted the timeout and heartbeats were answered
            # during it.
            assert elapsed > 2 * fast.heartbeat_timeout_s, elapsed
            assert stats["heartbeats_during_steps"] > 0, stats

            (stream,) = await client.submit([Request([1, 2, 3], (), LONG, request_id="then-hung")])
            async for _ in stream:
                break
            proc.send_signal(signal.SIGSTOP)
            hung = time.monotonic()
            with pytest.raises(WorkerLost):
                async for _ in stream:
                    pass
            assert time.monotonic() - hung < 1.5

    try:
        run(go())
    finally:
        proc.send_signal(signal.SIGCONT)
        stop(proc)
