"""The archive half of memory (issue 6): schema, npc-archiver, compaction, cold restore; real servers only.

Every test uses its own Redis key prefix (`npc-test:<uuid>:`) and PostgreSQL schema (`npc_test_<hex>`) on the
shared servers and removes them afterwards. The outage tests start and stop a PostgreSQL or a Redis of their
own; the shared servers are never stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from memory import archive_schema, compaction, restore, services
from memory.archiver import Archiver, ArchiverConfig, BadEvent, PgWriter, decode_entry
from memory.config import MemoryConfig
from memory.events import GameEvent, OutboxEvent, outbox_stream
from memory.records import EmotionPoint, Fact, Summary, Turn
from memory.store import MemoryStore, connect
from memory.testing import DIALOGUE, FakeClock

DAY = 86_400.0
NOW = datetime(2024, 6, 5, 12, tzinfo=UTC).timestamp()  # a Wednesday: the tests' injectable "now"


# ---------------------------------------------------------------------------------------------- fixtures


def _query(query: str, *args) -> list:
    return asyncio.run(_sql(services.database_url(), query, *args))


async def _sql(url: str, query: str, *args):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def _config(prefix: str, schema: str, **overrides) -> ArchiverConfig:
    return ArchiverConfig(redis_url=services.redis_url(), database_url=services.database_url(), prefix=prefix,
                          schema=schema, **overrides)


def _turn(session_id: str, ts: float, text: str = "Well met, traveller.") -> dict:
    return Turn(speaker="npc", text=text, ts=ts, session_id=session_id).to_dict()


def _turn_events(count: int, ts0: float, npc: str = "vamp-1", player: str = "p1") -> list[OutboxEvent]:
    session = uuid.uuid4().hex
    return [OutboxEvent("turn", npc, player, ts0 + i * 0.01, _turn(session, ts0 + i * 0.01, f"line {i}"))
            for i in range(count)]


def _xadd(prefix: str, events: list[OutboxEvent]) -> None:
    client = redis.Redis.from_url(services.redis_url())
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(outbox_stream(prefix), event.to_fields())
    pipe.execute()
    client.close()


def _archived(schema: str, url: str | None = None) -> list[str]:
    """Event ids in the archive's raw events, one per row (duplicates would show twice); none before the
    archiver (a subprocess) has created the schema."""
    query = f"SELECT event_id FROM {schema}.events WHERE to_regclass('{schema}.events') IS NOT NULL"
    try:
        rows = asyncio.run(_sql(url or services.database_url(), query))
    except asyncpg.UndefinedTableError:
        return []
    return [r["event_id"].hex for r in rows]


def _outbox_state(prefix: str, group: str = "npc-archiver") -> tuple[int, int]:
    """(entries in the outbox, entries pending in the group)."""
    client = redis.Redis.from_url(services.redis_url())
    try:
        length = client.xlen(outbox_stream(prefix))
        pending = client.xpending(outbox_stream(prefix), group)["pending"] if length or client.exists(
            outbox_stream(prefix)) else 0
        return length, pending
    finally:
        client.close()


def _wait_for(condition, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
    return result


def _archiver_process(prefix: str, schema: str, *args: str, database_url: str | None = None):
    command = [sys.executable, "-m", "memory.archiver", "--prefix", prefix, "--schema", schema,
               "--redis-url", services.redis_url(), "--database-url", database_url or services.database_url(),
               *args]
    return subprocess.Popen(command, cwd=services.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


# ---------------------------------------------------------------------------------------- schema, decode


def test_migrations_apply_in_order_once(names):
    _, schema = names

    async def check():
        conn = await asyncpg.connect(services.database_url())
        try:
            assert await archive_schema.schema_version(conn, schema) == 0
            assert await archive_schema.migrate(conn, schema, target=1) == 1
            assert await conn.fetchval("SELECT to_regclass($1)", f"{schema}.sessions") is None
            # Three migrators at once (archivers starting together): each migration still runs once.
            others = [await asyncpg.connect(services.database_url()) for _ in range(3)]
            versions = await asyncio.gather(*(archive_schema.migrate(c, schema) for c in others))
            for c in others:
                await c.close()
            assert versions == [archive_schema.LATEST_VERSION] * 3
            assert await archive_schema.migrate(conn, schema) == archive_schema.LATEST_VERSION
            rows = await conn.fetch(f"SELECT version FROM {schema}.schema_version ORDER BY version")
            assert [r["version"] for r in rows] == [m.version for m in archive_schema.MIGRATIONS]
        finally:
            await conn.close()

    asyncio.run(check())


def test_bad_names_are_refused():
    for bad in ("Npc", "npc-archive", "x" * 64, "a;drop", ""):
        with pytest.raises(ValueError, match="schema name"):
            archive_schema.validate_schema_name(bad)
    with pytest.raises(ValueError, match="prefix"):
        ArchiverConfig(prefix="no-colon")
    with pytest.raises(ValueError, match="batch_max"):
        ArchiverConfig(batch_max=0)
    with pytest.raises(ValueError, match="backoff"):
        ArchiverConfig(backoff_initial_s=2.0, backoff_max_s=1.0)


@given(st.floats(min_value=0, max_value=4_000_000_000))
def test_week_start_is_the_monday_before(ts):
    monday = archive_schema.week_start(ts)
    start = datetime(monday.year, monday.month, monday.day, tzinfo=UTC).timestamp()
    assert monday.weekday() == 0
    assert start <= ts < start + 7 * DAY


def test_week_start_examples():
    assert archive_schema.week_start(NOW) == date(2024, 6, 3)
    assert archive_schema.partition_name(date(2024, 6, 3)) == "events_p20240603"
    sunday_night = datetime(2024, 6, 9, 23, 59, 59, tzinfo=UTC).timestamp()
    assert archive_schema.week_start(sunday_night) == date(2024, 6, 3)
    assert archive_schema.week_start(sunday_night + 1) == date(2024, 6, 10)


def _fields(event: OutboxEvent, **changes) -> dict[str, str]:
    fields = event.to_fields() | changes
    return {k: v for k, v in fields.items() if v is not None}


def test_decode_entry_validates_at_the_boundary():
    event = _turn_events(1, NOW)[0]
    row = decode_entry(event.to_fields())
    assert (row.event_id, row.kind, row.npc_id, row.ts) == (event.event_id, "turn", "vamp-1", event.ts)
    assert row.session_id == event.payload["session_id"]
    assert json.loads(row.payload) == event.payload
    bad = {
        "missing": _fields(event, ts=None),
        "kind": _fields(event, kind="gossip"),
        "event_id": _fields(event, event_id="not-a-uuid"),
        "ts": _fields(event, ts="soon"),
        "payload": _fields(event, payload="{not json"),
        "list payload": _fields(event, payload="[1,2]"),
        "nul escape": _fields(event, payload='{"text":"a\\u0000b"}'),
        "not utf-8": _fields(event, payload=b'{"t":"\xff"}'.decode("utf-8", "surrogateescape")),
        "far future": _fields(event, ts="5000000000.0"),
    }
    for name, fields in bad.items():
        with pytest.raises(BadEvent):
            decode_entry(fields)
            pytest.fail(f"{name} was accepted")


# ------------------------------------------------------------------------------------------ the archiver


def test_batches_duplicates_and_dead_letters(names):
    prefix, schema = names
    events = _turn_events(250, NOW)
    _xadd(prefix, events + events[:10])  # a replayed write repeats its XADD with the same event_id
    client = redis.Redis.from_url(services.redis_url())
    client.xadd(outbox_stream(prefix), {"kind": "turn", "npc_id": "x"})  # missing fields
    client.xadd(outbox_stream(prefix), _fields(events[0], event_id=uuid.uuid4().hex, kind="gossip"))

    stats = asyncio.run(Archiver(_config(prefix, schema, batch_max=100, workers=2)).run(once=True))

    archived = _archived(schema)
    assert sorted(archived) == sorted(e.event_id for e in events)  # each exactly once
    assert (stats.read, stats.archived, stats.duplicates, stats.dead) == (262, 250, 10, 2)
    assert stats.batches >= 3  # batches of at most 100
    assert _outbox_state(prefix) == (0, 0)  # acknowledged and deleted
    dead = client.xrange(prefix + "outbox:dead")
    assert len(dead) == 2 and all(b"error" in fields for _, fields in dead)
    client.close()

    # The same events again (a lost acknowledgement, a replayed buffer): no new row.
    _xadd(prefix, events[:50])
    stats = asyncio.run(Archiver(_config(prefix, schema)).run(once=True))
    assert (stats.archived, stats.duplicates) == (0, 50)
    assert len(_archived(schema)) == 250


def test_the_staging_table_holds_nothing_between_batches(names):
    # Rows left in the TEMP staging table would ride along with every later batch (and one bad row would get
    # good batches dead-lettered); rows deleted but not vacuumed would stay forever (autovacuum never visits
    # TEMP tables) and slow every later batch. The table is empty, down to its file, after every batch,
    # failed or committed.
    prefix, schema = names
    asyncio.run(Archiver(_config(prefix, schema)).run(once=True))  # schema and this week's partitions
    rows = [decode_entry(e.to_fields()) for e in _turn_events(30, NOW - 400 * DAY)]  # a week never created

    async def scenario():
        writer = PgWriter(_config(prefix, schema))
        try:
            await writer._connection()
            writer.weeks.add(archive_schema.week_start(rows[0].ts))  # claimed, but not there
            with pytest.raises(asyncpg.PostgresError, match="no partition"):
                await writer.write(rows)
            assert writer.conn is not None and not writer.conn.is_closed()  # kept, and usable:
            assert await writer.conn.fetchval("SELECT count(*) FROM archiver_staging") == 0
            writer.weeks.clear()
            assert await writer.write(rows) == 30  # the partition is created now, and each row goes in once
            assert await writer.write(rows[:10]) == 0
            for _ in range(20):
                await writer.write(rows)
            assert await writer.conn.fetchval("SELECT pg_relation_size('archiver_staging')") == 0
        finally:
            await writer.close()

    asyncio.run(scenario())
    assert sorted(_archived(schema)) == sorted(r.event_id for r in rows)


def test_pending_entries_of_a_dead_consumer_are_reclaimed(names):
    prefix, schema = names
    events = _turn_events(120, NOW)
    _xadd(prefix, events)
    client = redis.Redis.from_url(services.redis_url())
    stream = outbox_stream(prefix)
    client.xgroup_create(stream, "npc-archiver", id="0")
    # A consumer that read 80 entries and died before archiving them.
    assert len(client.xreadgroup("npc-archiver", "dead-consumer", {stream: ">"}, count=80)[0][1]) == 80

    # Not idle long enough yet: only the 40 never-delivered entries are archived.
    stats = asyncio.run(Archiver(_config(prefix, schema, claim_min_idle_ms=60_000)).run(once=True))
    assert (stats.archived, stats.reclaimed) == (40, 0)
    assert _outbox_state(prefix) == (80, 80)

    time.sleep(0.2)
    stats = asyncio.run(Archiver(_config(prefix, schema, claim_min_idle_ms=100)).run(once=True))
    assert (stats.archived, stats.reclaimed) == (80, 80)
    assert sorted(_archived(schema)) == sorted(e.event_id for e in events)
    assert _outbox_state(prefix) == (0, 0)
    client.close()


def test_kill_9_mid_batch_loses_and_duplicates_nothing(names):
    prefix, schema = names
    events = _turn_events(3000, NOW)
    _xadd(prefix, events)
    # The ack delay holds every committed batch unacknowledged for 300 ms: the kill lands in that window.
    proc = _archiver_process(prefix, schema, "--run", "--workers", "2", "--ack-delay-ms", "300")
    try:
        _wait_for(lambda: len(_archived(schema)) >= 400, 30, "the first committed batches")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    committed = len(_archived(schema))
    length, pending = _outbox_state(prefix)
    assert 0 < committed < 3000 and pending > 0  # archived-but-unacknowledged entries exist
    assert length >= 3000 - committed

    time.sleep(0.3)  # the dead consumer's entries become idle for longer than --claim-min-idle-ms
    stats, _ = _finish(_archiver_process(prefix, schema, "--once", "--claim-min-idle-ms", "200"))
    assert stats["reclaimed"] == pending and stats["duplicates"] > 0
    archived = _archived(schema)
    assert len(archived) == 3000 and set(archived) == {e.event_id for e in events}
    assert _outbox_state(prefix) == (0, 0)


def test_sigterm_finishes_the_batch_in_hand(names):
    prefix, schema = names
    _xadd(prefix, _turn_events(500, NOW))
    proc = _archiver_process(prefix, schema, "--run", "--workers", "1", "--ack-delay-ms", "200")
    _wait_for(lambda: _archived(schema), 30, "a first batch")
    proc.send_signal(signal.SIGTERM)
    stats, _ = _finish(proc)
    # Whatever was committed was also acknowledged before the exit: nothing archived is still pending.
    length, pending = _outbox_state(prefix)
    assert pending == 0 and length == 500 - len(_archived(schema)) and stats["archived"] > 0


@pytest.fixture
def own_postgres():
    # mkdtemp dirs are 0700; the postgres user (when we are root) must be able to traverse it.
    run_dir = tempfile.mkdtemp(prefix="npc-archive-pg-", dir="/tmp")
    os.chmod(run_dir, 0o755)
    port = services.free_port()
    records = [services.start_postgres(run_dir, port)]
    try:
        yield run_dir, port, records
    finally:
        services.stop_postgres(records[-1])
        shutil.rmtree(run_dir, ignore_errors=True)


async def _conversation(prefix: str) -> tuple[list[str], dict, str]:
    """The hot path: a whole conversation through MemoryStore (prefetch, turns, a game event, session end, the
    next prompt). Returns the outbox's event ids, the store's counters and the prompt's memory text."""
    clock = FakeClock(NOW)
    config = MemoryConfig(key_prefix=prefix)
    client = connect(config=config)
    store = MemoryStore(client, config, clock=clock)
    try:
        await store.prefetch("vamp-1", "p1")
        for speaker, text in DIALOGUE:
            clock.advance(10)
            await store.record_turn("vamp-1", "p1", speaker, text)
        await store.apply_event("vamp-1", "p1", GameEvent("gift", "a silver ring"))
        ended = await store.end_session("vamp-1", "p1")
        text = await store.prompt_memory("vamp-1", "p1", "the dagger")
        assert ended.summary_text in text
        entries = await client.xrange(outbox_stream(prefix))  # acknowledged entries are deleted: none yet
        return [e[1][b"event_id"].decode() for e in entries], store.stats(), text
    finally:
        await store.aclose()
        await client.aclose()


def test_postgres_down_outbox_grows_hot_path_unaffected(names, own_postgres):
    prefix, schema = names
    run_dir, port, records = own_postgres
    url = records[0]["url"]
    proc = _archiver_process(prefix, schema, "--run", "--backoff-max-s", "0.3", "--batch-wait-ms", "20",
                             database_url=url)
    try:
        first = _turn_events(300, NOW)
        _xadd(prefix, first)
        _wait_for(lambda: len(_archived(schema, url)) == 300, 30, "the first events archived")

        services.stop_postgres(records[0])
        second, stats, _ = asyncio.run(_conversation(prefix))
        # The hot path never noticed: every write went straight to Redis, nothing failed, waited or queued.
        assert len(second) > len(DIALOGUE) and not stats["redis_down"]
        assert (stats["redis_errors"], stats["buffered_writes"], stats["write_errors"]) == (0, 0, 0)
        time.sleep(1.0)  # the archiver keeps failing and backing off meanwhile
        assert proc.poll() is None
        assert _outbox_state(prefix)[0] == len(second)  # the outbox holds the unarchived events

        records.append(services.start_postgres(run_dir, port))  # the same data dir: the archive is back
        total = 300 + len(second)
        _wait_for(lambda: len(_archived(schema, url)) == total, 30, "the backlog archived", every=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
    stats, err = _finish(proc)
    assert stats["pg_retries"] > 0 and "retrying in" in err
    assert sorted(_archived(schema, url)) == sorted([e.event_id for e in first] + second)
    assert _outbox_state(prefix) == (0, 0)


@pytest.fixture
def own_redis():
    run_dir = tempfile.mkdtemp(prefix="npc-archive-redis-", dir="/tmp")
    os.chmod(run_dir, 0o755)
    records = [services.start_redis(run_dir)]
    try:
        yield run_dir, records
    finally:
        services.stop_redis(records[-1])
        shutil.rmtree(run_dir, ignore_errors=True)


def _xadd_to(url: str, prefix: str, events: list[OutboxEvent]) -> None:
    client = redis.Redis.from_url(url)
    try:
        for event in events:
            client.xadd(outbox_stream(prefix), event.to_fields())
    finally:
        client.close()


def test_redis_outage_the_archiver_waits_and_resumes(names, own_redis):
    # An embedded Redis without persistence: after its restart the outbox and the consumer group are gone, so
    # the archiver must also recreate its group (NOGROUP) before it can read again.
    prefix, schema = names
    run_dir, records = own_redis
    url, port = records[0]["url"], records[0]["port"]
    command = [sys.executable, "-m", "memory.archiver", "--run", "--prefix", prefix, "--schema", schema,
               "--redis-url", url, "--database-url", services.database_url(), "--backoff-max-s", "0.3",
               "--batch-wait-ms", "20"]
    proc = subprocess.Popen(command, cwd=services.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        before = _turn_events(200, NOW)
        _xadd_to(url, prefix, before)
        _wait_for(lambda: len(_archived(schema)) == 200, 30, "the first events archived")
        services.stop_redis(records[0])
        time.sleep(1.0)  # the archiver's reads fail and back off meanwhile
        assert proc.poll() is None
        records.append(services.start_redis(run_dir, port))
        after = _turn_events(200, NOW + 60)
        _xadd_to(url, prefix, after)
        _wait_for(lambda: len(_archived(schema)) == 400, 30, "the events written after the outage")
    finally:
        proc.send_signal(signal.SIGTERM)
    stats, err = _finish(proc)
    assert stats["redis_retries"] > 0 and "Redis failed" in err
    assert sorted(_archived(schema)) == sorted(e.event_id for e in before + after)


# -------------------------------------------------------------------------------------------- compaction


def _archive_now(prefix: str, schema: str, events: list[OutboxEvent]):
    _xadd(prefix, events)
    return asyncio.run(Archiver(_config(prefix, schema)).run(once=True))


async def _compact(schema: str, now: float, **overrides) -> compaction.CompactionReport:
    cfg = compaction.CompactionConfig(database_url=services.database_url(), schema=schema, **overrides)
    conn = await asyncpg.connect(services.database_url())
    try:
        return await compaction.compact(conn, cfg, now=now)
    finally:
        await conn.close()


def _history(npc: str = "vamp-1", player: str = "p1") -> tuple[list[OutboxEvent], dict[str, list[str]]]:
    """Turns of three sessions (60, 32 and 3 days before NOW; the 32-day one runs Saturday to Tuesday, across
    the week boundary 30 days before NOW), plus a fact and turns without a session id, 60 days back."""
    sessions, events = {}, []
    for name, start, count, step in (("old", NOW - 60 * DAY, 4, 60.0), ("span", NOW - 32 * DAY, 4, DAY),
                                     ("recent", NOW - 3 * DAY, 3, 60.0)):
        session = uuid.uuid4().hex
        times = [start + i * step for i in range(count)]
        batch = [OutboxEvent("turn", npc, player, ts, _turn(session, ts, f"{name} {i}"))
                 for i, ts in enumerate(times)]
        sessions[name] = [session, [e.event_id for e in batch]]
        events += batch
    events.append(OutboxEvent("fact", npc, player, NOW - 60 * DAY,
                              Fact(text="The player owes the vampire a favour", importance=8,
                                   ts=NOW - 60 * DAY).to_dict()))
    events += [OutboxEvent("turn", npc, player, NOW - 60 * DAY + i, {"speaker": "player", "text": "bare"})
               for i in range(2)]
    return events, sessions


def test_compaction_folds_old_weeks_once(names):
    prefix, schema = names
    events, sessions = _history()
    _archive_now(prefix, schema, events)

    report = asyncio.run(_compact(schema, NOW, fold_after_days=30, ledger_keep_days=50))
    cutoff = NOW - 30 * DAY
    weeks = asyncio.run(_weeks(schema))
    assert report.weeks_folded and all(compaction._week_end(w) > cutoff for w in weeks)
    rows = {r["session_key"]: r for r in asyncio.run(_sql(services.database_url(),
            f"SELECT session_key, turn_count, turns FROM {schema}.sessions"))}
    old_session = sessions["old"][0]
    assert rows[old_session]["turn_count"] == 4
    assert [t["event_id"] for t in json.loads(rows[old_session]["turns"])] == sessions["old"][1]
    bare_day = datetime.fromtimestamp(NOW - 60 * DAY, UTC).strftime("day:%Y-%m-%d")
    assert rows[bare_day]["turn_count"] == 2
    # The 32-day session spans a week boundary: only its first week ended 30 days before NOW.
    span = sessions["span"][0]
    folded_span = rows[span]["turn_count"]
    raw_span = _query(f"SELECT count(*) AS n FROM {schema}.events WHERE session_id = $1", span)[0]["n"]
    assert (folded_span, raw_span) == (2, 2)
    memories = _query(f"SELECT kind FROM {schema}.memories")
    assert [r["kind"] for r in memories] == ["fact"]
    assert report.ledger_pruned == 7  # the ids of the 60-day-old events (older than 50 days)

    again = asyncio.run(_compact(schema, NOW, fold_after_days=30, ledger_keep_days=50))
    assert (again.weeks_folded, again.turns_folded, again.sessions_written) == ([], 0, 0)

    # Two weeks later the rest of the spanning session is folded and merged into its record.
    later = asyncio.run(_compact(schema, NOW + 14 * DAY, fold_after_days=30, ledger_keep_days=50))
    assert later.turns_folded == raw_span
    merged = _query(f"SELECT turn_count, turns FROM {schema}.sessions WHERE session_key = $1", span)[0]
    assert merged["turn_count"] == 4
    assert [t["event_id"] for t in json.loads(merged["turns"])] == sessions["span"][1]


async def _weeks(schema: str) -> set[date]:
    conn = await asyncpg.connect(services.database_url())
    try:
        return await archive_schema.existing_weeks(conn, schema)
    finally:
        await conn.close()


def test_compaction_late_events_and_crash_recovery(names):
    prefix, schema = names
    events, sessions = _history()
    _archive_now(prefix, schema, events)
    asyncio.run(_compact(schema, NOW))
    old_session, old_ids = sessions["old"]

    # A late turn of a folded session recreates its week's partition; the next run merges it.
    late_ts = NOW - 60 * DAY + 600
    late = OutboxEvent("turn", "vamp-1", "p1", late_ts, _turn(old_session, late_ts, "one more thing"))
    stats = _archive_now(prefix, schema, [late, *events[:2]])
    assert (stats.archived, stats.duplicates) == (1, 2)  # folded ids are still in the ledger

    async def crash_after_detach():
        # The first transaction of a run, then a "crash": the next run must finish the fold.
        conn = await asyncpg.connect(services.database_url())
        try:
            await compaction._detach(conn, schema, archive_schema.week_start(late_ts))
        finally:
            await conn.close()

    asyncio.run(crash_after_detach())
    report = asyncio.run(_compact(schema, NOW))
    assert report.turns_folded == 1
    row = asyncio.run(_sql(services.database_url(),
                           f"SELECT turn_count, turns FROM {schema}.sessions WHERE session_key = $1",
                           old_session))[0]
    assert row["turn_count"] == 5
    assert [t["event_id"] for t in json.loads(row["turns"])] == old_ids + [late.event_id]
    left = _query("SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename LIKE 'fold%'", schema)
    assert left == []


# ----------------------------------------------------------------------------------------------- restore


def test_cold_restore_refills_redis_from_the_archive(names):
    prefix, schema = names
    events, sessions = _history()
    t0 = NOW - 40 * DAY
    events += [OutboxEvent("summary", "vamp-1", "p1", t0 + i, Summary(text=f"Summary {i}. " * 30, ts=t0 + i,
                           session_id=sessions["old"][0], turns=4).to_dict()) for i in range(5)]
    events += [OutboxEvent("fact", "vamp-1", "p1", t0 + i, Fact(text=f"fact {i}", importance=i + 1,
                           ts=t0 + i).to_dict()) for i in range(3)]
    events += [OutboxEvent("card", "vamp-1", "p1", t0 + i, {"card_type": "relationship",
                                                            "card": {"trust": i}}) for i in range(3)]
    emotion = EmotionPoint(valence=0.5, arousal=0.2, ts=t0).to_dict()
    events += [OutboxEvent("card", "vamp-1", "p1", t0, {"card_type": "quest", "card": {"active": []}}),
               OutboxEvent("emotion", "vamp-1", "p1", t0, emotion),
               OutboxEvent("turn", "vamp-1", "p2", t0, _turn(uuid.uuid4().hex, t0, "another player"))]
    _archive_now(prefix, schema, events)
    asyncio.run(_compact(schema, NOW))  # part of the history is now folded, part still raw

    async def run_restore():
        client = aioredis.Redis.from_url(services.redis_url())
        cfg = restore.RestoreConfig(redis_url=services.redis_url(), database_url=services.database_url(),
                                    prefix=prefix, schema=schema, max_turns=6, max_summaries=3, max_facts=3)
        await restore.request_restore(client, prefix, "vamp-1", "p1")
        await restore.request_restore(client, prefix, "vamp-1")  # every recent player of the NPC
        restored = await restore.RestoreWorker(cfg).run(once=True)
        blob = await client.get(restore.restore_key(prefix, "vamp-1", "p1"))
        other = await client.get(restore.restore_key(prefix, "vamp-1", "p2"))
        ttl = await client.ttl(restore.restore_key(prefix, "vamp-1", "p1"))
        await client.aclose()
        return restored, json.loads(blob), json.loads(other), ttl

    restored, blob, other, ttl = asyncio.run(run_restore())
    assert restored == 3 and 0 < ttl <= 24 * 3600
    turn_events = sorted((e for e in events if e.kind == "turn" and e.player_id == "p1"), key=lambda e: e.ts)
    assert [t["payload"] for t in blob["turns"]] == [e.payload for e in turn_events[-6:]]
    assert [s["payload"]["text"] for s in blob["summaries"]] == [f"Summary {i}. " * 30 for i in (2, 3, 4)]
    assert [f["payload"]["importance"] for f in blob["facts"]] == [8, 3, 2]  # by importance
    assert blob["cards"]["relationship"]["payload"]["card"] == {"trust": 2}  # the newest version
    assert blob["cards"]["quest"]["payload"]["card"] == {"active": []}
    assert len(blob["emotions"]) == 1 and blob["last_seen"] == pytest.approx(turn_events[-1].ts)
    assert [t["payload"]["text"] for t in other["turns"]] == ["another player"]
