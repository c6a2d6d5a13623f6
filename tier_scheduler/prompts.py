"""Prompt building in the layout of DESIGN.md, as text pieces that tokenize piece by piece.

    archetype persona | NPC identity | relationship card | quest card | salient facts + last session summary
    | recent turns (append-only window, compacted from max to min turns when full) | new input

    prompt = build_prompt(config, Tier.GOLD, "talk", persona=PERSONAS["vampire"],
                          identity=render_identity("Mirela", "vampire", "nosferatu"),
                          relationship=card, quest=quest_card, facts=facts, summary=summary,
                          turns=context.turns, new_input="Did you find my amulet?")
    ids = pieces.encode(prompt)        # pieces = PieceTokenizer(tokenizer), one per scheduler process

Prefix stability: the worker's prefix cache matches token ids (and the adapter stack), so everything that
does not change between two turns comes first, and a talk prompt ends with exactly the pieces that the
next turn's window renders for it ("Player: ...\\n", "Me:"), the reply following as " ...\\n". So turn k's
prompt is a prefix of turn k+1's, text and tokens alike, until the window compacts or a card changes.
Tokens are encoded per piece (cached), not over the whole text: ids of a piece never depend on what follows
it, which keeps that prefix property exact for any tokenizer (the cost: a merge across a piece boundary is
never made; pieces end in a newline or a colon, where BPE pre-tokenizers split anyway).

Hazards for the caller:
- `turns` are the turns before `new_input` (build the prompt, then record the player's turn and the reply);
- choose `facts` once per session (not per input): facts retrieved for each new input change the memory
  piece and with it everything after it, so every turn would prefill from there;
- player text is folded onto one line (whitespace runs -> one space), so it cannot forge a turn or a header.
"""

from __future__ import annotations

import functools
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from tier_scheduler.config import ARCHETYPES, SchedulerConfig, Tier

PERSONAS = {
    "vampire": ("You are a vampire of an old bloodline: courteous, patient, proud, and always hungry. You "
                "speak in measured, elegant sentences and never reveal weakness."),
    "werewolf": ("You are a werewolf: fierce, loyal to your pack, torn between the beast and the person. You "
                 "speak bluntly and distrust strangers until they prove themselves."),
    "zombie": "You are a zombie: barely aware, driven by hunger. You speak in fragments, if at all.",
    "ghoul": ("You are a ghoul: a cunning scavenger of the dead, servile to the strong and cruel to the "
              "weak. You bargain, flatter and hiss."),
    "lich": ("You are a lich: an ancient sorcerer who cheated death. You speak with cold certainty and long "
             "memory, and you treat the living as brief curiosities."),
}

TALK_CUE = "Me:"  # the reply follows as " <text>\n": exactly how the window renders an NPC turn
ACT_CUE = "Action (JSON):"
CONVERSATION_HEADER = "[Recent conversation]\n"


class Line(NamedTuple):
    """A turn as the prompt needs it; memory.records.Turn (speaker "player" / "npc", text) works as well."""

    speaker: str
    text: str


class HasSpeakerText(Protocol):
    speaker: str
    text: str


@dataclass(frozen=True)
class Prompt:
    pieces: tuple[str, ...]
    stable: int  # pieces before the turn window: persona .. memory (unchanged while the cards are)
    turns_shown: int  # turns of the window the prompt renders

    @property
    def text(self) -> str:
        return "".join(self.pieces)


# ----------------------------------------------------------------------------------------------- window


def window_start(n_turns: int, window_max: int, window_min: int) -> int:
    """Index of the first turn shown of n_turns, for a window that grows append-only up to window_max turns
    and, when one more arrives, keeps the newest window_min. The start moves only on those compactions, by
    step = window_max + 1 - window_min turns; between them every prompt extends the previous one."""
    if n_turns <= window_max:
        return 0
    step = window_max + 1 - window_min
    return ((n_turns - window_max - 1) // step + 1) * step


def visible_turns(turns: Sequence[HasSpeakerText], window_max: int, window_min: int) -> Sequence:
    return turns[window_start(len(turns), window_max, window_min):]


# ---------------------------------------------------------------------------------------------- render


# C0 and C1 control characters but tab, newline and carriage return: a game engine's C strings end at NUL,
# and the PostgreSQL archive (jsonb) cannot store it.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def drop_control_chars(text: str) -> str:
    return CONTROL_CHARS.sub("", text)


def one_line(text: str) -> str:
    """Player and NPC text folded onto one line: a newline in it cannot open a fake turn or header."""
    return " ".join(text.split())


def render_identity(name: str, archetype: str, subfaction: str | None = None, traits: str = "") -> str:
    if archetype not in ARCHETYPES:
        raise ValueError(f"archetype: unknown {archetype!r}; expected one of {ARCHETYPES}")
    kin = f"a {archetype} of the {subfaction}" if subfaction else f"a {archetype}"
    return one_line(f"I am {name}, {kin}. {traits}")


def render_memory(facts: Iterable, summary: object | None) -> str:
    """Salient facts (with the dates they were learned) and the last session's summary; "" when none.
    facts: memory.records.Fact (text, ts) or plain strings; summary: a Summary (text) or a string."""
    parts = []
    lines = [f"- {_fact_line(f)}" for f in facts]
    if lines:
        parts.append("\n".join(["[What I remember about the player]", *lines]))
    if summary:
        parts.append(f"[Last time we spoke]\n{one_line(getattr(summary, 'text', summary))}")
    return "\n\n".join(parts)


def _fact_line(fact: object) -> str:
    if isinstance(fact, str):
        return one_line(fact)
    return f"{one_line(fact.text)} ({time.strftime('%Y-%m-%d', time.gmtime(fact.ts))})"


def _card_text(card: object | None) -> str:
    """A card rendered by memory.cards (deterministic text), or an already rendered string."""
    if card is None or isinstance(card, str):
        return card or ""
    return _cached(_render_card, card)


def _render_card(card: object) -> str:
    from memory.cards import render_card

    return render_card(card)


@functools.lru_cache(maxsize=8192)
def _cached_call(fn: Callable, *args) -> str:
    return fn(*args)


def _cached(fn: Callable, *args) -> str:
    """fn(*args), memoized: cards, facts and summaries are frozen (hashable) and change rarely, while
    rendering them (dates, labels) costs ~10 us each. Unhashable arguments are rendered every time."""
    try:
        return _cached_call(fn, *args)
    except TypeError:
        return fn(*args)


def turn_pieces(turn: HasSpeakerText) -> tuple[str, ...]:
    """A player turn is one piece; an NPC turn is the cue and its text, as a talk prompt ended and the
    reply continued it."""
    if turn.speaker == "player":
        return (f"Player: {one_line(turn.text)}\n",)
    if turn.speaker == "npc":
        return (TALK_CUE, f" {one_line(turn.text)}\n")
    raise ValueError(f"turn.speaker: must be 'player' or 'npc', got {turn.speaker!r}")


SUMMARY_INSTRUCTION = ("[Task]\nSummarize this conversation between the player and me in three to five "
                       "sentences. Keep names, promises, gifts, threats, debts and quests.\n")
SUMMARY_CUE = "[Summary]\n"
SUMMARY_TRANSCRIPT_CHARS = 6_000  # the newest turns that fit; older ones are named by count only


def summary_pieces(turns: Sequence[HasSpeakerText],
                   max_chars: int = SUMMARY_TRANSCRIPT_CHARS) -> tuple[str, ...]:
    """The prompt of a session summary (the worker's, at session end): the instruction, the transcript
    (the newest turns within max_chars, with a line saying how many older ones were left out), the cue."""
    lines, used = [], 0
    for turn in reversed(turns):
        who = "Player" if turn.speaker == "player" else "Me"
        line = f"{who}: {one_line(turn.text)}\n"
        if lines and used + len(line) > max_chars:
            break
        lines.append(line)
        used += len(line)
    left_out = len(turns) - len(lines)
    head = (f"({left_out} earlier lines not shown)\n",) if left_out else ()
    return (SUMMARY_INSTRUCTION, "[Conversation]\n", *head, *reversed(lines), SUMMARY_CUE)


def input_pieces(kind: str, new_input: str, max_chars: int) -> tuple[str, ...]:
    """The new input: a talk prompt ends "Player: <input>\\n" + "Me:", an act prompt with the situation
    (from the game) and the action cue."""
    if not isinstance(new_input, str) or not new_input.strip():
        raise ValueError(f"new_input: must be a non-empty string, got {new_input!r}")
    if len(new_input) > max_chars:
        raise ValueError(f"new_input: {len(new_input)} characters, more than max_input_chars ({max_chars})")
    if (bad := CONTROL_CHARS.search(new_input)) is not None:
        raise ValueError(f"new_input: control character U+{ord(bad.group()):04X} at index {bad.start()}")
    if kind == "talk":
        return (f"Player: {one_line(new_input)}\n", TALK_CUE)
    if kind == "act":
        return (f"[Situation]\n{one_line(new_input)}\n", ACT_CUE)
    raise ValueError(f"kind: a prompt with new input is 'talk' or 'act', got {kind!r}")


# ----------------------------------------------------------------------------------------------- build


def build_prompt(config: SchedulerConfig, tier: Tier, kind: str, *, persona: str, identity: str,
                 new_input: str | None, relationship: object | None = None, quest: object | None = None,
                 facts: Iterable = (), summary: object | None = None,
                 turns: Sequence[HasSpeakerText] = ()) -> Prompt:
    """The prompt of a Gold or Silver NPC in the DESIGN.md layout. Silver gets the cards and a few turns
    (config.turn_window(SILVER)), no facts or summary. new_input None: the warm-up prompt (everything up to
    the turns, what promotion to Gold prefills before the player speaks)."""
    window_max, window_min = config.turn_window(tier)
    stable = [f"{persona.strip()}\n\n", f"[Who I am]\n{identity.strip()}\n\n"]
    for card in (relationship, quest):
        text = _card_text(card)
        if text:
            stable.append(f"{text}\n\n")
    memory = _cached(render_memory, tuple(facts), summary) if tier == Tier.GOLD else ""
    if memory:
        stable.append(f"{memory}\n\n")
    shown = visible_turns(turns, window_max, window_min)
    pieces = [*stable, CONVERSATION_HEADER]
    for turn in shown:
        pieces.extend(turn_pieces(turn))
    if new_input is not None:
        pieces.extend(input_pieces(kind, new_input, config.max_input_chars))
    return Prompt(tuple(pieces), len(stable), len(shown))


def build_from_context(config: SchedulerConfig, tier: Tier, kind: str, context: object, *, persona: str,
                       identity: str, new_input: str | None, facts: Iterable = ()) -> Prompt:
    """build_prompt from a memory.store.MemoryContext (cards, newest summary, turn window); facts as chosen
    for the session (see the module doc)."""
    summaries = getattr(context, "summaries", ())
    return build_prompt(config, tier, kind, persona=persona, identity=identity, new_input=new_input,
                        relationship=context.relationship, quest=context.quest, facts=facts,
                        summary=summaries[0] if summaries else None, turns=context.turns)


# -------------------------------------------------------------------------------------------- tokenize


class Tokenizer(Protocol):
    def encode(self, text: str, *args, **kwargs): ...


class PieceTokenizer:
    """Token ids of prompts, piece by piece, with the ids of each distinct piece cached (LRU): personas,
    cards and past turns are encoded once, a new turn costs its own pieces only.

    Works with any tokenizer with `encode(text)` returning ids (or an object with `.ids`, as the
    `tokenizers` library does); special tokens are not added per piece (`add_special_tokens=False` where
    accepted): pass `prefix_ids` (e.g. [bos_id]) for a BOS at the start of every prompt."""

    def __init__(self, tokenizer: Tokenizer, max_cached: int = 100_000, prefix_ids: Sequence[int] = ()):
        if max_cached < 1:
            raise ValueError(f"max_cached: must be >= 1, got {max_cached!r}")
        self._encode = _plain_encoder(tokenizer)
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.max_cached = max_cached
        self.prefix_ids = tuple(prefix_ids)
        self.hits = self.misses = 0

    def encode(self, prompt: Prompt | Sequence[str]) -> list[int]:
        pieces = prompt.pieces if isinstance(prompt, Prompt) else prompt
        ids = list(self.prefix_ids)
        for piece in pieces:
            ids.extend(self.piece_ids(piece))
        return ids

    def piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is not None:
            self.hits += 1
            self._cache.move_to_end(piece)
            return ids
        self.misses += 1
        return self.remember(piece, self._encode(piece))

    def remember(self, piece: str, ids: Iterable[int]) -> tuple[int, ...]:
        """Caches ids for a piece: e.g. a reply piece " <text>\\n" with the ids the model generated, so the
        next prompt reuses the KV of exactly those tokens."""
        ids = tuple(int(i) for i in ids)
        self._cache[piece] = ids
        self._cache.move_to_end(piece)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return ids


def _plain_encoder(tokenizer: Tokenizer) -> Callable[[str], Sequence[int]]:
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode):
        raise TypeError(f"tokenizer: needs an encode(text) method, got {type(tokenizer).__name__}")
    try:
        encode("probe", add_special_tokens=False)
        raw = lambda text: encode(text, add_special_tokens=False)  # noqa: E731
    except TypeError:
        raw = encode
    return lambda text: _ids(raw(text))


def _ids(encoded: object) -> Sequence[int]:
    return encoded.ids if hasattr(encoded, "ids") else encoded
