"""MemoryConfig: the one frozen configuration of the memory package, validated when built."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DAY_S = 86_400.0
# Key prefixes end with ':' and hold no spaces or glob characters: SCAN patterns are built from them.
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,128}:")


@dataclass(frozen=True)
class MemoryConfig:
    key_prefix: str = "npc:mem:"  # every Redis key of the package starts with it (tests use their own)

    # Hot cache (scheduler process). Times are on the store's injectable clock, in seconds.
    hot_ttl_s: float = 30 * 60.0  # an NPC x player entry lives this long after its last use
    hot_max_entries: int = 4096  # LRU bound; one entry <= turn_window_max * max_turn_chars + 2 cards
    turn_window_max: int = 20  # the recent-turn window is append-only up to this many turns,
    turn_window_min: int = 12  # then compacted to the last this-many (the prompt prefix moves twice less)
    max_turn_chars: int = 2000  # a longer turn is rejected (ValueError), never cut

    # Cards.
    max_card_bytes: int = 2048  # serialized (compact UTF-8 JSON); larger -> CardTooLarge, never truncated

    # Nearline (Redis). Entries are trimmed by their timestamp on the injectable clock; idle keys expire on
    # Redis's own wall clock after idle_key_ttl_s without a write.
    window_days: float = 30.0
    idle_key_ttl_s: float = 31 * DAY_S  # a day past the window, so trimming by time always runs first
    max_summaries: int = 60  # per NPC x player inside the window (two sessions a day for 30 days)
    prefetch_summaries: int = 3  # newest summaries a conversation start reads
    summary_min_chars: int = 300
    summary_max_chars: int = 600
    max_facts: int = 10  # salient facts kept per NPC x player (the most important, newest on ties)
    prompt_facts: int = 5  # facts retrieval puts into a prompt
    max_emotion_points: int = 64  # emotional trajectory points kept (newest)
    prefetch_emotion_points: int = 8
    outbox_maxlen: int | None = None  # None: no trimming (the archiver acks and deletes); else MAXLEN ~ n

    # Cold restore (memory/restore.py refills Redis from PostgreSQL in the background; never on the hot path).
    cold_restore: bool = True  # a prefetch that finds a pair empty in Redis asks the restore job for it
    restore_wait_s: float = 120.0  # while a request is this fresh, prefetch re-checks Redis for the answer

    # Redis outage: writes wait in a bounded in-process buffer and are flushed in order when Redis returns.
    redis_timeout_s: float = 0.5  # socket connect/read timeout of the client built by `connect`
    buffer_max_writes: int = 20_000  # buffered write batches; on overflow the oldest is dropped and counted
    retry_interval_s: float = 0.5  # seconds between reconnection attempts while Redis is down (monotonic)
    flush_chunk: int = 256  # buffered write batches per MULTI when flushing (bounds Redis's pause)

    # Retrieval (Generative Agents: weighted sum of min-max normalised recency, importance, relevance).
    recency_decay_per_hour: float = 0.995
    weight_recency: float = 1.0
    weight_importance: float = 1.0
    weight_relevance: float = 1.0
    embeddings: bool = False  # relevance from the MiniLM sentence embedder; keyword overlap otherwise

    # Session end.
    summarize_timeout_s: float = 30.0  # a worker summary slower than this falls back to the extractive one

    def __post_init__(self):
        _require(isinstance(self.key_prefix, str) and _PREFIX.fullmatch(self.key_prefix) is not None,
                 "key_prefix", f"must match {_PREFIX.pattern} (end with ':'), got {self.key_prefix!r}")
        for name in ("hot_ttl_s", "idle_key_ttl_s", "window_days", "redis_timeout_s", "summarize_timeout_s",
                     "restore_wait_s"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, name, f"must be a number > 0, got {value!r}")
        _require(_is_number(self.retry_interval_s) and self.retry_interval_s >= 0, "retry_interval_s",
                 f"must be a number >= 0, got {self.retry_interval_s!r}")
        for name in ("hot_max_entries", "max_turn_chars", "max_card_bytes", "max_summaries",
                     "prefetch_summaries", "max_facts", "prompt_facts", "max_emotion_points",
                     "prefetch_emotion_points", "buffer_max_writes", "flush_chunk", "summary_min_chars"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, f"must be an int >= 1, got {value!r}")
        self._check_windows()
        _require(self.outbox_maxlen is None or (_is_int(self.outbox_maxlen) and self.outbox_maxlen >= 1),
                 "outbox_maxlen", f"must be None or an int >= 1, got {self.outbox_maxlen!r}")
        _require(0 < self.recency_decay_per_hour <= 1, "recency_decay_per_hour",
                 f"must be in (0, 1], got {self.recency_decay_per_hour!r}")
        for name in ("weight_recency", "weight_importance", "weight_relevance"):
            value = getattr(self, name)
            _require(_is_number(value) and value >= 0, name, f"must be a number >= 0, got {value!r}")

    def _check_windows(self) -> None:
        _require(_is_int(self.turn_window_min) and _is_int(self.turn_window_max)
                 and 1 <= self.turn_window_min <= self.turn_window_max, "turn_window_min",
                 f"needs 1 <= turn_window_min <= turn_window_max, got {self.turn_window_min!r} and "
                 f"{self.turn_window_max!r}")
        _require(_is_int(self.summary_max_chars) and self.summary_max_chars >= self.summary_min_chars,
                 "summary_max_chars", f"must be an int >= summary_min_chars ({self.summary_min_chars}), "
                 f"got {self.summary_max_chars!r}")
        _require(self.prefetch_summaries <= self.max_summaries, "prefetch_summaries",
                 f"must be <= max_summaries ({self.max_summaries}), got {self.prefetch_summaries}")
        _require(self.prompt_facts <= self.max_facts, "prompt_facts",
                 f"must be <= max_facts ({self.max_facts}), got {self.prompt_facts}")
        _require(self.prefetch_emotion_points <= self.max_emotion_points, "prefetch_emotion_points",
                 f"must be <= max_emotion_points ({self.max_emotion_points}), got "
                 f"{self.prefetch_emotion_points}")

    @property
    def window_s(self) -> float:
        return self.window_days * DAY_S


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"MemoryConfig.{name} {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
