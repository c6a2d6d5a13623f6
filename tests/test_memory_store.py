"""MemoryStore against the real Redis at REDIS_URL, each test under a key prefix of its own (deleted after).

Round trips are counted on the client's connection (one `send_packed_command` per pipeline or command);
time moves on an injectable clock, except for Redis's own idle-key TTLs, which the expiry test runs short.
"""

import asyncio
import contextlib
import json
import time

import pytest
import redis.asyncio.connection as aio_connection

from memory.cards import MAX_CARD_BYTES, CardTooLarge, Mark, Promise, RelationshipCard, serialize_card
from memory.config import MemoryConfig
from memory.events import GameEvent, OutboxEvent, outbox_stream
from memory.nearline import Nearline
from memory.records import Fact
from memory.store import MemoryStore, connect
from memory.testing import DAY_S, DIALOGUE, T0, FakeClock


def run(prefix, body, clock=None, summarize=None, **config_kwargs):
    """Runs `await body(store, client)` on a fresh client and store (pytest-asyncio is not used here)."""

    async def main():
        config = MemoryConfig(key_prefix=prefix, **config_kwargs)
        client = connect(config=config)
        store = MemoryStore(client, config, clock=clock or FakeClock(), summarize=summarize)
        try:
            await client.ping()  # the connection handshake is not part of any counted round trip
            return await body(store, client)
        finally:
            await store.aclose()
            await client.aclose()

    return asyncio.run(main())


@contextlib.contextmanager
def round_trips(monkeypatch):
    """Counts what the client sends: one packed send per command or per whole pipeline."""
    sent = []
    original = aio_connection.AbstractConnection.send_packed_command

    async def counting(self, command, check_health=True):
        sent.append(command)
        return await original(self, command, check_health)

    monkeypatch.setattr(aio_connection.AbstractConnection, "send_packed_command", counting)
    try:
        yield sent
    finally:
        monkeypatch.setattr(aio_connection.AbstractConnection, "send_packed_command", original)


async def talk(store, clock, npc="vlad", player="p1", lines=DIALOGUE):
    for speaker, text in lines:
        clock.advance(10)
        await store.record_turn(npc, player, speaker, text)


async def outbox(client, prefix) -> list[OutboxEvent]:
    return [OutboxEvent.from_fields(fields) for _, fields in await client.xrange(outbox_stream(prefix))]


async def seed(store, clock):
    """A whole first meeting: talk, two game events, session end, and an open second session."""
    await talk(store, clock)
    await store.apply_event("vlad", "p1", GameEvent("gift", "a silver ring"))
    await store.apply_event("vlad", "p1", GameEvent("quest_started", "Fetch the dagger", quest_id="dagger"))
    await store.end_session("vlad", "p1")
    clock.advance(3600)
    await talk(store, clock, lines=DIALOGUE[:2])


# -------------------------------------------------------------------------------------------- prefetch


def test_prefetch_is_one_pipelined_round_trip_then_hot(prefix, monkeypatch):
    clock = FakeClock()
    run(prefix, lambda store, client: seed(store, clock), clock=clock)

    async def body(store, client):
        with round_trips(monkeypatch) as sent:
            cold = await store.prefetch("vlad", "p1")
        assert len(sent) == 1 and cold.source == "redis"
        assert cold.relationship.gifts == (Mark("a silver ring", cold.relationship.last_interaction),)
        assert [q.quest_id for q in cold.quest.quests] == ["dagger"]
        assert [t.text for t in cold.turns] == [text for _, text in DIALOGUE[:2]]
        assert len(cold.summaries) == 1 and 300 <= len(cold.summaries[0].text) <= 600
        assert 5 <= len(cold.facts) <= 10 and len(cold.emotions) == 3  # two events + the session
        with round_trips(monkeypatch) as sent:
            hot = await store.prefetch("vlad", "p1")
        assert sent == [] and hot.source == "hot"
        assert dataclass_fields(hot) == dataclass_fields(cold)

    run(prefix, body, clock=clock)  # a new store: an empty hot cache, as after a restart


def dataclass_fields(context):
    return (context.relationship, context.quest, context.turns, context.summaries,
            sorted(context.facts, key=lambda f: f.fact_id), context.emotions)


def test_prefetch_many_shares_one_round_trip(prefix, monkeypatch):
    clock = FakeClock()

    async def body(store, client):
        for i in range(50):
            await store.record_turn(f"npc{i}", "p1", "player", f"Hello number {i}.")
        store.hot.clear()
        pairs = [(f"npc{i}", "p1") for i in range(50)] + [("npc-new", "p1")]
        with round_trips(monkeypatch) as sent:
            contexts = await store.prefetch_many(pairs)
        assert len(sent) == 1
        assert [c.turns[0].text for c in contexts[:50]] == [f"Hello number {i}." for i in range(50)]
        assert contexts[50].turns == () and contexts[50].source == "redis"

    run(prefix, body, clock=clock)


def test_hot_entry_lives_30_minutes_after_last_use(prefix):
    clock = FakeClock()

    async def body(store, client):
        await store.prefetch("vlad", "p1")
        clock.advance(29 * 60)
        assert (await store.prefetch("vlad", "p1")).source == "hot"
        clock.advance(29 * 60)  # 58 minutes after the first use, 29 after the last
        assert (await store.prefetch("vlad", "p1")).source == "hot"
        clock.advance(30 * 60 + 1)
        assert (await store.prefetch("vlad", "p1")).source == "redis"

    run(prefix, body, clock=clock)


# ---------------------------------------------------------------------------------------------- writes


def test_record_turn_is_one_multi_with_its_outbox_event(prefix, monkeypatch):
    clock = FakeClock()

    async def body(store, client):
        await store.prefetch("vlad", "p1")  # an empty pair: its restore request goes out in the background
        await store.drain()
        with round_trips(monkeypatch) as sent:
            turn = await store.record_turn("vlad", "p1", "player", "Good evening.", valence=0.2, arousal=0.1)
        assert len(sent) == 1
        packed = b"".join(bytes(part) for part in _flatten(sent[0])).upper()
        assert packed.count(b"MULTI") == 1 and b"XADD" in packed and b"ZADD" in packed
        [event] = await outbox(client, prefix)
        assert event.kind == "turn" and event.event_id == turn.turn_id and event.ts == T0
        assert (event.npc_id, event.player_id) == ("vlad", "p1") and event.payload == turn.to_dict()
        members = await client.zrange(f"{prefix}turns:vlad:p1", 0, -1, withscores=True)
        assert members == [(turn.to_json().encode(), T0)]

    run(prefix, body, clock=clock)


def test_every_write_is_one_round_trip(prefix, monkeypatch):
    # Writes are pipelined: each call's Redis commands and outbox XADDs travel as one MULTI.
    clock = FakeClock()

    async def body(store, client):
        await seed(store, clock)
        await store.prefetch("vlad", "p1")  # the conversation start: the pair is hot and loaded
        writes = [lambda: store.record_turn("vlad", "p1", "player", "I found the captain."),
                  lambda: store.put_card(RelationshipCard("vlad", "p1", trust=30)),
                  lambda: store.apply_event("vlad", "p1", GameEvent("gift", "the silver dagger")),
                  lambda: store.end_session("vlad", "p1")]
        for write in writes:
            with round_trips(monkeypatch) as sent:
                await write()
            assert len(sent) == 1
            assert b"".join(bytes(part) for part in _flatten(sent[0])).upper().count(b"MULTI") == 1

    run(prefix, body, clock=clock)


def _flatten(parts):
    return parts if isinstance(parts, list) else [parts]


def test_every_memory_event_reaches_the_outbox(prefix):
    clock = FakeClock()

    async def body(store, client):
        await seed(store, clock)
        events = await outbox(client, prefix)
        kinds = [e.kind for e in events]
        assert set(kinds) == {"turn", "event", "card", "fact", "emotion", "summary"}
        assert kinds.count("turn") == len(DIALOGUE) + 2 and kinds.count("summary") == 1
        assert len({e.event_id for e in events}) == len(events)  # the idempotency keys are unique
        assert [e.ts for e in events] == sorted(e.ts for e in events)  # clock time, in write order
        cards = [e.payload for e in events if e.kind == "card"]
        assert [c["card_type"] for c in cards] == ["relationship", "relationship", "quest"]
        assert [c["card"]["revision"] for c in cards] == [1, 2, 1]
        assert await client.xlen(outbox_stream(prefix)) == len(events)  # no MAXLEN by default

    run(prefix, body, clock=clock)


def test_outbox_maxlen_is_approximate_trimming_when_configured():
    event = OutboxEvent("turn", "vlad", "p1", T0, {})
    assert Nearline(MemoryConfig()).outbox_cmd(event)[:3] == ("XADD", "npc:mem:outbox", "*")
    assert Nearline(MemoryConfig(outbox_maxlen=10_000)).outbox_cmd(event)[:6] == \
        ("XADD", "npc:mem:outbox", "MAXLEN", "~", 10_000, "*")


def test_window_compaction_is_mirrored_in_redis(prefix):
    clock = FakeClock()
    lines = [("player" if i % 2 == 0 else "npc", f"Line number {i}.") for i in range(21)]

    async def body(store, client):
        await talk(store, clock, lines=lines)
        hot = await store.prefetch("vlad", "p1")
        assert [t.text for t in hot.turns] == [text for _, text in lines[9:]]  # 20 -> 12 at the 21st turn
        assert [t.seq for t in hot.turns] == list(range(9, 21))
        assert await client.zcard(f"{prefix}turns:vlad:p1") == 12
        return hot.turns

    turns = run(prefix, body, clock=clock)

    async def reload(store, client):
        assert (await store.prefetch("vlad", "p1")).turns == turns  # a restart rebuilds the same window

    run(prefix, reload, clock=clock)


def test_cards_round_trip_and_apply_event(prefix):
    clock = FakeClock()

    async def body(store, client):
        card = RelationshipCard("vlad", "p1", trust=40, promises=(Promise("bring wine", T0),))
        await store.put_card(card)
        assert await store.get_card("vlad", "p1", "relationship") == card
        assert await store.get_card("vlad", "p1", "quest") is None
        outcome = await store.apply_event("vlad", "p1", {"type": "promise_kept", "text": "bring wine"})
        assert outcome.relationship.promises[0].status == "kept" and outcome.relationship.trust == 55
        assert outcome.fact.importance == 7 and outcome.fact.source == "promise_kept"
        stored = await client.get(f"{prefix}rel:vlad:p1")
        assert stored == serialize_card(outcome.relationship)
        store.hot.clear()
        assert await store.get_card("vlad", "p1", "relationship") == outcome.relationship
        with pytest.raises(ValueError, match="card_type"):
            await store.get_card("vlad", "p1", "mood")

    run(prefix, body, clock=clock)


def test_too_large_card_is_rejected_and_nothing_is_written(prefix):
    clock = FakeClock()
    # Multi-byte text: within the item limits, but every gift costs ~250 bytes.
    big = RelationshipCard("vlad", "p1", gifts=tuple(Mark("ж" * 120, T0 + i) for i in range(6)))

    async def body(store, client):
        await store.put_card(big)
        before = (await client.get(f"{prefix}rel:vlad:p1"), await client.xlen(outbox_stream(prefix)))
        assert len(before[0]) <= MAX_CARD_BYTES
        with pytest.raises(CardTooLarge, match="over the limit of 2048 bytes"):
            await store.apply_event("vlad", "p1", GameEvent("gift", "ж" * 120))
        with pytest.raises(CardTooLarge):
            await store.put_card(RelationshipCard("vlad", "p1", gifts=tuple(Mark("ж" * 120, T0 + i)
                                                                             for i in range(8))))
        after = (await client.get(f"{prefix}rel:vlad:p1"), await client.xlen(outbox_stream(prefix)))
        assert after == before
        assert (await store.get_card("vlad", "p1", "relationship")) == big
        assert (await store.prefetch("vlad", "p1")).facts == ()

    run(prefix, body, clock=clock)


def test_bad_input_is_rejected_with_a_clear_error(prefix):
    async def body(store, client):
        with pytest.raises(ValueError, match="npc_id"):
            await store.prefetch("bad:id", "p1")
        with pytest.raises(ValueError, match="max_turn_chars"):
            await store.record_turn("vlad", "p1", "player", "x" * 2001)
        with pytest.raises(ValueError, match="NUL"):
            await store.record_turn("vlad", "p1", "npc", "fang\x00s")
        assert (await store.prefetch("vlad", "p1")).turns == ()  # nothing half-written
        with pytest.raises(ValueError, match="speaker"):
            await store.record_turn("vlad", "p1", "narrator", "hello")
        with pytest.raises(ValueError, match="type"):
            await store.apply_event("vlad", "p1", {"type": "hug"})

    run(prefix, body)


def test_unreadable_entries_are_skipped_and_counted(prefix):
    async def body(store, client):
        await client.zadd(f"{prefix}facts:vlad:p1", {b"{not json": T0, Fact("ok", 5, T0).to_json(): T0})
        await client.set(f"{prefix}rel:vlad:p1", b'{"v": 99}')
        context = await store.prefetch("vlad", "p1")
        assert [f.text for f in context.facts] == ["ok"] and context.relationship is None
        assert store.stats()["corrupt_entries"] == 2

    run(prefix, body)


# ------------------------------------------------------------------------------------------ session end


def test_session_end_with_a_worker_summary(prefix):
    clock = FakeClock()
    seen = []

    async def worker(turns):
        seen.append([t.text for t in turns])
        return ("Arin from the river village came for the Moon Amulet. We share an enemy in the hunters who "
                "killed my sister and Arin's brother. Arin promised to bring the captain's silver dagger "
                "before the next full moon and offered forty gold coins for my stolen map. I told Arin the "
                "captain drinks at the Grey Stag inn every night.")

    async def body(store, client):
        await talk(store, clock)
        outcome = await store.end_session("vlad", "p1")
        assert seen == [[text for _, text in DIALOGUE]]
        assert outcome.method == "worker" and 300 <= len(outcome.summary_text) <= 600
        assert outcome.emotion is not None and len(outcome.facts_added) >= 5
        assert await client.zcard(f"{prefix}turns:vlad:p1") == 0
        context = await store.prefetch("vlad", "p1")
        assert context.turns == () and context.summaries[0].text == outcome.summary_text
        assert context.summaries[0].turns == len(DIALOGUE) and context.summaries[0].method == "worker"
        turn = await store.record_turn("vlad", "p1", "player", "I am back.")
        assert turn.session_id != context.summaries[0].session_id and turn.seq == 0
        assert (await store.end_session("vlad", "vlad-nobody")).summary_text is None

    run(prefix, body, clock=clock, summarize=worker)


def test_turns_of_a_session_started_during_summarization_are_kept(prefix):
    clock = FakeClock()
    release = asyncio.Event()

    async def slow_worker(turns):
        await release.wait()
        return "A slow summary. " * 30

    async def body(store, client):
        await talk(store, clock, lines=DIALOGUE[:4])
        ending = asyncio.create_task(store.end_session("vlad", "p1"))
        await asyncio.sleep(0.01)
        clock.advance(5)
        new_turn = await store.record_turn("vlad", "p1", "player", "One more thing!")
        release.set()
        await ending
        members = await client.zrange(f"{prefix}turns:vlad:p1", 0, -1)
        assert members == [new_turn.to_json().encode()]
        assert (await store.prefetch("vlad", "p1")).turns == (new_turn,)

    run(prefix, body, clock=clock, summarize=slow_worker)


def test_salient_facts_stay_within_the_cap(prefix):
    clock = FakeClock()

    async def body(store, client):
        items = ("ring", "sword", "map", "cloak", "lantern", "crown", "scroll", "goblet")
        places = ("tower", "cave", "harbour", "forest", "abbey", "market", "bridge", "mill")
        for session in range(3):
            lines = [("player", f"I promise to bring you the {item}{session} from the {place}{session}.")
                     for item, place in zip(items, places)]
            await talk(store, clock, lines=lines)
            outcome = await store.end_session("vlad", "p1")
            assert len(outcome.facts_added) == 8
            clock.advance(DAY_S)
        assert await client.zcard(f"{prefix}facts:vlad:p1") == 10
        store.hot.clear()
        facts = (await store.prefetch("vlad", "p1")).facts
        assert len(facts) == 10 and all(f.importance == 7 for f in facts)
        sessions = sorted(f.text.split(" from the ")[1][-2] for f in facts)
        assert sessions == ["1", "1"] + ["2"] * 8  # equal importance: the newest facts win

    run(prefix, body, clock=clock)


# ------------------------------------------------------------------------------------ time: gap, window


QUERY = "I brought the silver dagger, as I promised."


async def first_meeting(store, clock):
    await talk(store, clock)
    await store.apply_event("vlad", "p1", GameEvent("promise", "bring the captain's silver dagger"))
    return await store.end_session("vlad", "p1")


def assert_remembers(text: str, summary: str) -> None:
    assert "[What I remember about the player]" in text and "[Last time we spoke]" in text
    assert f"[Last time we spoke]\n{summary}" in text
    assert "The player promised: bring the captain's silver dagger." in text
    assert "The player said: I promise to bring you the dagger before the next full moon." in text
    assert 'Promises: "bring the captain\'s silver dagger" (open, 2023-11-14).' in text
    assert "[Recent conversation]" not in text  # the session was folded into the summary


def test_memory_persists_across_a_7_day_gap(prefix):
    clock = FakeClock()

    async def body(store, client):
        outcome = await first_meeting(store, clock)
        clock.advance(7 * DAY_S)
        text = await store.prompt_memory("vlad", "p1", QUERY)
        assert store.stats()["hot"]["expirations"] == 1  # the hot entry timed out: this came from Redis
        assert_remembers(text, outcome.summary_text)

    run(prefix, body, clock=clock)


def test_memory_persists_across_a_7_day_gap_and_a_restart(prefix):
    clock = FakeClock()
    outcome = run(prefix, lambda store, client: first_meeting(store, clock), clock=clock)
    clock.advance(7 * DAY_S)
    text = run(prefix, lambda store, client: store.prompt_memory("vlad", "p1", QUERY), clock=clock)
    assert_remembers(text, outcome.summary_text)


def test_30_day_window_is_trimmed_on_the_injectable_clock(prefix):
    clock = FakeClock()

    async def body(store, client):
        await talk(store, clock, lines=DIALOGUE[:6])
        await store.end_session("vlad", "p1")  # day 0
        clock.advance(20 * DAY_S)
        await talk(store, clock, lines=DIALOGUE[6:])
        await store.end_session("vlad", "p1")  # day 20
        store.hot.clear()
        assert len((await store.prefetch("vlad", "p1")).summaries) == 2

        clock.advance(11 * DAY_S)  # day 31: the first session is outside the window, the second inside
        store.hot.clear()
        context = await store.prefetch("vlad", "p1")
        assert len(context.summaries) == 1 and len(context.emotions) == 1
        assert all(f.ts >= clock.now - 30 * DAY_S for f in context.facts)
        assert await client.zcard(f"{prefix}sum:vlad:p1") == 2  # reads filter; the next write trims

        await talk(store, clock, lines=DIALOGUE[:2])
        await store.end_session("vlad", "p1")
        assert await client.zcard(f"{prefix}sum:vlad:p1") == 2  # day 20 and day 31
        scores = [s for _, s in await client.zrange(f"{prefix}emo:vlad:p1", 0, -1, withscores=True)]
        assert min(scores) >= clock.now - 30 * DAY_S

        clock.advance(40 * DAY_S)
        store.hot.clear()
        context = await store.prefetch("vlad", "p1")
        assert (context.summaries, context.facts, context.emotions) == ((), (), ())

    run(prefix, body, clock=clock)


def test_idle_keys_expire_on_redis_ttl(prefix):
    # Redis TTLs run on its wall clock: a short real TTL (0.5 s) stands in for the 31 days.
    rel, turns = f"{prefix}rel:vlad:p1", f"{prefix}turns:vlad:p1"

    async def body(store, client):
        await store.put_card(RelationshipCard("vlad", "p1"))
        await store.record_turn("vlad", "p1", "player", "Hello.")
        for key in (rel, turns):
            assert 0 < await client.pttl(key) <= 500
        await asyncio.sleep(0.3)
        await store.record_turn("vlad", "p1", "npc", "Welcome.")  # the pair is in use: all its keys re-armed
        await asyncio.sleep(0.25)  # the card was written 0.55 s ago, but the pair was used 0.25 s ago
        assert await client.exists(rel, turns) == 2
        await asyncio.sleep(0.4)  # idle for 0.65 s
        assert await client.exists(rel, turns) == 0

    started = time.monotonic()
    run(prefix, body, idle_key_ttl_s=0.5)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("write", ["record_turn", "put_card", "apply_event", "end_session"])
def test_every_write_re_arms_every_key_of_the_pair(prefix, write):
    clock = FakeClock()
    writes = {"record_turn": lambda store: store.record_turn("vlad", "p1", "player", "I am back."),
              "put_card": lambda store: store.put_card(RelationshipCard("vlad", "p1", trust=5)),
              "apply_event": lambda store: store.apply_event("vlad", "p1", GameEvent("gift", "a ring")),
              "end_session": lambda store: store.end_session("vlad", "p1")}

    async def body(store, client):
        await seed(store, clock)  # all six keys exist
        keys = [f"{prefix}{kind}:vlad:p1" for kind in ("rel", "quest", "turns", "sum", "facts", "emo")]
        for key in keys:
            assert await client.persist(key)
        await writes[write](store)
        for key in keys:
            if await client.exists(key):  # a session end empties the turn window (the key goes)
                ttl = await client.pttl(key)
                assert 30 * DAY_S * 1000 < ttl <= 31 * DAY_S * 1000, key

    run(prefix, body, clock=clock)


def test_outbox_payloads_are_compact_json(prefix):
    async def body(store, client):
        await store.record_turn("vlad", "p1", "player", "Hello there.")
        [(_, fields)] = await client.xrange(outbox_stream(prefix))
        payload = fields[b"payload"].decode()
        assert payload == json.dumps(json.loads(payload), separators=(",", ":"), sort_keys=True)

    run(prefix, body)
