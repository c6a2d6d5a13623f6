"""The archive path of memory: outbox -> npc-archiver -> PostgreSQL throughput, and kill -9 losses.

    python -m bench.memory_archive            # rich table
    python -m bench.memory_archive --json     # one JSON object on the last line of stdout
    python -m bench.memory_archive --quick    # smaller sizes, a smoke run

Sections (real Redis and PostgreSQL at REDIS_URL / DATABASE_URL; a key prefix and a schema of their own,
removed afterwards):
  throughput  `events` turn events pre-filled in the outbox, then one in-process Archiver (default config:
              4 workers, batches of 100) drains them into PostgreSQL; events / second from its start until
              the last row is committed. A first run on an empty outbox (migrations, partitions) is not timed.
  kill        `events` more in the outbox; the archiver runs as its own process (`python -m
              memory.archiver --run`) and gets SIGKILL once about a third is archived; a second process
              (`--once`) reclaims the dead one's pending entries and drains the rest. lost_events = events
              written - distinct events in the archive; duplicate_rows = rows - distinct events.
`archive_results(args)` returns the keys without targets, for bench.memory to merge into its own result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid

import asyncpg
import redis

from bench.common import emit, log, parse_args
from memory import services
from memory.archiver import Archiver, ArchiverConfig
from memory.events import OutboxEvent, outbox_stream

TARGETS = {"archive_events_per_s": ">= 20000", "lost_events": "<= 0"}
EVENTS, QUICK_EVENTS = 20_000, 5_000
KILL_AT_FRACTION = 1 / 3


def archive_results(args: argparse.Namespace) -> dict:
    events = QUICK_EVENTS if args.quick else EVENTS
    prefix, schema = f"npc-bench:{uuid.uuid4()}:", f"npc_bench_{uuid.uuid4().hex}"
    cfg = ArchiverConfig(redis_url=services.redis_url(), database_url=services.database_url(), prefix=prefix,
                         schema=schema)
    try:
        result = {"archive_events": events, "archiver_workers": cfg.workers,
                  "archiver_batch_max": cfg.batch_max}
        result |= throughput_section(cfg, events)
        result |= kill_section(cfg, events)
        return result
    finally:
        _cleanup(cfg)


def throughput_section(cfg: ArchiverConfig, events: int) -> dict:
    asyncio.run(Archiver(cfg).run(once=True))  # warm-up: group, schema, partitions; not timed
    fill_outbox(cfg, events)
    log(f"throughput: draining {events} events")
    seconds = asyncio.run(_drain_timed(cfg, events))
    return {"archive_events_per_s": events / seconds, "archive_drain_s": seconds}


async def _drain_timed(cfg: ArchiverConfig, expected: int) -> float:
    archiver = Archiver(cfg)
    start = time.perf_counter()
    task = asyncio.create_task(archiver.run())
    # The archiver never stops by itself in run mode; it is timed until its last row is committed.
    while archiver.stats.archived < expected and not task.done():
        await asyncio.sleep(0.002)
    seconds = time.perf_counter() - start
    archiver.stop()
    await task
    if archiver.stats.archived != expected:
        raise RuntimeError(f"archived {archiver.stats.archived} of {expected} events: {archiver.stats}")
    return seconds


def kill_section(cfg: ArchiverConfig, events: int) -> dict:
    before = _archive_counts(cfg)[0]
    written = fill_outbox(cfg, events)
    proc = _archiver_process(cfg, "--run")
    try:
        _wait_until(lambda: _archive_counts(cfg)[0] - before >= events * KILL_AT_FRACTION, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    at_kill = _archive_counts(cfg)[0] - before
    log(f"kill: SIGKILL after {at_kill} of {events} events; restarting")
    time.sleep(0.3)  # the dead consumer's pending entries become older than --claim-min-idle-ms
    restart = _archiver_process(cfg, "--once", "--claim-min-idle-ms", "200")
    out, err = restart.communicate(timeout=300)
    if restart.returncode != 0:
        raise RuntimeError(f"restarted archiver failed ({restart.returncode}): {err[-2000:]}")
    stats = json.loads(out.strip().splitlines()[-1])
    rows, distinct = _archive_counts(cfg)
    return {"lost_events": len(written - set(_archived_ids(cfg))), "duplicate_rows": rows - distinct,
            "archived_at_kill": at_kill, "reclaimed_after_kill": stats["reclaimed"],
            "redelivered_after_kill": stats["duplicates"]}


def fill_outbox(cfg: ArchiverConfig, events: int) -> set[str]:
    """XADDs `events` turn events (100 NPCs x 10 players) in pipelined chunks; returns their event ids."""
    client = redis.Redis.from_url(cfg.redis_url)
    now, session = time.time(), uuid.uuid4().hex
    ids = set()
    try:
        for chunk in range(0, events, 1000):
            pipe = client.pipeline(transaction=False)
            for i in range(chunk, min(events, chunk + 1000)):
                payload = {"speaker": "npc", "text": f"The night is young, traveller ({i}).", "ts": now,
                           "session_id": session, "turn_id": uuid.uuid4().hex}
                event = OutboxEvent("turn", f"npc-{i % 100}", f"player-{i % 10}", now, payload)
                pipe.xadd(outbox_stream(cfg.prefix), event.to_fields())
                ids.add(event.event_id)
            pipe.execute()
    finally:
        client.close()
    return ids


def _archiver_process(cfg: ArchiverConfig, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "memory.archiver", "--prefix", cfg.prefix, "--schema", cfg.schema,
               "--redis-url", cfg.redis_url, "--database-url", cfg.database_url, *args]
    return subprocess.Popen(command, cwd=services.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"archiver exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"condition not met within {timeout:.0f} s")
        time.sleep(0.01)


def _archive_counts(cfg: ArchiverConfig) -> tuple[int, int]:
    """(rows, distinct event ids) in the archive's raw events."""
    row = _fetch(cfg, f"SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM {cfg.schema}.events")[0]
    return row["n"], row["d"]


def _archived_ids(cfg: ArchiverConfig) -> list[str]:
    return [r["event_id"].hex for r in _fetch(cfg, f"SELECT event_id FROM {cfg.schema}.events")]


def _fetch(cfg: ArchiverConfig, query: str) -> list:
    async def fetch():
        conn = await asyncpg.connect(cfg.database_url)
        try:
            return await conn.fetch(query)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _cleanup(cfg: ArchiverConfig) -> None:
    client = redis.Redis.from_url(cfg.redis_url)
    keys = list(client.scan_iter(match=cfg.prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    _fetch(cfg, f"DROP SCHEMA IF EXISTS {cfg.schema} CASCADE")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    result = archive_results(args) | {"targets": TARGETS}
    emit(result, args, title="bench.memory_archive (outbox -> archiver -> PostgreSQL)")
    return result


if __name__ == "__main__":
    main()
