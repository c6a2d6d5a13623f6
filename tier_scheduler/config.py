"""SchedulerConfig: the one frozen configuration of the tier scheduler, validated when built.

Units: distances in meters, times in milliseconds in the config (the modules convert to seconds on a
monotonic clock), token counts in tokens of the model's tokenizer.

Also the package's shared vocabulary: `Tier` (Gold / Silver / Bronze as small ints, lower is better, so
`min` promotes and `max` demotes), the request kinds and the archetypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum


class Tier(IntEnum):
    GOLD = 0
    SILVER = 1
    BRONZE = 2


# The same names as gpu_worker.lora.registry.ARCHETYPES (a test keeps them equal); not imported from there
# so that the scheduler process never imports gpu_worker (and torch) for a tuple of strings.
ARCHETYPES = ("vampire", "werewolf", "zombie", "ghoul", "lich")

# talk: dialogue, streamed; act: one structured action. warm: prefill an NPC's prompt prefix into the
# worker's prefix cache (on promotion to Gold); summary: a session summary. warm and summary have no player
# waiting: they ride in the Bronze lane (background work) and are the first shed.
PLAYER_KINDS = ("talk", "act")
BACKGROUND_KINDS = ("warm", "summary")
KINDS = PLAYER_KINDS + BACKGROUND_KINDS


@dataclass(frozen=True)
class SchedulerConfig:
    # Tiers, from the distance to the nearest player: an NPC is promoted when it comes closer than `enter`
    # and demoted only once it is farther than `exit` (hysteresis: the band between them never flaps).
    gold_enter_m: float = 25.0
    gold_exit_m: float = 35.0
    silver_enter_m: float = 80.0
    silver_exit_m: float = 100.0
    gold_cap: int = 200  # at most this many Gold NPCs per region: the farthest are demoted first
    silver_cap: int = 400
    keep_silver_score: int = 50  # relationship score (trust/affinity, -100..100) >= this: Silver at least
    distance_chunk: int = 4096  # NPC rows per block of the [rows, players] distance matrix (bounds memory)

    # Queues (requests waiting for a batch). A lane full -> its request is shed (Gold: "overloaded" error);
    # all lanes together at max_queued -> the newest Bronze, then Silver, request is shed to make room.
    gold_queue_max: int = 512
    silver_queue_max: int = 1024
    bronze_queue_max: int = 256  # background work (warm, summary); never a player's talk or act
    max_queued: int = 1024

    # Deadlines, ms after arrival, until the request must be in a batch (the first token follows it);
    # a request still queued past its deadline is dropped with an explicit "expired" outcome.
    gold_talk_deadline_ms: float = 150.0
    gold_act_deadline_ms: float = 200.0
    silver_talk_deadline_ms: float = 400.0
    silver_act_deadline_ms: float = 500.0
    warm_deadline_ms: float = 1_000.0
    summary_deadline_ms: float = 30_000.0

    # Batching window: how long requests gather before one batch goes to the worker (see queues.py for the
    # adaptive rule). The batch holds at most batch_max_requests and batch_max_tokens prompt tokens.
    batch_window_min_ms: float = 5.0
    batch_window_max_ms: float = 15.0
    batch_load_alpha: float = 0.3  # EWMA weight of the newest batch's fill ratio in the load estimate
    batch_idle_tau_ms: float = 100.0  # the load estimate decays by e every this much idle time
    batch_deadline_guard_ms: float = 10.0  # a window closes early when a queued deadline is this near
    batch_max_requests: int = 64
    batch_max_tokens: int = 16_384

    # Output lengths (new tokens). Silver gets short outputs.
    gold_talk_max_tokens: int = 160
    gold_act_max_tokens: int = 48
    silver_talk_max_tokens: int = 40
    silver_act_max_tokens: int = 32
    warm_max_tokens: int = 1  # a warm-up only needs the prefill; the worker needs >= 1 new token
    summary_max_tokens: int = 200

    # Prompt: the recent-turn window is append-only up to `max` turns, then compacted to the newest `min`
    # (Gold: as memory's MemoryConfig.turn_window_max/min; Silver shows a few turns only).
    gold_turn_window_max: int = 20
    gold_turn_window_min: int = 12
    silver_turn_window_max: int = 6
    silver_turn_window_min: int = 2
    max_input_chars: int = 2_000  # a longer player input is rejected (ValueError), never cut

    def __post_init__(self):
        self._check_tiers()
        self._check_queues()
        self._check_batching()
        for name in ("gold_talk_max_tokens", "gold_act_max_tokens", "silver_talk_max_tokens",
                     "silver_act_max_tokens", "warm_max_tokens", "summary_max_tokens", "max_input_chars"):
            _require_int(self, name, 1)
        for tier in ("gold", "silver"):
            low, high = f"{tier}_turn_window_min", f"{tier}_turn_window_max"
            _require_int(self, low, 1)
            _require_int(self, high, 1)
            _require(getattr(self, low) <= getattr(self, high), low,
                     f"must be <= {high} ({getattr(self, high)}), got {getattr(self, low)}")

    def _check_tiers(self) -> None:
        for name in ("gold_enter_m", "gold_exit_m", "silver_enter_m", "silver_exit_m"):
            _require_number(self, name, 0.0)
        # enter <= exit gives hysteresis (equal: none); Gold's band must sit inside Silver's so that a Gold
        # NPC leaving Gold lands in Silver, not Bronze.
        _require(self.gold_enter_m <= self.gold_exit_m, "gold_exit_m",
                 f"must be >= gold_enter_m ({self.gold_enter_m}), got {self.gold_exit_m}")
        _require(self.silver_enter_m <= self.silver_exit_m, "silver_exit_m",
                 f"must be >= silver_enter_m ({self.silver_enter_m}), got {self.silver_exit_m}")
        _require(self.gold_exit_m <= self.silver_enter_m, "silver_enter_m",
                 f"must be >= gold_exit_m ({self.gold_exit_m}), got {self.silver_enter_m}")
        _require_int(self, "gold_cap", 0)
        _require_int(self, "silver_cap", 0)
        _require_int(self, "distance_chunk", 1)
        _require(isinstance(self.keep_silver_score, int) and not isinstance(self.keep_silver_score, bool),
                 "keep_silver_score", f"must be an int, got {self.keep_silver_score!r}")

    def _check_queues(self) -> None:
        for name in ("gold_queue_max", "silver_queue_max", "bronze_queue_max", "max_queued"):
            _require_int(self, name, 1)
        # Gold may be refused only when its own lane is full: the total bound must leave it that room.
        _require(self.max_queued >= self.gold_queue_max, "max_queued",
                 f"must be >= gold_queue_max ({self.gold_queue_max}), got {self.max_queued}")
        for name in ("gold_talk_deadline_ms", "gold_act_deadline_ms", "silver_talk_deadline_ms",
                     "silver_act_deadline_ms", "warm_deadline_ms", "summary_deadline_ms"):
            _require_number(self, name, 0.0, strict=True)

    def _check_batching(self) -> None:
        _require_number(self, "batch_window_min_ms", 0.0)
        _require(self.batch_window_min_ms <= self.batch_window_max_ms, "batch_window_max_ms",
                 f"must be >= batch_window_min_ms ({self.batch_window_min_ms}), got "
                 f"{self.batch_window_max_ms}")
        _require(_is_number(self.batch_load_alpha) and 0 < self.batch_load_alpha <= 1, "batch_load_alpha",
                 f"must be in (0, 1], got {self.batch_load_alpha!r}")
        _require_number(self, "batch_idle_tau_ms", 0.0, strict=True)
        _require_number(self, "batch_deadline_guard_ms", 0.0)
        _require_int(self, "batch_max_requests", 1)
        _require_int(self, "batch_max_tokens", 1)

    # ------------------------------------------------------------------------------------- lookups

    def deadline_ms(self, tier: Tier, kind: str) -> float:
        """Queue deadline of a request: per tier for talk/act, per kind for background work."""
        return getattr(self, _per_kind(tier, kind, "deadline_ms"))

    def max_new_tokens(self, tier: Tier, kind: str) -> int:
        return getattr(self, _per_kind(tier, kind, "max_tokens"))

    def turn_window(self, tier: Tier) -> tuple[int, int]:
        """(max, min) of the recent-turn window a prompt of this tier shows."""
        if tier == Tier.GOLD:
            return self.gold_turn_window_max, self.gold_turn_window_min
        if tier == Tier.SILVER:
            return self.silver_turn_window_max, self.silver_turn_window_min
        raise ValueError(f"tier: Bronze NPCs get no LLM prompt (barks only), got {Tier(tier).name}")


def _per_kind(tier: Tier, kind: str, field: str) -> str:
    if kind in BACKGROUND_KINDS:
        return f"{kind}_{field}"
    if kind not in PLAYER_KINDS:
        raise ValueError(f"kind: unknown {kind!r}; expected one of {KINDS}")
    if tier not in (Tier.GOLD, Tier.SILVER):
        raise ValueError(f"tier: a {kind} request needs a Gold or Silver NPC (Bronze never reaches the LLM), "
                         f"got {tier!r}")
    return f"{Tier(tier).name.lower()}_{kind}_{field}"


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SchedulerConfig.{name} {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_number(config: SchedulerConfig, name: str, low: float, strict: bool = False) -> None:
    value = getattr(config, name)
    ok = _is_number(value) and (value > low if strict else value >= low)
    _require(ok, name, f"must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def _require_int(config: SchedulerConfig, name: str, low: int) -> None:
    value = getattr(config, name)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _require(ok, name, f"must be an int >= {low}, got {value!r}")
