"""npc-archiver: drains the Redis outbox into the PostgreSQL archive, at least once and idempotently.

A separate process (console script `npc-archiver = "memory.archiver:main"`). Each of its `workers` tasks
loops over:
  1. read a batch with XREADGROUP: up to `batch_max` entries (100), waiting at most `batch_wait_ms` (100)
     after the first one arrives;
  2. decode and validate every entry; a bad one is copied to the dead-letter stream `<prefix>outbox:dead`
     with the reason, so one bad event never blocks the others;
  3. COPY the good ones (asyncpg `copy_records_to_table`) into a TEMP staging table, then
     INSERT ... SELECT ... ON CONFLICT (event_id) DO NOTHING into the ledger and the weekly partitions
     (memory/archive_schema.py), and COMMIT;
  4. only after the commit, XACK + XDEL the entries atomically (in the script that reads the worker's next
     batch, or in one MULTI with the dead letters), so the outbox only holds unarchived events.
A crash between 3 and 4 leaves archived entries pending: they are delivered again (to this consumer name at
its next start, or to any archiver through XAUTOCLAIM once idle for `claim_min_idle_ms`) and the ledger
turns the second insert into a no-op. At least once + idempotent insert = every event exactly once.

PostgreSQL down: the worker keeps its batch (unacknowledged) and retries with capped exponential backoff;
meanwhile the outbox simply grows and the hot path, which only XADDs, never notices. Redis down: reads
and acknowledgements retry the same way. SIGTERM / SIGINT: workers finish the batch in hand (commit and
acknowledge) and exit; a batch still waiting for PostgreSQL is left pending for the next start.

Reads go through two tiny Lua scripts (XREADGROUP and XAUTOCLAIM) that return a whole batch as one JSON
string: redis-py's pure-Python RESP parser costs ~35 us of CPU per outbox entry (15 reply elements), one
json.loads in C about 3 us, and that difference is what lets one archiver process pass 20k events/s.

Hazard for producers: never XADD the outbox with MAXLEN/MINID trimming; that would drop unarchived events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from memory import archive_schema
from memory.config import MemoryConfig
from memory.events import outbox_stream, parse_fields
from memory.services import database_url, redis_url

log = logging.getLogger("npc-archiver")

DEAD_STREAM_SUFFIX = "outbox:dead"
DEAD_STREAM_MAXLEN = 10_000  # approximate; the dead-letter stream is for inspection, not a second archive
MAX_NAME_CHARS = 200
MAX_PAYLOAD_BYTES = 256 * 1024
# Event times from 2100 on are rejected: each would create a weekly partition decades away.
MAX_TS = 4_102_444_800.0
FILL_POLL_S = 0.005  # while a batch fills, how long a worker sleeps between reads that found nothing
# The same rule as MemoryConfig.key_prefix: SCAN patterns and key names are built from it.
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,128}:")
# Deletes a consumer only when it owns no pending entry, atomically: deleting one that does would drop
# its entries from the group's pending list, and nobody would ever deliver them again.
_DELETE_IDLE_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ArchiverConfig:
    redis_url: str = field(default_factory=redis_url)
    database_url: str = field(default_factory=database_url)
    prefix: str = MemoryConfig.key_prefix  # the hot path's key prefix: the outbox is <prefix>outbox
    schema: str = archive_schema.DEFAULT_SCHEMA
    group: str = "npc-archiver"
    consumer: str = field(default_factory=default_consumer)
    workers: int = 4  # concurrent read -> COPY -> ack loops; each holds one PostgreSQL connection
    batch_max: int = 100  # events per batch
    batch_wait_ms: int = 100  # longest wait for a batch to fill after its first event
    claim_min_idle_ms: int = 60_000  # a pending entry idle this long belongs to a dead (or stuck) consumer
    claim_every_s: float = 5.0  # how often the reclaimer runs XAUTOCLAIM
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 5.0
    connect_timeout_s: float = 5.0
    command_timeout_s: float = 30.0  # a PostgreSQL statement that hangs longer counts as a failure
    redis_timeout_s: float = 10.0  # socket timeout; must exceed batch_wait_ms (the XREADGROUP BLOCK)
    # Fault injection for tests: sleep this long between COMMIT and XACK, widening the window a kill -9
    # must hit to leave archived-but-unacknowledged entries behind.
    ack_delay_ms: int = 0

    def __post_init__(self):
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url {self.redis_url!r} must be a redis://, rediss:// or unix:// URL")
        if not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"database_url {self.database_url!r} must be a postgresql:// URL")
        if not isinstance(self.prefix, str) or not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must match {_PREFIX.pattern} (end with ':')")
        archive_schema.validate_schema_name(self.schema)
        for name in ("group", "consumer"):
            if not 0 < len(getattr(self, name)) <= MAX_NAME_CHARS:
                raise ValueError(f"{name} must be 1..{MAX_NAME_CHARS} characters")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{f.name} must be a finite number >= 0, got {value!r}")
        if self.workers < 1 or self.batch_max < 1 or self.batch_wait_ms < 1:
            raise ValueError("workers, batch_max and batch_wait_ms must be >= 1")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if self.redis_timeout_s * 1000 <= self.batch_wait_ms:
            raise ValueError("redis_timeout_s must exceed batch_wait_ms, or every idle read would time out")

    @property
    def stream(self) -> str:
        return outbox_stream(self.prefix)

    @property
    def dead_stream(self) -> str:
        return self.prefix + DEAD_STREAM_SUFFIX


# ------------------------------------------------------------------------------------------- decoding


class BadEvent(ValueError):
    """An outbox entry that can never be archived (missing field, bad value); it is dead-lettered."""


class ArchiveRow(NamedTuple):
    """One event as COPYed into the staging table; field order = staging column order."""

    event_id: str  # 32 lower-case hex digits
    kind: str
    npc_id: str
    player_id: str
    ts: float  # epoch seconds
    session_id: str | None  # payload["session_id"] when it is a string: compaction groups turns by it
    payload: str  # compact JSON object, as written by the producer


def decode_entry(entry: Mapping[str, str]) -> ArchiveRow:
    """Validates one outbox entry: the contract of memory.events.OutboxEvent, plus the archive's limits.

    Values arrive as str decoded with surrogateescape, so bytes that were not UTF-8 show up as lone
    surrogates; encoding the payload back (strictly) is what catches them.
    """
    payload = entry.get("payload", "")
    try:
        size = len(payload.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadEvent("payload is not UTF-8") from None
    if size > MAX_PAYLOAD_BYTES:
        raise BadEvent(f"payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}")
    # jsonb rejects the \u0000 escape (text cannot hold NUL), which json.loads accepts.
    if "\\u0000" in payload:
        raise BadEvent("payload contains \\u0000, which PostgreSQL jsonb cannot store")
    try:
        event_id, kind, npc_id, player_id, ts, body = parse_fields(entry)
    except ValueError as exc:
        raise BadEvent(str(exc)) from None
    if ts >= MAX_TS:
        raise BadEvent(f"ts: {ts} is at or after 2100-01-01 ({MAX_TS:.0f} epoch seconds)")
    session_id = body.get("session_id")
    if type(session_id) is not str or not 0 < len(session_id) <= MAX_NAME_CHARS or "\0" in session_id:
        session_id = None
    return ArchiveRow(event_id, kind, npc_id, player_id, ts, session_id, payload)


# ----------------------------------------------------------------------------------------------- Redis

Entry = tuple[str, dict[str, str] | None]  # (stream entry id, fields); fields None once the entry is deleted

# KEYS[1] outbox; ARGV group, consumer, count, id ('>' new entries, '0' this consumer's pending ones), then
# the ids of entries archived since the last read, which are first XACKed and XDELed: a worker acknowledges
# its committed batch in the same round trip as it reads the next one. Scripts cannot block, so this never
# waits; cjson turns an empty table into '{}', read as "nothing".
_READ_SCRIPT = """
for i = 5, #ARGV, 1000 do
    local last = math.min(i + 999, #ARGV)
    redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, last))
    redis.call('XDEL', KEYS[1], unpack(ARGV, i, last))
end
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                         'STREAMS', KEYS[1], ARGV[4])
if not reply then return '[]' end
return cjson.encode(reply[1][2])
"""
# KEYS[1] outbox; ARGV group, consumer, min idle ms, start cursor, count. Returns [next cursor, entries].
_CLAIM_SCRIPT = """
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
return cjson.encode({reply[1], reply[2]})
"""


def _entries_from_json(raw: bytes) -> list[Entry]:
    # surrogateescape keeps non-UTF-8 bytes (which cjson passes through) instead of failing the batch.
    items = json.loads(raw.decode("utf-8", "surrogateescape")) or []
    return [(entry_id, _pairs(flat)) for entry_id, flat in items]


def _pairs(flat) -> dict[str, str] | None:
    return dict(zip(flat[::2], flat[1::2])) if flat else None


def _entries_from_redis_py(reply) -> list[Entry]:
    return [(_str(entry_id), {_str(k): _str(v) for k, v in entry.items()} if entry else None)
            for entry_id, entry in (reply[0][1] if reply else [])]


def _str(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class Outbox:
    """The archiver's side of the outbox stream: reads for one consumer of the group, and acknowledgements."""

    def __init__(self, cfg: ArchiverConfig):
        self.cfg = cfg
        self.redis = aioredis.Redis.from_url(cfg.redis_url, socket_timeout=cfg.redis_timeout_s,
                                             socket_connect_timeout=cfg.connect_timeout_s)
        self._read = self.redis.register_script(_READ_SCRIPT)
        self._claim = self.redis.register_script(_CLAIM_SCRIPT)

    async def create_group(self) -> None:
        # Id 0: events appended before any archiver ever ran are archived too.
        try:
            await self.redis.xgroup_create(self.cfg.stream, self.cfg.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, own_pending: bool = False, ack: Sequence[str] = ()) -> list[Entry]:
        """Up to count new entries (or this consumer's own pending ones), without waiting; first XACKs and
        XDELs the entries `ack` (archived ones: the same as ack(ack, []), in the same round trip)."""
        cfg = self.cfg
        raw = await self._read(keys=[cfg.stream], args=[cfg.group, cfg.consumer, count,
                                                        "0" if own_pending else ">", *ack])
        return _entries_from_json(raw)

    async def wait_first(self, block_ms: int) -> list[Entry]:
        """Waits up to block_ms for one new entry: the blocking read an idle worker sleeps in."""
        reply = await self.redis.xreadgroup(self.cfg.group, self.cfg.consumer, {self.cfg.stream: ">"},
                                            count=1, block=block_ms)
        return _entries_from_redis_py(reply)

    async def claim(self, cursor: str) -> tuple[str, list[Entry]]:
        """XAUTOCLAIM: entries pending longer than claim_min_idle_ms become this consumer's."""
        cfg = self.cfg
        raw = await self._claim(keys=[cfg.stream], args=[cfg.group, cfg.consumer, cfg.claim_min_idle_ms,
                                                         cursor, cfg.batch_max])
        next_cursor, items = json.loads(raw.decode("utf-8", "surrogateescape"))
        return next_cursor, [(entry_id, _pairs(flat)) for entry_id, flat in (items or [])]

    async def ack(self, ids: list[str], dead: list[tuple[str, dict | None, str]]) -> None:
        """Dead-letters `dead`, then XACKs and XDELs all of `ids`, in one MULTI: never acknowledged but
        left behind, never deleted but still pending."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for entry_id, entry, reason in dead:
                record = {b"entry_id": entry_id.encode(), b"error": reason.encode()}
                record |= {b"field:" + _bytes(k): _bytes(v) for k, v in (entry or {}).items()}
                pipe.xadd(self.cfg.dead_stream, record, maxlen=DEAD_STREAM_MAXLEN, approximate=True)
            pipe.xack(self.cfg.stream, self.cfg.group, *ids)
            pipe.xdel(self.cfg.stream, *ids)
            await pipe.execute()

    async def delete_idle_consumers(self) -> None:
        # Every run under a pid-based name leaves a consumer behind; drop the long-idle ones owning nothing.
        idle_ms = max(10 * self.cfg.claim_min_idle_ms, 60_000)
        for info in await self.redis.xinfo_consumers(self.cfg.stream, self.cfg.group):
            name = _str(info["name"]) if isinstance(info["name"], bytes) else info["name"]
            if name != self.cfg.consumer and info["pending"] == 0 and info["idle"] > idle_ms:
                await self.redis.eval(_DELETE_IDLE_CONSUMER, 1, self.cfg.stream, self.cfg.group, name)

    async def close(self) -> None:
        await self.redis.aclose()


# ------------------------------------------------------------------------------------------ PostgreSQL

# The staging table empties itself at every commit (ON COMMIT DELETE ROWS truncates it in place). Not a
# DELETE of the staged rows in an autocommitted statement: autovacuum never visits TEMP tables, so every
# batch would leave its dead rows behind for good and each later scan of the table would read them all.
_STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS archiver_staging (
    event_id uuid, kind text, npc_id text, player_id text, ts double precision, session_id text,
    payload jsonb
) ON COMMIT DELETE ROWS
"""
# The ledger insert returns only the ids it actually inserted; only those rows reach `events`. One statement,
# so a redelivered batch (or two archivers racing on one entry) archives each event once.
_INSERT_SQL = """
WITH fresh AS (
    INSERT INTO {s}.event_ids (event_id, ts)
    SELECT event_id, to_timestamp(ts) FROM archiver_staging
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
)
INSERT INTO {s}.events (event_id, kind, npc_id, player_id, ts, session_id, payload)
SELECT st.event_id, st.kind, st.npc_id, st.player_id, to_timestamp(st.ts), st.session_id, st.payload
FROM archiver_staging st JOIN fresh USING (event_id)
"""


def _is_data_error(exc: BaseException) -> bool:
    # Class 22 (data exception, e.g. a lone surrogate escape jsonb refuses): something about these rows,
    # not about the server. Anything else (connection lost, server restarting, a partition dropped by
    # compaction meanwhile) is retried on a fresh connection.
    return isinstance(exc, asyncpg.PostgresError) and str(getattr(exc, "sqlstate", "")).startswith("22")


class PgWriter:
    """One PostgreSQL connection with its staging table and its view of which weekly partitions exist."""

    def __init__(self, cfg: ArchiverConfig):
        self.cfg = cfg
        self.conn: asyncpg.Connection | None = None
        self.weeks: set = set()
        self.insert_sql = _INSERT_SQL.format(s=cfg.schema)
        self.insert: asyncpg.prepared_stmt.PreparedStatement | None = None  # on self.conn

    async def write(self, rows: Sequence[ArchiveRow]) -> int:
        """Archives rows in one transaction; returns how many were new (the rest were already archived)."""
        conn = await self._connection()
        missing = {archive_schema.week_start(r.ts) for r in rows} - self.weeks
        if missing:
            await archive_schema.ensure_partitions(conn, missing, self.cfg.schema)
            self.weeks |= missing
        async with conn.transaction():
            await conn.copy_records_to_table("archiver_staging", records=rows)
            await self.insert.fetch()
        return int(self.insert.get_statusmsg().rsplit(" ", 1)[-1])  # "INSERT 0 <rows>"

    async def _connection(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            conn = await asyncpg.connect(self.cfg.database_url, timeout=self.cfg.connect_timeout_s,
                                         command_timeout=self.cfg.command_timeout_s)
            try:
                await conn.execute(_STAGING_DDL)
                # Prepared once per connection: planning the insert (a CTE into a partitioned table) for
                # every batch cost PostgreSQL more than executing it. New or dropped partitions invalidate
                # the plan and PostgreSQL replans by itself.
                self.insert = await conn.prepare(self.insert_sql)
                self.weeks = await archive_schema.existing_weeks(conn, self.cfg.schema)
            except BaseException:
                conn.terminate()
                raise
            self.conn = conn
        return self.conn

    def drop(self) -> None:
        """Forgets the connection after a failure; the next write reconnects."""
        if self.conn is not None:
            self.conn.terminate()
        self.conn = None

    async def close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close(timeout=2.0)
            except Exception:  # a broken connection has nothing left to flush: just drop it
                self.conn.terminate()
        self.conn = None


# ------------------------------------------------------------------------------------------- the loop


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: initial, 2x, 4x, ... up to max_s, each scaled by 0.5..1."""

    initial_s: float
    max_s: float
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * 2 ** min(self.attempt, 60))
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class Stats:
    read: int = 0  # new entries read from the outbox (reclaimed ones are counted in `reclaimed`)
    archived: int = 0  # rows new to the archive
    duplicates: int = 0  # entries already archived (redelivered) or repeated within a batch
    dead: int = 0  # entries dead-lettered
    reclaimed: int = 0  # entries taken over from idle consumers
    batches: int = 0
    pg_retries: int = 0
    redis_retries: int = 0


_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_PG_CONNECT_ERRORS = (TimeoutError, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                      asyncpg.CannotConnectNowError)


class _Stopped(Exception):
    """Raised out of a Redis retry loop once stop() was called."""


class Archiver:
    def __init__(self, cfg: ArchiverConfig):
        self.cfg = cfg
        self.outbox = Outbox(cfg)
        self.stats = Stats()
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        self.stopping.set()

    async def run(self, once: bool = False) -> Stats:
        """Archives until stop() (or, with once, until the outbox has nothing left to deliver)."""
        try:
            await self._with_redis_retry(self.outbox.create_group)
            if not await self._migrate():
                return self.stats
            writer = PgWriter(self.cfg)
            try:
                await self._reclaim_pass(writer, own_first=True)
            finally:
                await writer.close()
            tasks = [self._worker(once) for _ in range(self.cfg.workers)]
            if not once:
                tasks.append(self._reclaimer())
            await asyncio.gather(*tasks)  # each task returns on stop(), _Stopped included
        except _Stopped:
            pass
        finally:
            await self.outbox.close()
        return self.stats

    async def _migrate(self) -> bool:
        """Brings the schema up to date, waiting out a PostgreSQL that is down; False if stopped first."""
        backoff = Backoff(self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
        while not self.stopping.is_set():
            try:
                conn = await asyncpg.connect(self.cfg.database_url, timeout=self.cfg.connect_timeout_s)
                try:
                    await archive_schema.migrate(conn, self.cfg.schema)
                    await archive_schema.ensure_partitions(conn, _weeks_around(time.time()), self.cfg.schema)
                finally:
                    await conn.close()
                return True
            except _PG_CONNECT_ERRORS as exc:
                await self._sleep_or_stop(backoff, f"PostgreSQL not reachable for migration ({exc!r})")
        return False

    async def _worker(self, once: bool) -> None:
        writer = PgWriter(self.cfg)
        archived: list[str] = []  # entry ids committed to PostgreSQL and not yet acknowledged
        try:
            while not self.stopping.is_set():
                entries = await self._with_redis_retry(lambda ack=archived: self._read_batch(ack))
                archived = []  # the read acknowledged them
                if entries:
                    archived = await self._process(entries, writer, defer_ack=True)
                elif once:
                    return
            if archived:  # stopping: what was committed is acknowledged before the worker ends
                await self._with_redis_retry(lambda: self.outbox.ack(archived, []))
        except _Stopped:
            pass
        finally:
            await writer.close()

    async def _read_batch(self, ack: Sequence[str] = ()) -> list[Entry]:
        """Up to batch_max new entries: waits batch_wait_ms for the first, then up to batch_wait_ms more
        (polling every FILL_POLL_S) for the batch to fill. The first read acknowledges `ack`."""
        cfg = self.cfg
        entries = await self.outbox.read(cfg.batch_max, ack=ack)
        if not entries:
            entries = await self.outbox.wait_first(cfg.batch_wait_ms)
            if not entries:
                return []
        deadline = time.monotonic() + cfg.batch_wait_ms / 1000
        while len(entries) < cfg.batch_max and not self.stopping.is_set():
            more = await self.outbox.read(cfg.batch_max - len(entries))
            entries += more
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not more:
                await asyncio.sleep(min(left, FILL_POLL_S))
        self.stats.read += len(entries)
        return entries

    async def _process(self, entries: list[Entry], writer: PgWriter, defer_ack: bool = False) -> list[str]:
        """Archives one batch, then acknowledges it; leaves it pending if told to stop before the commit.
        With defer_ack, a batch without dead letters is not acknowledged here: its entry ids are returned
        for the worker's next read to acknowledge (one round trip fewer per batch)."""
        rows, dead = _decode_batch(entries)
        if rows:
            refused = await self._archive(writer, [row for row, _ in rows.values()])
            if refused is None:
                return []
            dead += [(*rows[row.event_id][1], reason) for row, reason in refused]
        if self.cfg.ack_delay_ms:
            await asyncio.sleep(self.cfg.ack_delay_ms / 1000)
        ids = [entry_id for entry_id, _ in entries]
        self.stats.batches += 1
        if defer_ack and not dead:
            return ids
        await self._with_redis_retry(lambda: self.outbox.ack(ids, dead))
        for entry_id, _, reason in dead:
            log.warning("dead-lettered outbox entry %s to %s: %s", entry_id, self.cfg.dead_stream, reason)
        self.stats.dead += len(dead)
        return []

    async def _archive(self, writer: PgWriter, rows: list[ArchiveRow]) -> list[tuple[ArchiveRow, str]] | None:
        """Commits rows, retrying with backoff; returns the rows PostgreSQL refused as bad data (with its
        reason), or None when told to stop before the commit (the batch then stays pending)."""
        backoff = Backoff(self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
        while True:
            try:
                inserted = await writer.write(rows)
            except Exception as exc:
                if _is_data_error(exc):
                    return await self._isolate(writer, rows, exc)
                writer.drop()
                self.stats.pg_retries += 1
                await self._sleep_or_stop(backoff, f"PostgreSQL write failed ({exc!r})")
                if self.stopping.is_set():
                    return None
                continue
            self.stats.archived += inserted
            self.stats.duplicates += len(rows) - inserted
            return []

    async def _isolate(self, writer: PgWriter, rows: list[ArchiveRow], exc: Exception):
        # Bisects a batch PostgreSQL refused so that only the offending rows are dead-lettered: log2(batch)
        # extra transactions, and only ever for data that slipped past decode_entry.
        if len(rows) == 1:
            return [(rows[0], f"PostgreSQL refused the row: {exc}")]
        refused = []
        for part in (rows[: len(rows) // 2], rows[len(rows) // 2:]):
            got = await self._archive(writer, part)
            if got is None:
                return None
            refused += got
        return refused

    # --- reclaiming the pending entries of dead consumers

    async def _reclaimer(self) -> None:
        writer = PgWriter(self.cfg)
        try:
            while not await self._wait_stop(self.cfg.claim_every_s):
                await self._reclaim_pass(writer)
        except _Stopped:
            pass
        finally:
            await writer.close()

    async def _reclaim_pass(self, writer: PgWriter, own_first: bool = False) -> None:
        """Archives this consumer's own pending entries (own_first: a previous run under the same name
        died with them), then every entry pending longer than claim_min_idle_ms, whoever holds it."""
        while own_first and not self.stopping.is_set():
            entries = await self._with_redis_retry(lambda: self.outbox.read(self.cfg.batch_max, True))
            if not entries:
                break
            await self._process(entries, writer)
        cursor = "0-0"
        while not self.stopping.is_set():
            cursor, entries = await self._with_redis_retry(lambda c=cursor: self.outbox.claim(c))
            if entries:
                self.stats.reclaimed += len(entries)
                log.info("reclaimed %d entries pending on idle consumers", len(entries))
                await self._process(entries, writer)
            if cursor == "0-0":
                break
        await self._with_redis_retry(self.outbox.delete_idle_consumers)

    # --- retry helpers

    async def _with_redis_retry(self, operation):
        """Runs operation until Redis answers. While stopping, a failure ends the wait (_Stopped): entries
        left unacknowledged are redelivered later, and the ledger makes that harmless."""
        backoff = Backoff(self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
        while True:
            try:
                return await operation()
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group %s is gone (stream deleted?); creating it again", self.cfg.group)
                await self.outbox.create_group()
            except _REDIS_ERRORS as exc:
                self.stats.redis_retries += 1
                await self._sleep_or_stop(backoff, f"Redis failed ({exc!r})")
                if self.stopping.is_set():
                    raise _Stopped from exc

    async def _sleep_or_stop(self, backoff: Backoff, why: str) -> None:
        await self._wait_stop(self._delay(backoff, why))

    @staticmethod
    def _delay(backoff: Backoff, why: str) -> float:
        delay = backoff.next_delay()
        log.warning("%s; retrying in %.2f s", why, delay)
        return delay

    async def _wait_stop(self, seconds: float) -> bool:
        """Sleeps up to seconds; True as soon as stop() was called."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True


def _decode_batch(entries: list[Entry]) -> tuple[dict[str, tuple[ArchiveRow, tuple]], list[tuple]]:
    """Good rows keyed (so de-duplicated) by event id, each with its (entry id, fields); and
    (entry id, fields, reason) of the entries that cannot be archived."""
    rows: dict[str, tuple[ArchiveRow, tuple]] = {}
    dead = []
    for entry_id, entry in entries:
        if not entry:
            continue  # deleted from the stream while pending: nothing left to archive, only to acknowledge
        try:
            row = decode_entry(entry)
        except BadEvent as exc:
            dead.append((entry_id, entry, str(exc)))
            continue
        rows[row.event_id] = (row, (entry_id, entry))
    return rows, dead


def _weeks_around(now: float) -> list:
    # The current and next week exist before the first event of the week arrives.
    week_s = 7 * archive_schema.SECONDS_PER_DAY
    return [archive_schema.week_start(now), archive_schema.week_start(now + week_s)]


# ------------------------------------------------------------------------------------------------- CLI


def parse_config(argv: list[str] | None = None) -> tuple[ArchiverConfig, bool]:
    defaults = ArchiverConfig()
    parser = argparse.ArgumentParser(prog="npc-archiver", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="archive until SIGTERM (the default)")
    mode.add_argument("--once", action="store_true", help="archive what the outbox holds now, then exit")
    parser.add_argument("--redis-url", default=defaults.redis_url)
    parser.add_argument("--database-url", default=defaults.database_url)
    parser.add_argument("--prefix", default=defaults.prefix, help="Redis key prefix (stream <prefix>outbox)")
    parser.add_argument("--schema", default=defaults.schema, help="PostgreSQL schema of the archive")
    parser.add_argument("--group", default=defaults.group, help="consumer group name")
    parser.add_argument("--consumer", default=defaults.consumer, help="consumer name (default host-pid)")
    for name in ("workers", "batch_max", "batch_wait_ms", "claim_min_idle_ms", "ack_delay_ms"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("claim_every_s", "backoff_initial_s", "backoff_max_s"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    args = vars(parser.parse_args(argv))
    once = args.pop("once")
    args.pop("run")
    try:
        return ArchiverConfig(**args), once
    except ValueError as exc:
        parser.error(str(exc))


async def _run_until_signal(cfg: ArchiverConfig, once: bool) -> Stats:
    archiver = Archiver(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, archiver.stop)
    return await archiver.run(once=once)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, once = parse_config(argv)
    log.info("archiving %s (group %s, consumer %s) into schema %s", cfg.stream, cfg.group, cfg.consumer,
             cfg.schema)
    stats = asyncio.run(_run_until_signal(cfg, once))
    log.info("stopped: %s", stats)
    # One JSON line on stdout, for scripts and tests that drive the archiver as a process.
    print(json.dumps(vars(stats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
