"""Session end: the turns become a 300-600 char summary, salient-fact candidates and an emotion point.

Summaries come from the worker when one is connected (an injectable `summarize(turns) -> str` coroutine that
sends a low-priority summarization request), else from an extractive fallback: the session's sentences ranked
by centrality (how many of the session's frequent content words they carry) plus cue words (promises, gifts,
deaths, debts...), the best that fit the budget, in the order they were said. A worker summary is cut at a
sentence end to fit `summary_max_chars`, and one shorter than `summary_min_chars` is topped up with extractive
sentences. A session with less text than the minimum gets a shorter summary: nothing is invented.

Fact candidates and the emotion point are extractive and deterministic (cue-word patterns and lexicons);
turns that carry valence/arousal scores from the emotional_response step take precedence for the emotion.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from memory.records import MAX_FACT_CHARS, EmotionPoint, Fact, Turn
from memory.retrieval import content_words

log = logging.getLogger(__name__)

Summarizer = Callable[[Sequence[Turn]], Awaitable[str]]

_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
NEAR_DUPLICATE = 0.7  # Jaccard overlap of content words above which a fact candidate repeats another
# Cue patterns of salient facts, with their importance (1-10, Generative Agents' poignancy scale).
FACT_CUES: tuple[tuple[re.Pattern, int], ...] = tuple((re.compile(p, re.IGNORECASE), w) for p, w in (
    (r"\b(kill|killed|murder\w*|dead|death|died)\b", 8),
    (r"\b(betray\w*|lied|liar|stole|steal|traitor)\b", 8),
    (r"\b(promise\w*|swear|swore|vow\w*)\b", 7),
    (r"\bsecret\w*\b", 7),
    (r"\bmy name is\b|\bi am called\b|\bcall me\b", 6),
    (r"\b(mother|father|brother|sister|wife|husband|son|daughter|family|child)\b", 6),
    (r"\b(love|hate|fear|afraid)\b", 6),
    (r"\b(gift|gave|give|bring|brought)\b", 5),
    (r"\b(quest|task|mission|amulet|artifact|treasure)\b", 5),
    (r"\b(gold|coins?|pay|paid|owe|debt)\b", 5),
    (r"\b(help|helped|save|saved|rescue\w*)\b", 5),
    (r"\bi am an?\b|\bi'm an?\b", 4),
))
_POSITIVE = frozenset(str.split("thank thanks love friend glad happy gift kind great good welcome gladly "
                                "trust safe wonderful pleased grateful saved helped honor"))
_NEGATIVE = frozenset(str.split("hate kill die dead liar betray betrayed fool curse threat angry afraid fear "
                                "blood stole steal traitor never leave pain enemy"))


@dataclass(frozen=True)
class SessionOutcome:
    """What a session end wrote: the summary (None for a session without turns), the facts it added to the
    retained set, the facts that set evicted, and the session's point of the emotional trajectory."""

    summary_text: str | None
    method: str
    facts_added: tuple[Fact, ...]
    facts_evicted: tuple[Fact, ...]
    emotion: EmotionPoint | None


# -------------------------------------------------------------------------------------------- sentences


def _sentences(turns: Sequence[Turn]) -> list[tuple[int, Turn, str]]:
    """(order, turn, sentence) for every sentence of every turn, in the order they were said."""
    out = []
    for turn in turns:
        for match in _SENTENCE.finditer(turn.text):
            sentence = " ".join(match.group().split())
            if len(sentence) > 1:
                out.append((len(out), turn, sentence))
    return out


def _cue_weight(sentence: str) -> int:
    return max((w for pattern, w in FACT_CUES if pattern.search(sentence)), default=0)


def _attributed(turn: Turn, sentence: str) -> str:
    return f"The player said: {sentence}" if turn.speaker == "player" else f"I said: {sentence}"


def _ranked(turns: Sequence[Turn]) -> list[tuple[float, int, str]]:
    """(score, order, attributed sentence), best first: centrality over the session's content words plus
    a cue bonus; player sentences weigh a little more (the memory is about the player)."""
    sentences = _sentences(turns)
    words = [content_words(s) for _, _, s in sentences]
    frequency = Counter(w for ws in words for w in ws)
    ranked = []
    for (order, turn, sentence), ws in zip(sentences, words):
        centrality = sum(frequency[w] for w in ws) / (1 + len(ws)) ** 0.5
        score = (centrality + _cue_weight(sentence)) * (1.2 if turn.speaker == "player" else 1.0)
        ranked.append((score, order, _attributed(turn, sentence)))
    return sorted(ranked, key=lambda r: (-r[0], r[1]))


def cut_at_word(text: str, max_chars: int) -> str:
    """text if it fits, else its longest word-boundary prefix that fits with a trailing '...'."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars - 3].rsplit(" ", 1)[0] if " " in text[:max_chars - 3] else text[:max_chars - 3]
    return head.rstrip(" ,;:") + "..."


def fit_to_sentences(text: str, max_chars: int) -> str:
    """The longest run of whole sentences of text within max_chars (a word cut when even one is too long)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    out = ""
    for match in _SENTENCE.finditer(text):
        candidate = (out + match.group()).strip()
        if len(candidate) > max_chars:
            break
        out = candidate + " "
    return out.strip() or cut_at_word(text, max_chars)


def _compose(head: str, ranked: Sequence[tuple[float, int, str]], min_chars: int, max_chars: int) -> str:
    """head + the best sentences that fit (in the order they were said), near-duplicates of a chosen one
    skipped; when still under min_chars, the best unused sentence cut at a word boundary fills the rest."""
    chosen, seen, used = [], [], len(head)
    unused = []
    for _score, order, sentence in ranked:
        words = content_words(sentence)
        if any(_jaccard(words, w) >= NEAR_DUPLICATE for w in seen):
            continue
        if used + 1 + len(sentence) > max_chars:
            unused.append(sentence)
            continue
        chosen.append((order, sentence))
        seen.append(words)
        used += 1 + len(sentence)
    text = " ".join([head, *[s for _, s in sorted(chosen)]]).strip()
    room = max_chars - len(text) - 1
    if len(text) < min_chars and unused and room > 20:
        text = f"{text} {cut_at_word(unused[0], room)}"
    return text


# -------------------------------------------------------------------------------------------- summaries


def session_length(turns: Sequence[Turn]) -> int:
    """Turns in the session, counting those compacted out of the window (seq numbers the session's turns)."""
    return max(len(turns), turns[-1].seq + 1) if turns else 0


def extractive_summary(turns: Sequence[Turn], min_chars: int, max_chars: int) -> str:
    day = time.strftime("%Y-%m-%d", time.gmtime(turns[0].ts)) if turns else "?"
    n = session_length(turns)
    head = f"On {day} the player and I spoke ({n} turn{'' if n == 1 else 's'})."
    return _compose(head, _ranked(turns), min_chars, max_chars)


async def summarize_session(turns: Sequence[Turn], min_chars: int, max_chars: int,
                            summarize: Summarizer | None = None, timeout_s: float = 30.0) -> tuple[str, str]:
    """(summary text, method): the worker's summary when `summarize` is given and answers in time with
    text, else the extractive one."""
    if summarize is not None:
        try:
            text = await asyncio.wait_for(summarize(list(turns)), timeout_s)
        except Exception as e:  # a slow or failing worker must not lose the session: fall back
            log.warning("worker summarization failed (%r); using the extractive summary", e)
        else:
            if isinstance(text, str) and text.strip():
                head = fit_to_sentences(text, max_chars)
                return _compose(head, _ranked(turns), min_chars, max_chars) if len(head) < min_chars \
                    else head, "worker"
            log.warning("worker summarization returned %r; using the extractive summary", type(text).__name__)
    return extractive_summary(turns, min_chars, max_chars), "extractive"


# ---------------------------------------------------------------------------------------- facts, emotion


def fact_candidates(turns: Sequence[Turn], now: float, max_facts: int) -> list[Fact]:
    """Salient-fact candidates: sentences matching a cue pattern, importance from the strongest cue; the
    max_facts most important (earlier first on ties), skipping near-duplicates (content words overlapping
    by NEAR_DUPLICATE or more, Jaccard) of a better one."""
    found = []
    for _, turn, sentence in _sentences(turns):
        weight = _cue_weight(sentence)
        if weight:
            prefix = "The player said: " if turn.speaker == "player" else "I told the player: "
            found.append(Fact(cut_at_word(prefix + sentence, MAX_FACT_CHARS), weight, now, source="session"))
    return select_candidates(found, max_facts)


def select_candidates(facts: Sequence[Fact], max_facts: int) -> list[Fact]:
    """The max_facts most important facts (stable on ties: the order given), near-duplicates skipped."""
    chosen: list[tuple[Fact, set[str]]] = []
    for fact in sorted(facts, key=lambda f: -f.importance):
        words = content_words(fact.text)
        if len(chosen) < max_facts and not any(_jaccard(words, w) >= NEAR_DUPLICATE for _, w in chosen):
            chosen.append((fact, words))
    return [fact for fact, _ in chosen]


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def session_emotion(turns: Sequence[Turn], now: float) -> EmotionPoint | None:
    """The session's point of the NPC's emotional trajectory: the mean of the scored turns (the NPC's own
    when it has any), else a lexicon estimate over all turns. None without turns."""
    if not turns:
        return None
    scored = [t for t in turns if t.valence is not None]
    own = [t for t in scored if t.speaker == "npc"] or scored
    if own:
        valence = sum(t.valence for t in own) / len(own)
        arousal = sum(t.arousal for t in own) / len(own)
        return EmotionPoint(round(valence, 4), round(arousal, 4), now, source="session")
    return _lexicon_emotion(turns, now)


def _lexicon_emotion(turns: Sequence[Turn], now: float) -> EmotionPoint:
    words = [w for t in turns for w in re.findall(r"[a-z]+", t.text.lower())]
    positive = sum(w in _POSITIVE for w in words)
    negative = sum(w in _NEGATIVE for w in words)
    hits = positive + negative
    exclamations = sum(t.text.count("!") for t in turns)
    valence = (positive - negative) / hits * min(1.0, hits / 3) if hits else 0.0
    arousal = min(1.0, 0.2 + 0.1 * (hits + exclamations) / max(1, len(turns)) * 3)
    return EmotionPoint(round(valence, 4), round(arousal, 4), now, source="session")
