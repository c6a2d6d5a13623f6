"""Bronze barks and emotes: per-archetype tables, no LLM call, varied without repeats.

    barks = BarkDecks(seed=7)
    bark = barks.next("npc-7", "zombie", "alert")      # Bark(text="Hnnngh... meat...", emote="lurch")
    barks.forget("npc-7")                               # on despawn

Each NPC draws from its own shuffled deck per situation; when the deck is empty a new shuffle starts, and
its first card is never the one just drawn (no immediate repeat, also across decks). Deterministic given
the seed, the NPC id and the order of calls.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tier_scheduler.config import ARCHETYPES

SITUATIONS = ("idle", "alert", "combat")


@dataclass(frozen=True)
class Bark:
    text: str
    emote: str  # the animation / facial tag the game plays with the line


def _lines(*pairs: tuple[str, str]) -> tuple[Bark, ...]:
    return tuple(Bark(text, emote) for text, emote in pairs)


BARKS: dict[str, dict[str, tuple[Bark, ...]]] = {
    "zombie": {
        "idle": _lines(("Hnnngh...", "sway"), ("Braaains...", "shamble"), ("*groans*", "groan"),
                       ("Uuuuh...", "twitch"), ("*sniffs the air*", "sniff")),
        "alert": _lines(("Hnnngh... meat...", "lurch"), ("*snarls*", "snarl"), ("Grrraaah!", "turn_head"),
                        ("Fressshh...", "reach")),
        "combat": _lines(("RAAAAGH!", "lunge"), ("*gnashes teeth*", "bite"), ("Hhhrrk!", "claw"),
                         ("BRAAAINS!", "grab")),
    },
    "vampire": {
        "idle": _lines(("The night is young.", "smile"), ("How tiresome, the living.", "sigh"),
                       ("I smell something... sweet.", "inhale"), ("Centuries, and still so dull.", "yawn")),
        "alert": _lines(("Who goes there?", "turn_head"), ("Come closer, little one.", "beckon"),
                        ("I hear your heartbeat.", "tilt_head"), ("You should not be here.", "glare")),
        "combat": _lines(("You will make a fine meal.", "hiss"), ("Kneel!", "point"),
                         ("Your blood is mine!", "lunge"), ("Foolish mortal.", "sneer")),
    },
    "werewolf": {
        "idle": _lines(("*sniffs the wind*", "sniff"), ("The moon is close.", "look_up"),
                       ("*low growl*", "growl"), ("Pack first. Always.", "stretch")),
        "alert": _lines(("I smell you.", "snarl"), ("Show yourself!", "crouch"), ("*howls*", "howl"),
                        ("Not one step further.", "bare_teeth")),
        "combat": _lines(("*ROARS*", "roar"), ("For the pack!", "pounce"), ("I'll tear you apart!", "swipe"),
                         ("*snaps jaws*", "bite")),
    },
    "ghoul": {
        "idle": _lines(("Scraps, scraps...", "crouch"), ("*cackles*", "cackle"), ("Who died today?", "sniff"),
                       ("Mine, all mine.", "hoard")),
        "alert": _lines(("Sssomeone's here.", "hiss"), ("Fresh one? Fresh one!", "rub_hands"),
                        ("Don't hurt me, I can help!", "cower"), ("*skitters*", "skitter")),
        "combat": _lines(("Bite and run!", "bite"), ("*shrieks*", "shriek"), ("Back, back!", "claw"),
                         ("You'll rot like the rest!", "lunge")),
    },
    "lich": {
        "idle": _lines(("Time means nothing to me.", "float"), ("*whispers in a dead tongue*", "chant"),
                       ("The living are so brief.", "gaze"), ("My phylactery hums.", "touch_chest")),
        "alert": _lines(("You intrude upon eternity.", "raise_hand"), ("I see you, mortal.", "eyes_glow"),
                        ("Turn back while you still breathe.", "point"), ("How curious.", "tilt_head")),
        "combat": _lines(("Kneel before death!", "cast"), ("Rise, my servants!", "summon"),
                         ("Your soul will serve me.", "grasp"), ("Burn.", "fireball")),
    },
}


class BarkDecks:
    def __init__(self, seed: int = 0, tables: dict[str, dict[str, tuple[Bark, ...]]] | None = None):
        self.seed = seed
        self.tables = tables or BARKS
        for archetype, situations in self.tables.items():
            for situation, lines in situations.items():
                if len(lines) < 2:
                    raise ValueError(f"barks[{archetype!r}][{situation!r}]: needs >= 2 lines (no repeats)")
        # Per NPC: its rng, and per situation the deck (indices left, the next draw last) and the last draw.
        self._npcs: dict[str, tuple[random.Random, dict[str, list[int]], dict[str, int]]] = {}

    def next(self, npc_id: str, archetype: str, situation: str = "idle") -> Bark:
        lines = self._lines(archetype, situation)
        npc = self._npcs.get(npc_id)
        if npc is None:
            npc = self._npcs[npc_id] = (random.Random(f"{self.seed}:{npc_id}"), {}, {})  # str seeds: stable
        rng, decks, last = npc
        deck = decks.get(situation)
        if not deck:
            deck = decks[situation] = _shuffled(rng, len(lines), last.get(situation))
        last[situation] = deck.pop()
        return lines[last[situation]]

    def forget(self, npc_id: str) -> None:
        """Drops an NPC's decks (despawned), so that memory stays bounded by the live NPCs."""
        self._npcs.pop(npc_id, None)

    def __len__(self) -> int:
        return len(self._npcs)

    def _lines(self, archetype: str, situation: str) -> tuple[Bark, ...]:
        if archetype not in self.tables:
            raise ValueError(f"archetype: unknown {archetype!r}; expected one of {ARCHETYPES}")
        if situation not in self.tables[archetype]:
            raise ValueError(f"situation: unknown {situation!r}; expected one of {SITUATIONS}")
        return self.tables[archetype][situation]


def _shuffled(rng: random.Random, size: int, last: int | None) -> list[int]:
    """A new deck, drawn from the end: its first draw (the last element) is never `last`."""
    deck = list(range(size))
    rng.shuffle(deck)
    if deck[-1] == last:
        swap = rng.randrange(size - 1)
        deck[-1], deck[swap] = deck[swap], deck[-1]
    return deck
