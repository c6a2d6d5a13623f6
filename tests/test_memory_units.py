"""Memory policy without Redis: config validation, outbox event fields, hot cache (LRU, TTL, window),
fact retention, retrieval (keyword relevance), session end (summaries, fact candidates, emotion)."""

import asyncio
import dataclasses

import pytest

from memory.config import MemoryConfig
from memory.events import OUTBOX_FIELDS, OUTBOX_STREAM_SUFFIX, OutboxEvent, outbox_stream, parse_fields
from memory.hot_cache import HotCache, PairMemory
from memory.nearline import RESTORE_SPACING_S, merge_facts, restamp
from memory.records import EmotionPoint, Fact, Summary, Turn, new_id
from memory.retrieval import content_words, keyword_relevance, retrieve_facts, score_facts
from memory.session import (
    extractive_summary,
    fact_candidates,
    fit_to_sentences,
    session_emotion,
    summarize_session,
)
from memory.testing import DAY_S, DIALOGUE, T0

SESSION = new_id()


def dialogue_turns(lines=DIALOGUE, ts=T0, session_id=SESSION) -> list[Turn]:
    return [Turn(speaker, text, ts + 10 * i, session_id, seq=i) for i, (speaker, text) in enumerate(lines)]


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    (dict(key_prefix="no-colon"), "key_prefix"),
    (dict(key_prefix="a b:"), "key_prefix"),
    (dict(key_prefix="glob*:"), "key_prefix"),
    (dict(hot_ttl_s=0), "hot_ttl_s"),
    (dict(hot_max_entries=0), "hot_max_entries"),
    (dict(turn_window_min=21), "turn_window_min"),
    (dict(turn_window_max=10), "turn_window_min"),
    (dict(max_card_bytes=0), "max_card_bytes"),
    (dict(summary_max_chars=200), "summary_max_chars"),
    (dict(prompt_facts=11), "prompt_facts"),
    (dict(prefetch_summaries=100), "prefetch_summaries"),
    (dict(outbox_maxlen=0), "outbox_maxlen"),
    (dict(recency_decay_per_hour=1.5), "recency_decay_per_hour"),
    (dict(weight_relevance=-1), "weight_relevance"),
    (dict(window_days=float("inf")), "window_days"),
    (dict(buffer_max_writes=True), "buffer_max_writes"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"MemoryConfig.{field}"):
        MemoryConfig(**kwargs)


def test_config_defaults_and_frozen():
    config = MemoryConfig()
    assert (config.turn_window_max, config.turn_window_min, config.max_card_bytes) == (20, 12, 2048)
    assert config.hot_ttl_s == 1800 and config.window_s == 30 * DAY_S
    assert config.outbox_maxlen is None and config.idle_key_ttl_s > config.window_s
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hot_ttl_s = 1


# ------------------------------------------------------------------------------------------- outbox


def test_outbox_event_fields_round_trip_as_bytes():
    event = OutboxEvent("turn", "vlad", "p1", T0 + 0.125, {"text": "héllo", "n": 1})
    fields = event.to_fields()
    assert tuple(fields) == OUTBOX_FIELDS and all(isinstance(v, str) for v in fields.values())
    assert fields["payload"] == '{"n":1,"text":"héllo"}' and float(fields["ts"]) == T0 + 0.125
    as_read = {k.encode(): v.encode() for k, v in fields.items()}  # what XREAD returns without decoding
    assert OutboxEvent.from_fields(as_read) == event
    assert outbox_stream("npc:mem:") == "npc:mem:" + OUTBOX_STREAM_SUFFIX == "npc:mem:outbox"


def test_outbox_event_ids_are_unique_uuid4_hex():
    ids = {OutboxEvent("fact", "vlad", "p1", T0, {}).event_id for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)


@pytest.mark.parametrize("change, message", [
    (dict(kind="chat"), "kind"),
    (dict(event_id="123"), "event_id"),
    (dict(ts="soon"), "ts: not a number"),
    (dict(payload="{bad"), "payload: not valid JSON"),
    (dict(payload="[1]"), "payload: must be a dict"),
    (dict(npc_id="a:b"), "npc_id"),
])
def test_outbox_event_rejects_bad_fields(change, message):
    fields = {**OutboxEvent("turn", "vlad", "p1", T0, {}).to_fields(), **change}
    with pytest.raises(ValueError, match=message):
        OutboxEvent.from_fields(fields)
    with pytest.raises(ValueError, match=message):  # the archiver's path: the same checks, no object built
        parse_fields(fields)
    with pytest.raises(ValueError, match=message):
        parse_fields({k.encode(): v.encode() for k, v in fields.items()})
    with pytest.raises(ValueError, match="missing fields"):
        OutboxEvent.from_fields({"kind": "turn"})
    with pytest.raises(ValueError, match=r"missing fields \['event_id', 'npc_id'"):
        parse_fields({b"kind": b"turn", b"player_id": b"p1", b"ts": b"1.0", b"payload": b"{}"})


@pytest.mark.parametrize("ts", ["nan", "inf", "-1.0"])
def test_outbox_event_rejects_times_that_are_not_epoch_seconds(ts):
    fields = {**OutboxEvent("turn", "vlad", "p1", T0, {}).to_fields(), "ts": ts}
    with pytest.raises(ValueError, match="ts: must be a finite number"):
        parse_fields(fields)


def test_parse_fields_agrees_with_the_event_it_parses():
    event = OutboxEvent("turn", "vlad", "p1", T0, {"text": "Ünïcode ok", "session_id": "s1"})
    as_read = {k.encode(): v.encode() for k, v in event.to_fields().items()}  # what redis-py returns
    assert parse_fields(as_read) == parse_fields(event.to_fields()) == (
        event.event_id, "turn", "vlad", "p1", T0, {"text": "Ünïcode ok", "session_id": "s1"})


# ---------------------------------------------------------------------------------------- hot cache


def test_hot_cache_ttl_counts_from_last_use():
    cache = HotCache(max_entries=10, ttl_s=1800)
    cache.put(PairMemory("vlad", "p1"), now=T0)
    assert cache.get(("vlad", "p1"), T0 + 1800) is not None  # exactly at the TTL: still alive
    assert cache.get(("vlad", "p1"), T0 + 3600) is not None  # 1800 s after the last use
    assert cache.get(("vlad", "p1"), T0 + 5400.001) is None
    assert ("vlad", "p1") not in cache and cache.expirations == 1


def test_hot_cache_evicts_least_recently_used_and_sweeps_expired():
    cache = HotCache(max_entries=3, ttl_s=100)
    for i in range(3):
        cache.put(PairMemory(f"n{i}", "p"), now=T0 + i)
    cache.get(("n0", "p"), T0 + 5)  # n0 becomes the most recent: n1 is now the LRU victim
    cache.put(PairMemory("n3", "p"), now=T0 + 6)
    assert [k for k in (("n0", "p"), ("n1", "p"), ("n2", "p"), ("n3", "p")) if k in cache] == \
        [("n0", "p"), ("n2", "p"), ("n3", "p")]
    assert cache.evictions == 1
    cache.put(PairMemory("n4", "p"), now=T0 + 105.5)  # n2 (last used T0+2) and n0 (T0+5) expired
    assert len(cache) == 2 and cache.expirations == 2 and cache.evictions == 1


def test_turn_window_is_append_only_then_compacted_20_to_12():
    entry = PairMemory("vlad", "p1")
    turns = dialogue_turns(DIALOGUE * 3)[:30]
    for i, turn in enumerate(turns[:20]):
        assert entry.append_turn(turn, 20, 12) == []
        assert entry.turns == turns[:i + 1]  # each prompt's window extends the previous one: the prefix holds
    dropped = entry.append_turn(turns[20], 20, 12)
    assert dropped == turns[:9] and entry.turns == turns[9:21] and len(entry.turns) == 12
    for turn in turns[21:29]:
        assert entry.append_turn(turn, 20, 12) == []
    assert len(entry.turns) == 20
    assert entry.append_turn(turns[29], 20, 12) == turns[9:18]


# ---------------------------------------------------------------------------------- fact retention


def fact(text, importance, ts=T0, **kw):
    return Fact(text, importance, ts, **kw)


def test_merge_facts_keeps_the_most_important_inside_the_window():
    held = [fact(f"held {i}", i + 1, T0 + i) for i in range(10)]  # importance 1..10
    old = fact("very old", 10, T0 - 40 * DAY_S)
    new = [fact("new important", 9, T0 + 50), fact("new trivial", 1, T0 + 50)]
    kept, added, evicted = merge_facts(held + [old], new, max_facts=10, cutoff=T0 - 30 * DAY_S)
    assert len(kept) == 10 and [f.text for f in added] == ["new important"]
    assert {f.text for f in evicted} == {"held 0", "very old"}  # importance 1 (older than the new 1), outside
    assert kept[0].importance == 10 and kept[1].text == "new important"


def test_merge_facts_same_text_replaces_and_keeps_higher_importance():
    held = [fact("The player is called Arin.", 6)]
    kept, added, evicted = merge_facts(held, [fact("the player  is called arin.", 3, T0 + 10)], 10, 0.0)
    assert len(kept) == 1 and kept[0].importance == 6 and kept[0].ts == T0 + 10
    assert added == kept and evicted == held


def test_merge_facts_counts_a_restored_fact_by_its_window_time():
    restored = fact("The player saved my sister.", 9, T0 - 60 * DAY_S, restored_at=T0 - 1)
    kept, _, evicted = merge_facts([restored], [], 10, cutoff=T0 - 30 * DAY_S)
    assert kept == [restored] and evicted == []  # learned 60 days ago, back in the window since T0 - 1


def test_restamp_keeps_the_order_just_below_a_time():
    records = [fact(f"fact {i}", 5, T0 - i * DAY_S) for i in range(3)]  # newest first
    stamped = restamp(records, below=T0)
    assert [f.text for f in stamped] == ["fact 2", "fact 1", "fact 0"]  # oldest first
    assert [f.window_ts for f in stamped] == [T0 - 3 * RESTORE_SPACING_S, T0 - 2 * RESTORE_SPACING_S,
                                              T0 - RESTORE_SPACING_S]
    assert [f.ts for f in stamped] == [T0 - 2 * DAY_S, T0 - DAY_S, T0]  # what happened when, unchanged


# ---------------------------------------------------------------------------------------- retrieval


def test_content_words_drop_stopwords_and_fold_plurals():
    assert content_words("The player's coins and the hunters daggers!") == {"coin", "hunter", "dagger"}
    assert "the" not in content_words("The the THE")


def test_keyword_relevance_and_ranking():
    config = MemoryConfig()
    facts = [fact("The player owes me forty gold coins.", 5, T0),
             fact("The player's brother was killed by hunters.", 8, T0),
             fact("The player likes the river village.", 3, T0)]
    rel = keyword_relevance("Do you remember the gold I owe you?", [f.text for f in facts])
    assert rel[0] > 0 and rel[1] == 0 and rel[2] == 0
    best = score_facts(facts, "Do you remember the gold I owe you?", T0, config)[0][1]
    assert best.text.startswith("The player owes")  # relevance outweighs the brother's higher importance
    assert score_facts(facts, "", T0, config)[0][1].importance == 8  # no query: importance decides


def test_recency_decays_per_hour():
    config = MemoryConfig(weight_importance=0, weight_relevance=0)
    facts = [fact("old news", 5, T0 - 48 * 3600), fact("fresh news", 5, T0 - 3600)]
    assert score_facts(facts, "news", T0, config)[0][1].text == "fresh news"


def test_recency_keeps_its_scale_seconds_apart_are_not_hours_apart():
    # Facts of one conversation, learned seconds apart: recency barely differs, so importance decides. (A
    # min-max over the candidates would give the newest recency 1 and the oldest 0, the whole weight of
    # importance, and the insult of the last second would tie with the betrayal of a minute before.)
    config = MemoryConfig()
    facts = [fact("sold my coffin to the hunters", 9, T0 - 60), fact("called my castle a ruin", 4, T0 - 1)]
    ranked = [f.text for _, f in score_facts(facts, "", T0, config)]
    assert ranked == ["sold my coffin to the hunters", "called my castle a ruin"]
    # Weeks apart, recency matters: a fresh fact of importance 6 beats one of importance 7 from a month ago.
    facts = [fact("an old grudge", 7, T0 - 30 * 86_400), fact("a new promise", 6, T0 - 60)]
    assert score_facts(facts, "", T0, config)[0][1].text == "a new promise"


def test_retrieve_facts_returns_top_k_in_a_stable_order():
    config = MemoryConfig(prompt_facts=2)
    facts = [fact("gold coins debt", 5, T0 + 2), fact("sister killed", 9, T0 + 1), fact("likes wine", 2, T0)]
    a = retrieve_facts(facts, "gold", T0 + 10, config)
    b = retrieve_facts(list(reversed(facts)), "gold", T0 + 10, config)
    assert a == b == [facts[1], facts[0]]  # the two best, oldest first, whatever the input order


# ------------------------------------------------------------------------------------------ session


def test_extractive_summary_is_300_to_600_chars_deterministic_and_attributed():
    turns = dialogue_turns()
    text = extractive_summary(turns, 300, 600)
    assert 300 <= len(text) <= 600
    assert text == extractive_summary(turns, 300, 600)
    assert text.startswith("On 2023-11-14 the player and I spoke (12 turns).")
    assert "The player said: I promise to bring you the dagger before the next full moon." in text
    for line in text.split(". ")[1:]:
        assert line.startswith(("The player said:", "I said:")) or not line


def test_short_session_gets_a_short_summary_nothing_invented():
    text = extractive_summary(dialogue_turns(DIALOGUE[:1]), 300, 600)
    assert text == ("On 2023-11-14 the player and I spoke (1 turn). The player said: Good evening. "
                    "The player said: My name is Arin, and I came from the river village.")


def test_worker_summary_is_cut_at_a_sentence_or_topped_up():
    turns = dialogue_turns()

    async def long_summary(ts):
        return "Arin asked about the amulet. " * 40

    async def short_summary(ts):
        return "Arin wants the amulet."

    async def broken(ts):
        raise RuntimeError("worker gone")

    async def slow(ts):
        await asyncio.sleep(5)

    text, method = asyncio.run(summarize_session(turns, 300, 600, long_summary))
    assert method == "worker" and 570 <= len(text) <= 600 and text.endswith("amulet.")
    text, method = asyncio.run(summarize_session(turns, 300, 600, short_summary))
    assert method == "worker" and text.startswith("Arin wants the amulet. ") and 300 <= len(text) <= 600
    for failing in (broken, slow):
        text, method = asyncio.run(summarize_session(turns, 300, 600, failing, timeout_s=0.05))
        assert method == "extractive" and text == extractive_summary(turns, 300, 600)


def test_fit_to_sentences_cuts_words_when_a_sentence_is_too_long():
    assert fit_to_sentences("a" * 50 + " " + "b" * 50, 60).endswith("...")
    assert len(fit_to_sentences("word " * 200, 600)) <= 600


def test_fact_candidates_from_cues():
    facts = fact_candidates(dialogue_turns(), T0, max_facts=10)
    by_text = {f.text: f.importance for f in facts}
    assert by_text["The player said: My name is Arin, and I came from the river village."] == 6
    assert by_text["The player said: I promise to bring you the dagger before the next full moon."] == 7
    assert by_text["I told the player: The amulet belonged to my sister before the hunters killed her."] == 8
    assert all(f.ts == T0 and f.source == "session" for f in facts)
    assert len(fact_candidates(dialogue_turns(), T0, max_facts=3)) == 3
    assert fact_candidates(dialogue_turns([("player", "Nice weather.")]), T0, 10) == []


def test_session_emotion_prefers_scored_turns():
    turns = dialogue_turns()
    turns[1] = dataclasses.replace(turns[1], valence=-0.5, arousal=0.9)
    turns[3] = dataclasses.replace(turns[3], valence=0.1, arousal=0.3)
    point = session_emotion(turns, T0)
    assert (point.valence, point.arousal) == (pytest.approx(-0.2), pytest.approx(0.6))
    lexicon = session_emotion(dialogue_turns([("npc", "I hate you, liar! Traitor!")]), T0)
    assert lexicon.valence < 0 and lexicon.arousal > 0.5
    assert session_emotion([], T0) is None


def test_records_validate():
    with pytest.raises(ValueError, match="speaker"):
        Turn("narrator", "x", T0, SESSION)
    with pytest.raises(ValueError, match="valence"):
        Turn("npc", "x", T0, SESSION, valence=2.0, arousal=0.5)
    with pytest.raises(ValueError, match="importance"):
        Fact("x", 11, T0)
    with pytest.raises(ValueError, match="arousal"):
        EmotionPoint(0.0, -0.1, T0)
    with pytest.raises(ValueError, match="unknown fields"):
        Summary.from_dict({"text": "x", "ts": T0, "session_id": SESSION, "turns": 1, "extra": 1})
    turn = Turn("npc", "héllo", T0, SESSION, seq=3, valence=0.5, arousal=0.1)
    assert Turn.from_json(turn.to_json()) == turn


def test_restored_at_is_in_the_json_of_restored_records_only():
    plain, restored = Fact("x", 5, T0), Fact("x", 5, T0, restored_at=T0 + 9)
    assert "restored_at" not in plain.to_dict() and plain.window_ts == T0
    assert restored.to_dict()["restored_at"] == T0 + 9 and restored.window_ts == T0 + 9
    for record in (restored, Summary("s", T0, SESSION, 2, restored_at=T0 + 1),
                   EmotionPoint(0.1, 0.2, T0, restored_at=T0 + 1)):
        assert type(record).from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="restored_at"):
        Fact("x", 5, T0, restored_at=-1.0)
