"""Weekly compaction of the PostgreSQL archive: raw turns older than N days become per-session records.

Run it once a week (cron, a systemd timer, a Kubernetes CronJob):

    python -m memory.compaction --fold-after-days 30 [--now EPOCH] [--schema npc_archive]

Unit of work: one weekly partition of `events` (memory/archive_schema.py) whose whole week ended at least
`fold_after_days` before `now`. For each, oldest first:
  1. (transaction 1) DETACH it from `events` and rename it `fold_pYYYYMMDD`: the archiver's inserts wait
     only for this catalog change, never for the fold itself;
  2. (transaction 2) fold its turns into `sessions` (one row per npc x player x session; a session already
     there, e.g. one that spans two weeks, is merged, turns de-duplicated by event_id), copy its other events
     (facts, summaries, cards, emotions, game events) into `memories`, and DROP the table.
A crash after 1 leaves a `fold_*` table that the next run folds first. Transaction 2 is all or nothing, so
re-running never folds a turn twice: the job is idempotent. Turns without a session id in their payload are
grouped per UTC day (session key `day:YYYY-MM-DD`). A session's `turns` is a jsonb array, oldest first, of
{"event_id": uuid hex, "ts": epoch seconds, "payload": the outbox payload}.

An event that arrives late for a folded week recreates that week's partition (the archiver does it) and is
folded, merged into its session, by the next run. Finally the idempotency ledger drops ids older than
`ledger_keep_days`: an outbox entry delivered again after that long would be archived twice (in practice
redelivery happens within `claim_min_idle_ms` of a crash).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime

import asyncpg

from memory import archive_schema
from memory.archive_schema import SECONDS_PER_DAY, partition_name
from memory.services import database_url

_FOLD_RE = re.compile(r"fold_p(\d{8})")

def _fold_turns_sql(s: str, t: str) -> str:
    # A session already folded (a previous week, or a late event) is merged: both turn lists, de-duplicated
    # by event_id, ordered by time.
    merged = ("(SELECT jsonb_agg(x ORDER BY (x->>'ts')::float8, x->>'event_id') FROM "
              "(SELECT DISTINCT ON (x->>'event_id') x "
              "FROM jsonb_array_elements(old.turns || excluded.turns) x) d)")
    return f"""
INSERT INTO {s}.sessions AS old (npc_id, player_id, session_key, first_ts, last_ts, turn_count, turns)
SELECT npc_id, player_id,
       coalesce(session_id, 'day:' || to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')),
       min(ts), max(ts), count(*),
       jsonb_agg(jsonb_build_object('event_id', replace(event_id::text, '-', ''),
                                    'ts', extract(epoch FROM ts)::float8, 'payload', payload)
                 ORDER BY ts, event_id)
FROM {s}.{t} WHERE kind = 'turn'
GROUP BY 1, 2, 3
ON CONFLICT (npc_id, player_id, session_key) DO UPDATE SET
    first_ts = least(old.first_ts, excluded.first_ts),
    last_ts = greatest(old.last_ts, excluded.last_ts),
    turns = {merged},
    turn_count = jsonb_array_length({merged}),
    compacted_at = now()
"""

_KEEP_MEMORIES = """
INSERT INTO {s}.memories (event_id, kind, npc_id, player_id, ts, payload)
SELECT event_id, kind, npc_id, player_id, ts, payload FROM {s}.{t} WHERE kind <> 'turn'
ON CONFLICT (event_id) DO NOTHING
"""


@dataclass(frozen=True)
class CompactionConfig:
    database_url: str = field(default_factory=database_url)
    schema: str = archive_schema.DEFAULT_SCHEMA
    fold_after_days: float = 30.0  # raw turns this old are folded (at week granularity: up to 7 days later)
    ledger_keep_days: float = 90.0  # idempotency ids kept this long after their event

    def __post_init__(self):
        if not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"database_url {self.database_url!r} must be a postgresql:// URL")
        archive_schema.validate_schema_name(self.schema)
        for name in ("fold_after_days", "ledger_keep_days"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 1):
                raise ValueError(f"{name} must be a number of days >= 1, got {value!r}")
        if self.ledger_keep_days < self.fold_after_days:
            raise ValueError("ledger_keep_days must be >= fold_after_days: a folded week's ids must outlive "
                             "its raw rows, or a redelivered event could be archived again")


@dataclass
class CompactionReport:
    weeks_folded: list[str] = field(default_factory=list)  # Mondays (ISO dates) of the folded partitions
    turns_folded: int = 0
    sessions_written: int = 0  # session rows inserted or merged
    memories_kept: int = 0  # non-turn events moved to `memories`
    ledger_pruned: int = 0


async def compact(conn: asyncpg.Connection, cfg: CompactionConfig,
                  now: float | None = None) -> CompactionReport:
    """Folds every weekly partition that ended fold_after_days before `now` (epoch seconds; default the
    wall clock), then prunes the ledger. Safe to run again at any point, also after a crash."""
    now = time.time() if now is None else now
    s, report = cfg.schema, CompactionReport()
    await archive_schema.migrate(conn, s)
    cutoff = now - cfg.fold_after_days * SECONDS_PER_DAY
    for week in sorted(await archive_schema.existing_weeks(conn, s)):
        if _week_end(week) <= cutoff:
            await _detach(conn, s, week)
    for week in await _detached_weeks(conn, s):  # this run's, and any a crashed run left behind
        await _fold(conn, s, week, report)
    keep_from = datetime.fromtimestamp(now - cfg.ledger_keep_days * SECONDS_PER_DAY, UTC)
    status = await conn.execute(f"DELETE FROM {s}.event_ids WHERE ts < $1", keep_from)
    report.ledger_pruned = int(status.rsplit(" ", 1)[-1])
    return report


def _week_end(week: date) -> float:
    return datetime(week.year, week.month, week.day, tzinfo=UTC).timestamp() + 7 * SECONDS_PER_DAY


def _fold_name(week: date) -> str:
    return f"fold_p{week:%Y%m%d}"


async def _detach(conn: asyncpg.Connection, s: str, week: date) -> None:
    async with conn.transaction():
        await conn.execute(f"ALTER TABLE {s}.events DETACH PARTITION {s}.{partition_name(week)}")
        await conn.execute(f"ALTER TABLE {s}.{partition_name(week)} RENAME TO {_fold_name(week)}")


async def _detached_weeks(conn: asyncpg.Connection, s: str) -> list[date]:
    names = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename LIKE $2",
                             s, "fold\\_p%")
    weeks = [_FOLD_RE.fullmatch(r["tablename"]) for r in names]
    return sorted(datetime.strptime(m.group(1), "%Y%m%d").date() for m in weeks if m)


async def _fold(conn: asyncpg.Connection, s: str, week: date, report: CompactionReport) -> None:
    t = _fold_name(week)
    async with conn.transaction():
        turns = await conn.fetchval(f"SELECT count(*) FROM {s}.{t} WHERE kind = 'turn'")
        sessions = await conn.execute(_fold_turns_sql(s, t))
        kept = await conn.execute(_KEEP_MEMORIES.format(s=s, t=t))
        await conn.execute(f"DROP TABLE {s}.{t}")
    report.weeks_folded.append(week.isoformat())
    report.turns_folded += turns
    report.sessions_written += int(sessions.rsplit(" ", 1)[-1])
    report.memories_kept += int(kept.rsplit(" ", 1)[-1])


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    defaults = CompactionConfig()
    parser = argparse.ArgumentParser(prog="npc-archive-compact", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=defaults.database_url)
    parser.add_argument("--schema", default=defaults.schema)
    parser.add_argument("--fold-after-days", type=float, default=defaults.fold_after_days)
    parser.add_argument("--ledger-keep-days", type=float, default=defaults.ledger_keep_days)
    parser.add_argument("--now", type=float, default=None,
                        help="epoch seconds to compact as of (default: the wall clock)")
    args = parser.parse_args(argv)
    try:
        cfg = CompactionConfig(args.database_url, args.schema, args.fold_after_days, args.ledger_keep_days)
    except ValueError as exc:
        parser.error(str(exc))
    report = asyncio.run(_compact_once(cfg, args.now))
    print(json.dumps(asdict(report)), flush=True)
    return 0


async def _compact_once(cfg: CompactionConfig, now: float | None) -> CompactionReport:
    conn = await asyncpg.connect(cfg.database_url)
    try:
        return await compact(conn, cfg, now)
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
