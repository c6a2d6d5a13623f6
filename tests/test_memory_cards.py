"""Cards: validation, the 2 KB limit (rejected, never truncated), versioned JSON, deterministic rendering,
game-event transitions."""

import dataclasses
import json

import pytest

from memory.cards import (
    CARD_SCHEMA_VERSION,
    MAX_CARD_BYTES,
    MAX_ITEM_CHARS,
    MAX_ITEMS,
    CardError,
    CardTooLarge,
    Mark,
    Promise,
    Quest,
    QuestCard,
    RelationshipCard,
    apply_game_event,
    card_to_dict,
    deserialize_card,
    render_card,
    render_quest,
    render_relationship,
    serialize_card,
)
from memory.events import GAME_EVENT_EFFECTS, GameEvent

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def rich_card(**changes) -> RelationshipCard:
    card = RelationshipCard(
        "vlad", "p1", trust=35, affinity=-10,
        promises=(Promise("bring garlic-free bread", T0), Promise("find my sister", T0 + 86_400, "kept")),
        betrayals=(Mark("sold my map to the hunters", T0 + 2 * 86_400),),
        gifts=(Mark("a silver ring", T0 + 3 * 86_400),), last_interaction=T0 + 3 * 86_400 + 60, revision=4)
    return dataclasses.replace(card, **changes)


def quest_card() -> QuestCard:
    return QuestCard("vlad", "p1", quests=(
        Quest("amulet", "Find the lost amulet", T0, milestones=(Mark("found the crypt", T0 + 3600),)),
        Quest("wolves", "Drive the wolves away", T0 + 7200)), revision=2)


def card_of_size(size: int) -> RelationshipCard:
    """A relationship card whose serialized form is exactly `size` bytes: ASCII texts, where each character
    adds exactly one byte, spread over as few promises as the per-text limit allows."""
    gifts = tuple(Mark("g" * 100, T0 + i) for i in range(MAX_ITEMS))
    for n in range(1, MAX_ITEMS + 1):
        card = RelationshipCard("vlad", "p1", gifts=gifts, promises=(Promise("p", T0),) * n)
        room = size - len(serialize_card(card, max_bytes=1 << 20))
        if 0 <= room <= n * (MAX_ITEM_CHARS - 1):
            extra = [room // n + (i < room % n) for i in range(n)]
            return dataclasses.replace(card, promises=tuple(Promise("p" * (1 + e), T0) for e in extra))
    raise AssertionError(f"no card of {size} bytes with these entries")


# ------------------------------------------------------------------------------------- size limit


def test_card_at_the_limit_is_accepted_one_byte_more_is_rejected():
    exact = card_of_size(MAX_CARD_BYTES)
    data = serialize_card(exact)
    assert len(data) == MAX_CARD_BYTES
    assert deserialize_card(data) == exact

    over = card_of_size(MAX_CARD_BYTES + 1)
    with pytest.raises(CardTooLarge) as err:
        serialize_card(over)
    message = str(err.value)
    assert f"{MAX_CARD_BYTES + 1} bytes" in message and f"limit of {MAX_CARD_BYTES}" in message
    assert "vlad" in message and "p1" in message and "never truncated" in message
    assert err.value.size == MAX_CARD_BYTES + 1 and err.value.limit == MAX_CARD_BYTES


def test_limit_counts_utf8_bytes_not_characters():
    # 8 gifts of 120 two-byte characters: about 1,000 characters but over 2,000 bytes.
    card = RelationshipCard("vlad", "p1", gifts=tuple(Mark("é" * 120, T0 + i) for i in range(MAX_ITEMS)),
                            promises=tuple(Promise("ü" * 60, T0) for _ in range(4)))
    with pytest.raises(CardTooLarge):
        serialize_card(card)
    assert len(serialize_card(card, max_bytes=8192)) > MAX_CARD_BYTES


def test_stored_card_over_the_limit_is_rejected_when_read():
    data = serialize_card(card_of_size(MAX_CARD_BYTES + 10), max_bytes=4096)
    with pytest.raises(CardTooLarge):
        deserialize_card(data)


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("changes, field", [
    (dict(trust=101), "trust"),
    (dict(affinity=-101), "affinity"),
    (dict(trust=1.5), "trust"),
    (dict(trust=True), "trust"),
    (dict(npc_id="bad:id"), "npc_id"),
    (dict(player_id=""), "player_id"),
    (dict(promises=tuple(Promise(f"p{i}", T0) for i in range(MAX_ITEMS + 1))), "promises"),
    (dict(gifts=[Mark("ring", T0)]), "gifts"),
    (dict(last_interaction=float("nan")), "last_interaction"),
    (dict(revision=-1), "revision"),
])
def test_relationship_card_rejects_bad_fields(changes, field):
    with pytest.raises(CardError, match=field):
        rich_card(**changes)


@pytest.mark.parametrize("build, field", [
    (lambda: Promise("x", T0, status="forgotten"), "status"),
    (lambda: Promise("", T0), "promise.text"),
    (lambda: Mark("x" * 121, T0), "text"),
    (lambda: Mark("x", -1.0), "at"),
    (lambda: Quest("bad id", "t", T0), "quest_id"),
    (lambda: QuestCard("vlad", "p1", quests=(Quest("a", "t", T0), Quest("a", "u", T0))), "duplicate"),
])
def test_card_entries_reject_bad_fields(build, field):
    with pytest.raises(CardError, match=field):
        build()


def test_json_round_trip_is_versioned_and_exact():
    for card in (rich_card(), quest_card(), RelationshipCard("a", "b"), QuestCard("a", "b")):
        data = serialize_card(card)
        raw = json.loads(data)
        assert raw["v"] == CARD_SCHEMA_VERSION and raw["type"] == card.CARD_TYPE
        assert deserialize_card(data) == card
        assert serialize_card(deserialize_card(data)) == data  # byte-identical: sorted keys, compact
        assert data == json.dumps(raw, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(v=2), "unsupported schema version 2"),
    (lambda d: d.pop("v"), "unsupported schema version None"),
    (lambda d: d.update(type="grudge"), "unknown type 'grudge'"),
    (lambda d: d.update(mood="sad"), "fields"),
    (lambda d: d.pop("trust"), "fields"),
    (lambda d: d.update(promises=[{"text": "x"}]), "malformed"),
    (lambda d: d.update(trust=500), "trust"),
])
def test_deserialize_rejects_bad_documents(mutate, message):
    raw = card_to_dict(rich_card())
    mutate(raw)
    with pytest.raises(CardError, match=message):
        deserialize_card(json.dumps(raw))


def test_deserialize_rejects_non_json():
    with pytest.raises(CardError, match="not valid JSON"):
        deserialize_card(b"{not json")
    with pytest.raises(CardError, match="JSON object"):
        deserialize_card(b"[1, 2]")


# -------------------------------------------------------------------------------------- rendering


def test_relationship_rendering_is_exact_and_deterministic():
    expected = "\n".join([
        "[Relationship with player p1]",
        "Trust: +35/100 (trusting). Affinity: -10/100 (indifferent).",
        'Promises: "bring garlic-free bread" (open, 2023-11-14); "find my sister" (kept, 2023-11-15).',
        "Betrayals: sold my map to the hunters (2023-11-16).",
        "Gifts: a silver ring (2023-11-17).",
        "Last interaction: 2023-11-17 22:14 UTC.",
    ])
    card = rich_card()
    assert render_relationship(card) == expected
    assert render_card(deserialize_card(serialize_card(card))) == expected


def test_empty_cards_render():
    assert render_relationship(RelationshipCard("vlad", "p1")) == "\n".join([
        "[Relationship with player p1]", "Trust: +0/100 (neutral). Affinity: +0/100 (indifferent).",
        "Promises: none.", "Betrayals: none.", "Gifts: none.", "Last interaction: never."])
    assert render_quest(QuestCard("vlad", "p1")) == "[Quests with player p1]\nNo active quests."


def test_quest_rendering():
    assert render_card(quest_card()) == "\n".join([
        "[Quests with player p1]",
        '- amulet "Find the lost amulet" (since 2023-11-14); milestones: found the crypt (2023-11-14).',
        '- wolves "Drive the wolves away" (since 2023-11-15); milestones: none.',
    ])


# ------------------------------------------------------------------------------------ transitions


def _apply(rel, quest, event, ts=T0):
    trust, affinity = GAME_EVENT_EFFECTS[event.type][:2]
    return apply_game_event(rel, quest, event, ts, (trust, affinity))


def test_attack_and_life_saved_move_the_relationship_and_leave_a_fact():
    rel, quest = RelationshipCard("vlad", "p1"), QuestCard("vlad", "p1")
    rel, _, fact = _apply(rel, quest, GameEvent("life_saved", "pulled me out of the burning mill"))
    assert (rel.trust, rel.affinity) == (30, 25) and rel.betrayals == ()
    assert fact == "The player saved my life: pulled me out of the burning mill."
    rel, _, fact = _apply(rel, quest, GameEvent("attack"), T0 + 5)
    assert (rel.trust, rel.affinity) == (5, 5) and rel.last_interaction == T0 + 5
    assert fact == "The player attacked me."
    assert GAME_EVENT_EFFECTS["attack"][3] < 0 < GAME_EVENT_EFFECTS["life_saved"][3]  # the NPC's valence


def test_gift_and_promise_transitions():
    rel, quest = RelationshipCard("vlad", "p1"), QuestCard("vlad", "p1")
    rel, quest2, fact = _apply(rel, quest, GameEvent("gift", "a silver ring"))
    assert quest2 is quest  # not a quest event: the quest card is untouched
    assert rel.gifts == (Mark("a silver ring", T0),) and rel.last_interaction == T0 and rel.revision == 1
    assert (rel.trust, rel.affinity) == GAME_EVENT_EFFECTS["gift"][:2]
    assert fact == "The player gave me a silver ring."

    rel, _, fact = _apply(rel, quest, GameEvent("promise", "Find my sister"), T0 + 10)
    rel, _, _ = _apply(rel, quest, GameEvent("promise", "bring wine"), T0 + 20)
    assert fact == "The player promised: Find my sister."
    rel, _, fact = _apply(rel, quest, GameEvent("promise_kept", "find my SISTER"), T0 + 30)
    assert [p.status for p in rel.promises] == ["kept", "open"]
    rel, _, fact = _apply(rel, quest, GameEvent("promise_broken"), T0 + 40)  # no text: the newest open one
    assert [p.status for p in rel.promises] == ["kept", "broken"]
    assert fact == "The player broke a promise."
    assert rel.revision == 5


def test_scores_clamp_and_lists_keep_the_newest():
    rel, quest = RelationshipCard("vlad", "p1"), QuestCard("vlad", "p1")
    for i in range(MAX_ITEMS + 3):
        rel, quest, _ = _apply(rel, quest, GameEvent("betrayal", f"betrayal {i}", trust_delta=-50), T0 + i)
    assert rel.trust == -100 and rel.affinity == -100
    assert [b.text for b in rel.betrayals] == [f"betrayal {i}" for i in range(3, MAX_ITEMS + 3)]
    assert len(serialize_card(rel)) <= MAX_CARD_BYTES


def test_quest_transitions():
    rel, quest = RelationshipCard("vlad", "p1"), QuestCard("vlad", "p1")
    started = GameEvent("quest_started", "Find the lost amulet", quest_id="amulet")
    rel, quest, fact = _apply(rel, quest, started)
    assert fact == 'I gave the player the quest "Find the lost amulet".'
    rel, quest, fact = _apply(rel, quest, GameEvent("quest_milestone", "found the crypt", quest_id="amulet"),
                              T0 + 60)
    assert quest.quests[0].milestones == (Mark("found the crypt", T0 + 60),)
    assert fact == 'On the quest "Find the lost amulet" the player reached: found the crypt.'
    rel, quest, fact = _apply(rel, quest, GameEvent("quest_completed", quest_id="amulet"), T0 + 120)
    assert quest.quests == () and quest.revision == 3
    assert fact == 'The player completed the quest "Find the lost amulet".'
    assert rel.trust == sum(GAME_EVENT_EFFECTS[t][0] for t in ("quest_started", "quest_milestone",
                                                               "quest_completed"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(type="hug"), "type"),
    (dict(type="quest_started", text="x"), "quest_id"),
    (dict(type="gift", quest_id="q1"), "quest_id"),
    (dict(type="gift", text="x" * 121), "text"),
    (dict(type="gift", trust_delta=1000), "trust_delta"),
])
def test_game_event_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GameEvent(**kwargs)
    with pytest.raises(ValueError, match="unknown fields"):
        GameEvent.from_dict({"type": "gift", "colour": "red"})
