"""Cold restore: refills Redis from the PostgreSQL archive for an NPC x player unseen for more than 30 days.

Nothing on the hot path reads PostgreSQL. `MemoryStore.prefetch`, finding nothing in Redis for a pair (its
keys expire after 31 idle days, its entries leave the 30-day window), sends one XADD to
`<prefix>restore:requests` in the background (`request_restore` is the same command) and serves the
conversation start with what it has. This background job (`python -m memory.restore --run`, a process of
its own like the archiver) reads each request with a consumer group, reads the pair's history from the
archive and writes it as one JSON blob, with a TTL, to

    <prefix>restore:<npc_id>:<player_id>

    {"version": 1, "npc_id": ..., "player_id": ..., "restored_at": epoch s, "last_seen": epoch s | null,
     "turns":     [{"ts": epoch s, "payload": Turn dict}, ...]            oldest first, the newest max_turns
     "summaries": [{"ts": ..., "payload": Summary dict}, ...]            oldest first, newest max_summaries
     "facts":     [{"ts": ..., "payload": Fact dict}, ...]               most important first (max_facts)
     "emotions":  [{"ts": ..., "payload": EmotionPoint dict}, ...]       oldest first, newest max_emotions
     "cards":     {"relationship": {"ts": ..., "payload": {...}}, "quest": {...}}   the newest of each type
     "events":    [{"ts": ..., "payload": GameEvent dict}, ...]          oldest first, newest max_events}

Payloads are the outbox payloads exactly as archived (memory/events.py). The store finds the blob with the
GET that every prefetch round trip carries, merges facts, summaries, emotion points and cards into the
pair's keys (re-scored into the window: memory/store.py) and deletes the blob. Key names and the blob
version come from memory/nearline.py, so the two sides cannot disagree; the prefix defaults to
MemoryConfig.key_prefix, like the archiver's. A request for an NPC without a player id restores the
`max_players` players that NPC saw last. Requests are idempotent (the blob is overwritten), acknowledged
only after the blob is written, and reclaimed from dead workers like the archiver's outbox entries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from memory import archive_schema
from memory.archiver import Backoff, default_consumer
from memory.config import MemoryConfig
from memory.nearline import RESTORE_VERSION, restore_key, restore_request_cmd
from memory.nearline import restore_requests_stream as requests_stream
from memory.records import check_id
from memory.services import database_url, redis_url

log = logging.getLogger("npc-restore")


async def request_restore(client: aioredis.Redis, prefix: str, npc_id: str,
                          player_id: str | None = None) -> None:
    """Asks the restore job for a pair's (or an NPC's) history: one XADD, safe to call on the hot path."""
    await client.execute_command(*restore_request_cmd(prefix, npc_id, player_id))


@dataclass(frozen=True)
class RestoreConfig:
    redis_url: str = field(default_factory=redis_url)
    database_url: str = field(default_factory=database_url)
    prefix: str = MemoryConfig.key_prefix
    schema: str = archive_schema.DEFAULT_SCHEMA
    group: str = "npc-restore"
    consumer: str = field(default_factory=default_consumer)
    max_turns: int = 20  # the hot window's maximum
    max_summaries: int = 3
    # Headroom over MemoryConfig.max_facts (10): the archive keeps a fact learned again under a new id, and
    # the store de-duplicates by text before it keeps the 10 best.
    max_facts: int = 30
    max_emotions: int = 16
    max_events: int = 10
    max_players: int = 20  # pairs restored for a request that names only the NPC
    blob_ttl_s: int = 24 * 3600  # the nearline layer consumes the blob long before this
    claim_min_idle_ms: int = 60_000
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0

    def __post_init__(self):
        MemoryConfig(key_prefix=self.prefix)  # the one rule for prefixes (ValueError names it)
        archive_schema.validate_schema_name(self.schema)
        for name in ("max_turns", "max_summaries", "max_facts", "max_emotions", "max_events", "max_players",
                     "blob_ttl_s", "claim_min_idle_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (math.isfinite(self.backoff_initial_s) and 0 < self.backoff_initial_s <= self.backoff_max_s):
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")


# ------------------------------------------------------------------------------------ reading the archive

# Non-turn history of a pair, raw (events) and folded (memories): the newest few of each kind; facts by
# importance, then newest, then fact_id (the hot path's retention order, so ties fall the same way); the
# newest card of each card type.
_MEMORY_SQL = """
SELECT kind, extract(epoch FROM ts) AS ts, payload FROM (
    SELECT kind, ts, payload, row_number() OVER (
        PARTITION BY kind, CASE WHEN kind = 'card' THEN payload->>'card_type' END
        ORDER BY CASE WHEN kind = 'fact' AND jsonb_typeof(payload->'importance') = 'number'
                      THEN (payload->>'importance')::float8 END DESC NULLS LAST, ts DESC,
                 payload->>'fact_id' DESC) AS rank
    FROM (SELECT kind, ts, payload FROM {s}.events WHERE npc_id = $1 AND player_id = $2 AND kind <> 'turn'
          UNION ALL
          SELECT kind, ts, payload FROM {s}.memories WHERE npc_id = $1 AND player_id = $2) history
) ranked
WHERE rank <= CASE kind WHEN 'summary' THEN $3 WHEN 'fact' THEN $4 WHEN 'emotion' THEN $5
                        WHEN 'event' THEN $6 ELSE 1 END
"""
# The newest turns: raw ones, plus those of the newest folded sessions (which hold at most a few).
_TURNS_SQL = """
SELECT ts, payload FROM (
    SELECT extract(epoch FROM ts)::float8 AS ts, payload, replace(event_id::text, '-', '') AS event_id
    FROM {s}.events
    WHERE npc_id = $1 AND player_id = $2 AND kind = 'turn'
    UNION
    SELECT (t->>'ts')::float8, t->'payload', t->>'event_id'
    FROM (SELECT turns FROM {s}.sessions WHERE npc_id = $1 AND player_id = $2
          ORDER BY last_ts DESC LIMIT $3) newest, jsonb_array_elements(newest.turns) t
) turns ORDER BY ts DESC, event_id DESC LIMIT $3
"""
_LAST_SEEN_SQL = """
SELECT max(ts) FROM (
    SELECT max(extract(epoch FROM ts)) AS ts FROM {s}.events WHERE npc_id = $1 AND player_id = $2
    UNION ALL SELECT max(extract(epoch FROM ts)) FROM {s}.memories WHERE npc_id = $1 AND player_id = $2
    UNION ALL SELECT max(extract(epoch FROM last_ts)) FROM {s}.sessions WHERE npc_id = $1 AND player_id = $2
) seen
"""
_RECENT_PLAYERS_SQL = """
SELECT player_id FROM (
    SELECT player_id, max(ts) AS seen FROM {s}.events WHERE npc_id = $1 GROUP BY player_id
    UNION ALL SELECT player_id, max(last_ts) FROM {s}.sessions WHERE npc_id = $1 GROUP BY player_id
    UNION ALL SELECT player_id, max(ts) FROM {s}.memories WHERE npc_id = $1 GROUP BY player_id
) seen GROUP BY player_id ORDER BY max(seen) DESC LIMIT $2
"""


async def read_history(conn: asyncpg.Connection, cfg: RestoreConfig, npc_id: str, player_id: str,
                       now: float | None = None) -> dict:
    """The restore blob of one pair (see the module doc), read from the archive."""
    s = cfg.schema
    args = (npc_id, player_id)
    turns = await conn.fetch(_TURNS_SQL.format(s=s), *args, cfg.max_turns)
    memories = await conn.fetch(_MEMORY_SQL.format(s=s), *args, cfg.max_summaries, cfg.max_facts,
                                cfg.max_emotions, cfg.max_events)
    last_seen = await conn.fetchval(_LAST_SEEN_SQL.format(s=s), *args)
    blob = {"version": RESTORE_VERSION, "npc_id": npc_id, "player_id": player_id,
            "restored_at": time.time() if now is None else now,
            "last_seen": float(last_seen) if last_seen is not None else None,
            "turns": [_item(r) for r in reversed(turns)],
            "summaries": [], "facts": [], "emotions": [], "cards": {}, "events": []}
    plural = {"summary": "summaries", "fact": "facts", "emotion": "emotions", "event": "events"}
    for row in memories:
        if row["kind"] == "card":
            blob["cards"][_card_type(row["payload"])] = _item(row)
        elif row["kind"] in plural:
            blob[plural[row["kind"]]].append(_item(row))
    for name in ("summaries", "emotions", "events"):
        blob[name].sort(key=lambda item: item["ts"])
    blob["facts"].sort(key=lambda item: (-_importance(item["payload"]), -item["ts"]))
    return blob


def _item(row) -> dict:
    # asyncpg returns jsonb as text and numeric epoch seconds as Decimal.
    return {"ts": float(row["ts"]), "payload": json.loads(row["payload"])}


def _card_type(payload_text: str) -> str:
    card_type = json.loads(payload_text).get("card_type")
    return card_type if isinstance(card_type, str) else "unknown"


def _importance(payload: dict) -> float:
    value = payload.get("importance")
    return float(value) if isinstance(value, int | float) else 0.0


async def restore_pair(conn: asyncpg.Connection, client: aioredis.Redis, cfg: RestoreConfig, npc_id: str,
                       player_id: str, now: float | None = None) -> dict:
    """Reads a pair's history and writes it to `restore_key`; returns the blob written."""
    blob = await read_history(conn, cfg, npc_id, player_id, now)
    payload = json.dumps(blob, separators=(",", ":"), ensure_ascii=False)
    await client.set(restore_key(cfg.prefix, npc_id, player_id), payload, ex=cfg.blob_ttl_s)
    return blob


async def restore_request(conn: asyncpg.Connection, client: aioredis.Redis, cfg: RestoreConfig,
                          npc_id: str, player_id: str | None, now: float | None = None) -> int:
    """Serves one request: the named pair, or the NPC's max_players most recent players; returns pairs."""
    players = [player_id] if player_id else [
        r["player_id"] for r in await conn.fetch(_RECENT_PLAYERS_SQL.format(s=cfg.schema), npc_id,
                                                 cfg.max_players)]
    for player in players:
        await restore_pair(conn, client, cfg, npc_id, player, now)
    return len(players)


# --------------------------------------------------------------------------------------------- the job


class RestoreWorker:
    """Consumes `<prefix>restore:requests` with a consumer group; one request at a time (they are rare)."""

    def __init__(self, cfg: RestoreConfig):
        self.cfg = cfg
        self.redis = aioredis.Redis.from_url(cfg.redis_url, decode_responses=True)
        self.conn: asyncpg.Connection | None = None
        self.stopping = asyncio.Event()
        self.restored = 0

    def stop(self) -> None:
        self.stopping.set()

    async def run(self, once: bool = False) -> int:
        """Serves requests until stop() (with once: until none is left); returns the pairs restored."""
        try:
            try:
                await self.redis.xgroup_create(requests_stream(self.cfg.prefix), self.cfg.group, id="0",
                                               mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            while not self.stopping.is_set():
                entries = await self._next_requests(block_ms=100 if once else 1000)
                if not entries and once:
                    break
                for entry_id, fields in entries:
                    if not await self._serve(entry_id, fields):
                        break
        finally:
            await self._drop_connection()
            await self.redis.aclose()
        return self.restored

    async def _next_requests(self, block_ms: int) -> list:
        cfg, stream = self.cfg, requests_stream(self.cfg.prefix)
        # Requests a dead worker left pending first, then new ones.
        _, claimed, *_ = await self.redis.xautoclaim(stream, cfg.group, cfg.consumer, cfg.claim_min_idle_ms,
                                                     count=10)
        if claimed:
            return claimed
        reply = await self.redis.xreadgroup(cfg.group, cfg.consumer, {stream: ">"}, count=10, block=block_ms)
        return reply[0][1] if reply else []

    async def _serve(self, entry_id: str, fields: dict | None) -> bool:
        """Restores one request, then acknowledges it; False when stopped while PostgreSQL was down (the
        request then stays pending for the next worker)."""
        request = _parse_request(entry_id, fields)
        if request is not None and not await self._restore_with_retry(*request):
            return False
        stream = requests_stream(self.cfg.prefix)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, self.cfg.group, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()
        return True

    async def _restore_with_retry(self, npc_id: str, player_id: str | None) -> bool:
        backoff = Backoff(self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
        while not self.stopping.is_set():
            try:
                conn = await self._connection()
                self.restored += await restore_request(conn, self.redis, self.cfg, npc_id, player_id)
                return True
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                await self._drop_connection()
                delay = backoff.next_delay()
                log.warning("restore of %s/%s failed (%r); retrying in %.2f s", npc_id, player_id, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
        return False

    async def _connection(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            conn = await asyncpg.connect(self.cfg.database_url, timeout=5.0)
            try:
                # An archive no archiver has created yet is an empty one (every request answers "nothing"),
                # not an error to retry forever.
                await archive_schema.migrate(conn, self.cfg.schema)
            except BaseException:
                conn.terminate()
                raise
            self.conn = conn
        return self.conn

    async def _drop_connection(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
        self.conn = None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    defaults = RestoreConfig()
    parser = argparse.ArgumentParser(prog="npc-restore", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="serve requests until SIGTERM (the default)")
    mode.add_argument("--once", action="store_true", help="serve the pending requests, then exit")
    for name in ("redis_url", "database_url", "prefix", "schema", "group", "consumer"):
        parser.add_argument("--" + name.replace("_", "-"), default=getattr(defaults, name))
    parser.add_argument("--claim-min-idle-ms", type=int, default=defaults.claim_min_idle_ms)
    args = vars(parser.parse_args(argv))
    once = args.pop("once")
    args.pop("run")
    try:
        cfg = RestoreConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))
    restored = asyncio.run(_serve_until_signal(cfg, once))
    print(json.dumps({"restored_pairs": restored}), flush=True)
    return 0


def _parse_request(entry_id: str, fields: dict | None) -> tuple[str, str | None] | None:
    """(npc_id, player_id or None) of a request entry; None (logged) for a deleted or malformed one."""
    if not fields:
        return None
    try:
        npc_id = check_id(fields.get("npc_id"), "npc_id")
        player_id = fields.get("player_id") or None
        return npc_id, None if player_id is None else check_id(player_id, "player_id")
    except ValueError as exc:
        log.warning("dropping bad restore request %s: %s", entry_id, exc)
        return None


async def _serve_until_signal(cfg: RestoreConfig, once: bool) -> int:
    worker = RestoreWorker(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    return await worker.run(once)


if __name__ == "__main__":
    sys.exit(main())
