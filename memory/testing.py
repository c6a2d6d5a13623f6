"""Helpers shared by the memory tests and benchmarks: a settable clock and a sample conversation."""

from __future__ import annotations

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DAY_S = 86_400.0


class FakeClock:
    """An injectable clock (epoch seconds) that moves only when told to."""

    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


# A conversation between a vampire NPC and a player: promises, a name, family, debts, a quest item.
DIALOGUE: tuple[tuple[str, str], ...] = (
    ("player", "Good evening. My name is Arin, and I came from the river village."),
    ("npc", "Few travellers knock on a crypt door after dusk. What do you want from old Vlad?"),
    ("player", "The villagers say you know where the Moon Amulet is hidden."),
    ("npc", "Perhaps I do. The amulet belonged to my sister before the hunters killed her."),
    ("player", "I am sorry about your sister. I lost my brother to the same hunters last winter."),
    ("npc", "Then we share an enemy. Bring me their captain's silver dagger and I will trust you."),
    ("player", "I promise to bring you the dagger before the next full moon."),
    ("npc", "Promises are cheap in this valley. The last one who swore that stole my map and fled."),
    ("player", "I owe you nothing yet, but I will pay for the map with forty gold coins."),
    ("npc", "Keep your gold. Bring the dagger, and the amulet's hiding place is yours."),
    ("player", "Where should I look for the captain?"),
    ("npc", "He drinks at the Grey Stag inn every night, and he fears the old chapel."),
)
