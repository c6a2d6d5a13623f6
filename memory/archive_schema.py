"""The PostgreSQL archive: schema, ordered migrations and weekly partitions.

Everything lives in one schema (default `npc_archive`, configurable so that tests get their own):

    schema_version  (version PK, name, applied_at)      one row per applied migration
    event_ids       (event_id uuid PK, ts)              the idempotency ledger: one row per archived event
    events          (event_id, kind, npc_id, player_id, ts, session_id, payload jsonb, archived_at)
                    PARTITION BY RANGE (ts): one partition per UTC week (Monday 00:00 to Monday 00:00),
                    named events_pYYYYMMDD after its Monday; index (npc_id, player_id, ts)
    sessions        (npc_id, player_id, session_key) PK: turns folded by compaction (first/last ts,
                    turn count, turns as a jsonb array of {event_id, ts, payload})
    memories        (event_id PK, kind, npc_id, player_id, ts, payload): the non-turn events (facts,
                    summaries, cards, emotions, game events) of folded weeks, kept for life

Why a separate ledger: PostgreSQL only allows a unique index on a partitioned table when it includes the
partition key, so `events` cannot have `event_id` alone as its key. The archiver inserts into `event_ids`
with ON CONFLICT (event_id) DO NOTHING and copies only the ids that were new into `events`, in one
statement; `event_id` is therefore unique across all weeks. Compaction prunes ledger rows older than its
keep window (see memory/compaction.py).

Migrations run in one transaction under an advisory lock, so concurrent archivers starting together apply
each migration once; re-running is a no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg

DEFAULT_SCHEMA = "npc_archive"
# Lower-case identifiers only: the name is spliced into SQL (identifiers cannot be bind parameters), so it
# is validated instead of quoted; 63 bytes is PostgreSQL's identifier limit.
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PARTITION_RE = re.compile(r"events_p(\d{8})")
SECONDS_PER_DAY = 86400
# 1970-01-01 was a Thursday: days since the epoch + 3, mod 7, is days since the last Monday.
_EPOCH_WEEKDAY_SHIFT = 3


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str  # `{s}` stands for the schema name


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "raw events partitioned by week, idempotency ledger", """
        CREATE TABLE {s}.event_ids (
            event_id uuid PRIMARY KEY,
            ts timestamptz NOT NULL
        );
        CREATE TABLE {s}.events (
            event_id uuid NOT NULL,
            kind text NOT NULL,
            npc_id text NOT NULL,
            player_id text NOT NULL,
            ts timestamptz NOT NULL,
            session_id text,
            payload jsonb NOT NULL,
            archived_at timestamptz NOT NULL DEFAULT now()
        ) PARTITION BY RANGE (ts);
        CREATE INDEX events_npc_player_ts ON {s}.events (npc_id, player_id, ts);
    """),
    Migration(2, "compacted sessions and kept memories", """
        CREATE TABLE {s}.sessions (
            npc_id text NOT NULL,
            player_id text NOT NULL,
            session_key text NOT NULL,
            first_ts timestamptz NOT NULL,
            last_ts timestamptz NOT NULL,
            turn_count integer NOT NULL,
            turns jsonb NOT NULL,
            compacted_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (npc_id, player_id, session_key)
        );
        CREATE INDEX sessions_npc_player_last ON {s}.sessions (npc_id, player_id, last_ts);
        CREATE TABLE {s}.memories (
            event_id uuid PRIMARY KEY,
            kind text NOT NULL,
            npc_id text NOT NULL,
            player_id text NOT NULL,
            ts timestamptz NOT NULL,
            payload jsonb NOT NULL
        );
        CREATE INDEX memories_npc_player_ts ON {s}.memories (npc_id, player_id, ts);
    """),
)
LATEST_VERSION = MIGRATIONS[-1].version


def validate_schema_name(name: str) -> str:
    if not isinstance(name, str) or not _SCHEMA_RE.fullmatch(name):
        raise ValueError(f"schema name {name!r} must match {_SCHEMA_RE.pattern} (lower-case identifier, "
                         "at most 63 characters)")
    return name


async def migrate(conn: asyncpg.Connection, schema: str = DEFAULT_SCHEMA,
                  target: int = LATEST_VERSION) -> int:
    """Creates the schema and applies every migration up to `target` not applied yet; returns the version."""
    s = validate_schema_name(schema)
    if not 0 <= target <= LATEST_VERSION:
        raise ValueError(f"target version {target} outside 0..{LATEST_VERSION}")
    async with conn.transaction():
        # Serializes concurrent migrators of this schema; released at commit.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"npc-archive-migrate:{s}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer PRIMARY KEY, "
                           "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        applied = {r["version"] for r in await conn.fetch(f"SELECT version FROM {s}.schema_version")}
        for migration in MIGRATIONS:
            if migration.version <= target and migration.version not in applied:
                await conn.execute(migration.sql.format(s=s))
                await conn.execute(f"INSERT INTO {s}.schema_version (version, name) VALUES ($1, $2)",
                                   migration.version, migration.name)
                applied.add(migration.version)
    return max(applied, default=0)


async def schema_version(conn: asyncpg.Connection, schema: str = DEFAULT_SCHEMA) -> int:
    """The highest applied migration; 0 when the schema or its version table does not exist."""
    s = validate_schema_name(schema)
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{s}.schema_version")
    if not exists:
        return 0
    return await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {s}.schema_version")


# ------------------------------------------------------------------------------------------ partitions


def week_start(ts: float) -> date:
    """The Monday (UTC) of the week that holds epoch second `ts`."""
    days = int(ts // SECONDS_PER_DAY)
    return date(1970, 1, 1) + timedelta(days=days - (days + _EPOCH_WEEKDAY_SHIFT) % 7)


def partition_name(week: date) -> str:
    return f"events_p{week:%Y%m%d}"


def _week_bounds(week: date) -> tuple[datetime, datetime]:
    start = datetime(week.year, week.month, week.day, tzinfo=UTC)
    return start, start + timedelta(days=7)


async def existing_weeks(conn: asyncpg.Connection, schema: str = DEFAULT_SCHEMA) -> set[date]:
    """Mondays of the weekly partitions that exist now (read from the catalog)."""
    s = validate_schema_name(schema)
    names = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass($1)", f"{s}.events")
    weeks = set()
    for row in names:
        match = _PARTITION_RE.fullmatch(row["relname"])
        if match:
            weeks.add(datetime.strptime(match.group(1), "%Y%m%d").date())
    return weeks


async def ensure_partitions(conn: asyncpg.Connection, weeks: Iterable[date],
                            schema: str = DEFAULT_SCHEMA) -> None:
    """Creates the weekly partitions of `weeks` that are missing, in a transaction of its own.

    Two sessions running CREATE TABLE IF NOT EXISTS for one name at once can still collide on the catalog's
    unique index, so creation is serialized by an advisory lock.
    """
    s = validate_schema_name(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"npc-archive-partitions:{s}")
        for week in sorted(set(weeks)):
            start, end = _week_bounds(week)
            # Bounds are literals in DDL (no bind parameters there); both are formatted by us from a date.
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.{partition_name(week)} PARTITION OF "
                               f"{s}.events FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')")
