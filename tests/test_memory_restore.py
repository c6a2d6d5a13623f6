"""Cold restore end to end, on the real Redis and PostgreSQL: MemoryStore writes -> outbox -> npc-archiver ->
PostgreSQL (-> weekly compaction) -> Redis forgets the pair -> a prefetch asks -> npc-restore answers -> the
next prefetch merges the answer. Time moves on the store's injectable clock; PostgreSQL is only ever read by
the restore worker.

Each test uses its own Redis key prefix and PostgreSQL schema and removes both afterwards.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncpg
import pytest

from memory import compaction, restore, services
from memory.archiver import Archiver, ArchiverConfig
from memory.cards import RelationshipCard, card_to_dict
from memory.config import MemoryConfig
from memory.events import GameEvent, outbox_stream
from memory.nearline import RESTORE_VERSION, restore_key, restore_requests_stream
from memory.records import EmotionPoint, Fact, Summary, new_id
from memory.store import MemoryStore, connect
from memory.testing import DAY_S, DIALOGUE, T0, FakeClock

QUERY = "I brought the silver dagger, as I promised."


def run(prefix, body, clock, **config_kwargs):
    """Runs `await body(store, client)` on a fresh client and store (a fresh process, as far as the hot cache
    goes); pytest-asyncio is not used here."""

    async def main():
        config = MemoryConfig(key_prefix=prefix, **config_kwargs)
        client = connect(config=config)
        store = MemoryStore(client, config, clock=clock)
        try:
            return await body(store, client)
        finally:
            await store.aclose()
            await client.aclose()

    return asyncio.run(main())


def restore_config(prefix: str, schema: str) -> restore.RestoreConfig:
    return restore.RestoreConfig(redis_url=services.redis_url(), database_url=services.database_url(),
                                 prefix=prefix, schema=schema)


async def first_meeting(store, clock):
    for speaker, text in DIALOGUE:
        clock.advance(10)
        await store.record_turn("vlad", "p1", speaker, text)
    await store.apply_event("vlad", "p1", GameEvent("promise", "bring the captain's silver dagger"))
    return await store.end_session("vlad", "p1")


def assert_remembers(text: str, summary: str) -> None:
    assert f"[Last time we spoke]\n{summary}" in text
    assert "- The player promised: bring the captain's silver dagger. (2023-11-14)" in text  # its own date
    assert "The player said: I promise to bring you the dagger before the next full moon." in text
    assert 'Promises: "bring the captain\'s silver dagger" (open, 2023-11-14).' in text
    assert "[Recent conversation]" not in text  # the session ended: it lives on in its summary


async def archive(prefix: str, schema: str, now: float) -> None:
    """npc-archiver drains the outbox, then the weekly compaction folds every week 30 days old."""
    cfg = ArchiverConfig(redis_url=services.redis_url(), database_url=services.database_url(), prefix=prefix,
                         schema=schema)
    stats = await Archiver(cfg).run(once=True)
    assert stats.archived > 0 and stats.dead == 0
    conn = await asyncpg.connect(services.database_url())
    try:
        report = await compaction.compact(conn, compaction.CompactionConfig(schema=schema), now=now)
    finally:
        await conn.close()
    assert report.weeks_folded and report.memories_kept > 0  # the restore reads the folded history


# ------------------------------------------------------------------------------------------ end to end


def test_cold_restore_end_to_end(names):
    prefix, schema = names
    clock = FakeClock()

    async def body(store, client):
        outcome = await first_meeting(store, clock)
        before = await store.prefetch("vlad", "p1")
        assert before.relationship.promises and len(before.facts) >= 5
        await archive(prefix, schema, clock.now + 37 * DAY_S)
        assert await client.xlen(outbox_stream(prefix)) == 0  # everything archived and acknowledged

        # 37 days unseen: the window and the idle TTL have both dropped the pair from Redis.
        await client.delete(*store.nearline.pair_keys("vlad", "p1"))
        clock.advance(37 * DAY_S)

        # The conversation start finds nothing, serves that at once and asks for the archive.
        cold = await store.prefetch("vlad", "p1")
        assert cold.source == "redis" and cold.restore_pending
        assert (cold.relationship, cold.summaries, cold.facts, cold.turns) == (None, (), (), ())
        await store.drain()
        assert await client.xlen(restore_requests_stream(prefix)) == 1

        assert await restore.RestoreWorker(restore_config(prefix, schema)).run(once=True) == 1
        assert await client.exists(restore_key(prefix, "vlad", "p1"))

        # The next start merges the answer: the old facts, summary and cards are in the prompt again.
        text = await store.prompt_memory("vlad", "p1", QUERY)
        assert_remembers(text, outcome.summary_text)
        warm = await store.prefetch("vlad", "p1")
        assert warm.source == "hot" and not warm.restore_pending
        assert warm.relationship == before.relationship and warm.summaries[0].text == outcome.summary_text
        assert {f.fact_id: f.ts for f in warm.facts} == {f.fact_id: f.ts for f in before.facts}
        assert not await client.exists(restore_key(prefix, "vlad", "p1"))
        await assert_in_window(client, prefix, clock.now)
        stats = store.stats()
        assert (stats["restores_requested"], stats["restores_merged"], stats["corrupt_entries"]) == (1, 1, 0)
        return text

    text = run(prefix, body, clock)

    async def restart(store, client):
        # A new process: Redis holds the restored memory now, so nothing is asked of the archive again.
        again = await store.prompt_memory("vlad", "p1", QUERY)
        assert store.stats()["restores_requested"] == 0
        assert await client.xlen(restore_requests_stream(prefix)) == 0
        return again

    assert run(prefix, restart, clock) == text


async def assert_in_window(client, prefix: str, now: float) -> None:
    """Every restored member is scored inside the 30-day window; facts keep their own (older) ts."""
    for kind in ("sum", "facts", "emo"):
        members = await client.zrange(f"{prefix}{kind}:vlad:p1", 0, -1, withscores=True)
        assert members, kind
        for member, score in members:
            record = json.loads(member)
            assert now - 30 * DAY_S < score <= now and record["restored_at"] == score
            assert record["ts"] < now - 30 * DAY_S  # what happened 37 days ago still says so


def test_a_first_meeting_is_answered_with_nothing(names):
    prefix, schema = names
    clock = FakeClock()

    async def body(store, client):
        assert (await store.prefetch("ghoul", "p9")).restore_pending
        await store.drain()
        # No archiver has ever run: the worker creates the (empty) archive and answers "nothing".
        assert await restore.RestoreWorker(restore_config(prefix, schema)).run(once=True) == 1
        blob = json.loads(await client.get(restore_key(prefix, "ghoul", "p9")))
        assert blob["last_seen"] is None and blob["version"] == RESTORE_VERSION
        answered = await store.prefetch("ghoul", "p9")
        assert answered.source == "redis" and not answered.restore_pending and answered.facts == ()
        assert not await client.exists(restore_key(prefix, "ghoul", "p9"))
        assert (await store.prefetch("ghoul", "p9")).source == "hot"
        assert store.stats()["restores_requested"] == 1

    run(prefix, body, clock)


def test_an_open_request_is_asked_once_rechecked_then_given_up(names):
    prefix, _ = names
    clock = FakeClock()

    async def body(store, client):
        sources = [(await store.prefetch("vlad", "p1")).source for _ in range(3)]
        assert sources == ["redis"] * 3  # each start looks for the answer in its round trip
        await store.drain()
        assert await client.xlen(restore_requests_stream(prefix)) == 1  # but asks once
        clock.advance(store.config.restore_wait_s + 1)  # npc-restore is not running
        late = await store.prefetch("vlad", "p1")
        assert late.source == "hot" and not late.restore_pending
        assert store.stats()["restores_abandoned"] == 1

    run(prefix, body, clock)


# ---------------------------------------------------------------------------------------- merge rules


def blob_item(record) -> dict:
    return {"ts": record.ts, "payload": record.to_dict()}


def test_merge_keeps_what_was_written_while_the_request_was_open(names):
    prefix, _ = names
    clock = FakeClock(T0 + 60 * DAY_S)
    old = T0 + 20 * DAY_S
    archived_card = RelationshipCard("vlad", "p1", trust=60, affinity=40, last_interaction=old, revision=7)
    summaries = [Summary(f"Session {i}: " + "we spoke of the hunters. " * 15, old + i * DAY_S, new_id(), 12)
                 for i in range(2)]
    facts = [Fact("The player gave me a silver ring.", 3, old), Fact("The player saved my sister.", 9, old)]
    emotions = [EmotionPoint(0.5, 0.4, old + i) for i in range(2)]
    blob = {"version": RESTORE_VERSION, "npc_id": "vlad", "player_id": "p1", "restored_at": 0.0,
            "last_seen": old, "turns": [], "events": [],
            "summaries": [blob_item(s) for s in summaries], "emotions": [blob_item(e) for e in emotions],
            "facts": [blob_item(f) for f in facts] + [{"ts": old, "payload": {"text": ""}}],  # one is bad
            "cards": {"relationship": {"ts": old, "payload": {"card_type": "relationship",
                                                               "card": card_to_dict(archived_card)}}}}

    async def body(store, client):
        assert (await store.prefetch("vlad", "p1")).restore_pending
        clock.advance(5)
        gift = await store.apply_event("vlad", "p1", GameEvent("gift", "a silver ring"))  # before the answer
        await client.set(restore_key(prefix, "vlad", "p1"), json.dumps(blob))
        clock.advance(5)
        merged = await store.prefetch("vlad", "p1")

        assert merged.relationship == gift.relationship  # written meanwhile: it wins over the archive's
        assert await client.get(f"{prefix}rel:vlad:p1") != json.dumps(card_to_dict(archived_card)).encode()
        by_text = {f.text: f for f in merged.facts}
        assert by_text["The player gave me a silver ring."] == gift.fact  # the held fact of the same text
        saved = by_text["The player saved my sister."]
        assert saved.ts == old and saved.window_ts < gift.fact.ts  # its own date; just below the held
        assert [s.summary_id for s in merged.summaries] == [s.summary_id for s in reversed(summaries)]
        assert merged.emotions[0] == gift.emotion and len(merged.emotions) == 3
        assert store.stats()["corrupt_entries"] == 1
        return merged

    merged = run(prefix, body, clock)

    async def reload(store, client):
        # What the hot entry holds is what Redis holds.
        again = await store.prefetch("vlad", "p1")
        assert again.source == "redis" and again.summaries == merged.summaries
        assert sorted(again.facts, key=lambda f: f.fact_id) == sorted(merged.facts, key=lambda f: f.fact_id)
        assert again.emotions == merged.emotions and again.relationship == merged.relationship

    run(prefix, reload, clock)


def test_a_blob_of_another_pair_is_dropped(names):
    prefix, _ = names
    clock = FakeClock()

    async def body(store, client):
        blob = {"version": RESTORE_VERSION, "npc_id": "lich", "player_id": "p1", "summaries": [],
                "facts": [blob_item(Fact("Not about this pair.", 9, T0))]}
        await client.set(restore_key(prefix, "vlad", "p1"), json.dumps(blob))
        context = await store.prefetch("vlad", "p1")
        assert context.facts == () and store.stats()["corrupt_entries"] == 1
        assert not await client.exists(restore_key(prefix, "vlad", "p1"))

    run(prefix, body, clock)


# ------------------------------------------------------------------------------------------- contracts


def test_the_hot_path_and_the_archive_agree_on_names():
    config = MemoryConfig()
    assert ArchiverConfig().prefix == restore.RestoreConfig().prefix == config.key_prefix == "npc:mem:"
    assert ArchiverConfig().stream == outbox_stream(config.key_prefix)
    assert restore.restore_key("npc:mem:", "vlad", "p1") == restore_key("npc:mem:", "vlad", "p1")
    assert restore.requests_stream("npc:mem:") == restore_requests_stream("npc:mem:")
    with pytest.raises(ValueError, match="key_prefix"):
        restore.RestoreConfig(prefix="no-colon")


def test_the_hot_path_cannot_reach_postgresql():
    # PostgreSQL is never read on the hot path: the store's modules do not even load the driver.
    code = ("import sys, memory.store, memory.nearline, memory.hot_cache, memory.retrieval, memory.session; "
            "print(sorted(m for m in sys.modules if m.startswith('asyncpg')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=services.REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
