"""Hot tier: per NPC x player, the recent-turn window, both cards and the prefetched context, in process.

The cache is an OrderedDict in last-use order: a hit moves its entry to the end, so the front always holds
the least recently used entry, which is both the LRU victim and the first to pass its TTL. Expiry is lazy (on
lookup, and a sweep of the expired front on every insert), so there is no timer and no thread. Times come from
the store's injectable clock (seconds).

Entries are owned by the scheduler's actor of their NPC (single-threaded), so they are mutable and unlocked.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from memory.cards import QuestCard, RelationshipCard
from memory.records import EmotionPoint, Fact, Summary, Turn

PairKey = tuple[str, str]  # (npc_id, player_id)


@dataclass
class PairMemory:
    """What one NPC remembers of one player. `loaded` is False while the entry was built without Redis (an
    outage, or turns recorded before any prefetch): its cards, facts and summaries are then unknown, not
    empty."""

    npc_id: str
    player_id: str
    relationship: RelationshipCard | None = None
    quest: QuestCard | None = None
    turns: list[Turn] = field(default_factory=list)  # oldest first; the append-only prompt window
    summaries: list[Summary] = field(default_factory=list)  # newest first
    facts: list[Fact] = field(default_factory=list)  # the retained salient facts, any order
    emotions: list[EmotionPoint] = field(default_factory=list)  # newest first
    session_id: str | None = None  # the open session (None between sessions)
    candidates: list[Fact] = field(default_factory=list)  # fact candidates of turns compacted out
    loaded: bool = True
    last_used: float = 0.0
    restore_requested: float | None = None  # when a cold restore was asked for (store clock); None: none open

    @property
    def key(self) -> PairKey:
        return (self.npc_id, self.player_id)

    def is_empty(self) -> bool:
        """Nothing remembered at all: what a pair unseen for longer than the window looks like in Redis."""
        return not (self.relationship or self.quest or self.turns or self.summaries or self.facts
                    or self.emotions)

    def append_turn(self, turn: Turn, window_max: int, window_min: int) -> list[Turn]:
        """Appends to the window; when it grows past window_max, keeps only the newest window_min turns.
        Returns the turns compacted out (oldest first), empty on a plain append."""
        self.turns.append(turn)
        if len(self.turns) <= window_max:
            return []
        dropped = self.turns[:-window_min]
        del self.turns[:-window_min]
        return dropped


class HotCache:
    """Bounded LRU of PairMemory with a TTL after last use. get/put are O(1) (plus expired entries swept)."""

    def __init__(self, max_entries: int, ttl_s: float):
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError(f"HotCache needs max_entries >= 1 and ttl_s > 0, got {max_entries}, {ttl_s}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[PairKey, PairMemory] = OrderedDict()
        self.hits = self.misses = self.evictions = self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: PairKey) -> bool:
        return key in self._entries

    def get(self, key: PairKey, now: float) -> PairMemory | None:
        """The entry, marked used at `now`; None when absent or idle past the TTL (then dropped)."""
        entry = self._entries.get(key)
        if entry is not None and now - entry.last_used > self.ttl_s:
            del self._entries[key]
            self.expirations += 1
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        entry.last_used = now
        self._entries.move_to_end(key)
        return entry

    def peek(self, key: PairKey, now: float) -> PairMemory | None:
        """The live entry without marking it used (no LRU move, no hit counted)."""
        entry = self._entries.get(key)
        return entry if entry is not None and now - entry.last_used <= self.ttl_s else None

    def put(self, entry: PairMemory, now: float) -> None:
        """Inserts or replaces the entry as the most recently used; drops expired entries and, past
        max_entries, the least recently used."""
        entry.last_used = now
        self._entries[entry.key] = entry
        self._entries.move_to_end(entry.key)
        self.sweep(now)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def pop(self, key: PairKey) -> PairMemory | None:
        return self._entries.pop(key, None)

    def sweep(self, now: float) -> int:
        """Drops the expired entries; they sit at the front (oldest use first). Returns how many."""
        dropped = 0
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.last_used <= self.ttl_s:
                break
            self._entries.popitem(last=False)
            dropped += 1
        self.expirations += dropped
        return dropped

    def clear(self) -> None:
        self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "expirations": self.expirations}
