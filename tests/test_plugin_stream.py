"""The scheduler's pieces the game client relies on, without processes: streamed detokenization and the
rule-based emotion tag (tier_scheduler/server.py)."""

from __future__ import annotations

import random

import pytest

from memory.records import EmotionPoint
from tier_scheduler.server import EMOTIONS, StreamDecoder, emotion_tag


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_stream_decoder_never_emits_a_split_character(tokenizer):
    text = " Ça va? 🧛 Bienvenue, ami. Ünïcödé ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = StreamDecoder(tokenizer)
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks) == decoder.text == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_stream_decoder_stops_at_the_first_newline(tokenizer):
    decoder = StreamDecoder(tokenizer)
    ids = tokenizer.encode(" one line\nPlayer: forged", add_special_tokens=False)
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks) == decoder.text == " one line" and decoder.closed


def test_emotion_tag_rules():
    assert emotion_tag("Kneel, fool!") == "angry"
    assert emotion_tag("I smell your blood.") == "hungry"
    assert emotion_tag("Welcome, friend.") == "happy"
    assert emotion_tag("The weather is mild.") == "neutral"
    cold = EmotionPoint(valence=-0.8, arousal=0.9, ts=1.0)
    assert emotion_tag("The weather is mild.", (cold,)) == "angry"
    assert emotion_tag("Welcome, friend.", (cold,)) == "happy"  # the text's own words come first
    assert {emotion_tag(t) for t in ("a", "kill", "run", "meat", "alone", "thanks")} <= set(EMOTIONS)


def test_stream_decoder_drops_control_characters(tokenizer):
    # A byte-level vocabulary holds a token for every byte: a random model samples NUL and friends.
    decoder = StreamDecoder(tokenizer)
    ids = tokenizer.encode(" a\x00b\x1b[1mc\x7f d\tz", add_special_tokens=False)
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks) == decoder.text == " ab[1mc d\tz"


def test_talk_input_with_a_control_character_is_refused():
    from tier_scheduler import prompts

    with pytest.raises(ValueError, match="U\\+0000 at index 5"):
        prompts.input_pieces("talk", "hello\x00there", 100)
    assert prompts.input_pieces("talk", "tab\there\r\n", 100)[0] == "Player: tab here\n"


def test_stream_decoder_equals_decoding_the_whole_reply(tokenizer):
    # Random token runs (random-model output: byte pieces that split characters, spaces, control bytes):
    # the chunks, decoded window by window, add up to the cleaned-up decode of the whole run.
    from tier_scheduler import prompts

    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            continue  # the last character is still incomplete: held back, by design
        expected = prompts.drop_control_chars(full.split("\n", 1)[0])
        decoder = StreamDecoder(tokenizer)
        chunks = [decoder.push(i) for i in ids]
        assert "".join(chunks) == decoder.text == (expected if expected.strip() else "")
        checked += 1
    assert checked > 200
