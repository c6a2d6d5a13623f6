"""Per-tier bounded request queues with deadlines, load shedding and an adaptive batching window.

    queues = RequestQueues(config)
    outcomes = queues.push(Request("r1", "npc-7", Tier.GOLD, "talk", tokens=812), now)  # () when queued
    wait = queues.wait_s(now)          # None: nothing queued; 0: send a batch now; else sleep this long
    batch = queues.next_batch(now)     # batch.requests (Gold first), batch.dropped (expired outcomes)

Times are seconds on the caller's monotonic clock (`time.monotonic()`), passed in so tests can drive them.

Lanes: Gold, Silver, Bronze. The Bronze lane holds only background work with no player waiting (prefix
warm-ups, session summaries): a Bronze NPC's talk or act never reaches the LLM and is refused here (the
actor answers it from the bark tables). Within a lane, earliest deadline first; across lanes, strict
priority: Gold, then Silver, then Bronze.

Every request that leaves without a batch gets an Outcome, never silence:
- "expired": still queued at its deadline (per tier and kind, SchedulerConfig.deadline_ms);
- "shed": dropped under load, Bronze-lane work first, then Silver: when all lanes together hold max_queued,
  a new request displaces the newest request of the lowest lane below its own (Bronze, then Silver); when
  none is below, or its own lane is full, the new Silver or Bronze request itself is shed;
- "overloaded": a Gold request whose own lane is full (the only way Gold is refused; the config makes sure
  the total bound alone never refuses Gold);
- "refused": a request that can never run here (Bronze talk/act, a prompt over the batch token budget).

Batching window (adaptive, between batch_window_min_ms and batch_window_max_ms):
    window = min + (max - min) * load
where `load` in [0, 1] is an EWMA (weight batch_load_alpha) of how full each sent batch was,
max(requests / batch_max_requests, tokens / batch_max_tokens), and decays by exp(-idle / batch_idle_tau_ms)
over the idle time before a window opens. Idle: small batches, load -> 0, the window narrows to the minimum
(a lone request waits ~5 ms). Under load: full batches, load -> 1, the window widens to the maximum so
batches fill up (fewer, larger submissions to the worker, which is busy anyway). A window opens with the
first request queued and closes at opened + window, or earlier when a batch is full already or a queued
deadline is within batch_deadline_guard_ms. Requests left over by a full batch keep the window of the oldest
of them, so no request gathers for more than one window.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

from tier_scheduler.config import BACKGROUND_KINDS, KINDS, PLAYER_KINDS, SchedulerConfig, Tier

OUTCOME_STATUSES = ("expired", "shed", "overloaded", "refused")


@dataclass(slots=True)
class Request:
    """A request waiting for a batch. `tokens`: prompt tokens the batch budget counts (the whole prompt,
    cached prefix included: a conservative bound). `payload`: what the caller sends to the worker (prompt
    ids, adapter stack, sampling params), opaque here. `push` sets `arrival` and, unless given, `deadline`
    (seconds, monotonic)."""

    request_id: str
    npc_id: str
    tier: Tier
    kind: str
    tokens: int
    payload: object = None
    deadline: float | None = None
    arrival: float = field(default=0.0)

    @property
    def lane(self) -> Tier:
        return Tier.BRONZE if self.kind in BACKGROUND_KINDS else Tier(self.tier)


@dataclass(frozen=True)
class Outcome:
    """Why a request left the queues without a batch; the caller turns it into an explicit reply."""

    request: Request
    status: str  # one of OUTCOME_STATUSES
    reason: str


@dataclass(frozen=True)
class Batch:
    requests: list[Request]  # Gold first, then Silver, then Bronze-lane work; earliest deadline first within
    tokens: int
    window_ms: float  # the window this batch was gathered in
    dropped: list[Outcome]  # requests found expired while packing


class RequestQueues:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._lanes: tuple[list[tuple[float, int, Request]], ...] = ([], [], [])  # heaps per Tier
        self._lane_max = (config.gold_queue_max, config.silver_queue_max, config.bronze_queue_max)
        self._lane_of: dict[str, int] = {}  # request_id -> lane, for cancel and duplicate checks
        self._seq = itertools.count()
        self._tokens = 0  # prompt tokens queued, all lanes
        self._load = 0.0
        self._opened: float | None = None  # when the current window opened; None while nothing is queued
        self._idle_since = 0.0
        self._last_now = 0.0  # the latest `now` seen (cancel and drain take none)
        self.counters = dict.fromkeys(("queued", "batched", "batches", *OUTCOME_STATUSES), 0)

    def __len__(self) -> int:
        return len(self._lane_of)

    def lane_sizes(self) -> dict[str, int]:
        return {tier.name.lower(): len(self._lanes[tier]) for tier in Tier}

    @property
    def window_ms(self) -> float:
        low, high = self.config.batch_window_min_ms, self.config.batch_window_max_ms
        return low + (high - low) * self._load

    # ------------------------------------------------------------------------------------------ push

    def push(self, request: Request, now: float) -> tuple[Outcome, ...]:
        """Queues the request; returns the outcomes of requests that leave instead (the new one, or a
        lower-lane one shed to make room), empty when it was queued and nothing was shed."""
        self._last_now = now
        refusal = self._refusal(request)
        if refusal:
            return self._outcomes((request, "refused", refusal))
        request.arrival = now
        if request.deadline is None:
            request.deadline = now + self.config.deadline_ms(request.tier, request.kind) / 1000.0
        if request.deadline <= now:
            return self._outcomes((request, "expired", "deadline already passed when it arrived"))
        lane = request.lane
        if len(self._lanes[lane]) >= self._lane_max[lane]:
            return self._outcomes(self._lane_full(request, lane))
        shed = ()
        if len(self) >= self.config.max_queued:
            victim = self._newest_below(lane)
            if victim is None:
                return self._outcomes((request, *self._refuse_full(lane)))
            self._remove(victim)
            shed = self._outcomes((victim, "shed", f"queues full ({self.config.max_queued} requests): "
                                                   f"made room for {Tier(lane).name} work"))
        self._insert(request, lane, now)
        return shed

    def _refusal(self, request: Request) -> str:
        if request.kind not in KINDS:
            raise ValueError(f"kind: unknown {request.kind!r}; expected one of {KINDS}")
        if request.request_id in self._lane_of:
            raise ValueError(f"request_id: {request.request_id!r} is already queued")
        if request.kind in PLAYER_KINDS and request.tier not in (Tier.GOLD, Tier.SILVER):
            return f"a Bronze NPC's {request.kind} never reaches the LLM: answer it with a bark"
        if not isinstance(request.tokens, int) or request.tokens < 1:
            return f"tokens: must be an int >= 1, got {request.tokens!r}"
        if request.tokens > self.config.batch_max_tokens:
            return (f"prompt of {request.tokens} tokens exceeds the batch budget of "
                    f"{self.config.batch_max_tokens} tokens")
        return ""

    def _lane_full(self, request: Request, lane: int) -> tuple[Request, str, str]:
        reason = f"{Tier(lane).name} queue full ({self._lane_max[lane]} requests)"
        return (request, "overloaded" if lane == Tier.GOLD else "shed", reason)

    def _refuse_full(self, lane: int) -> tuple[str, str]:
        # Unreachable for Gold: max_queued >= gold_queue_max, so some lower lane holds a request.
        return ("overloaded" if lane == Tier.GOLD else "shed",
                f"queues full ({self.config.max_queued} requests) with no lower-tier work to shed")

    def _newest_below(self, lane: int) -> Request | None:
        """The most recently queued request of the lowest non-empty lane below `lane` (it has waited least).
        O(lane size): runs only when the queues are full."""
        for lower in (Tier.BRONZE, Tier.SILVER):
            if lower > lane and self._lanes[lower]:
                return max(self._lanes[lower], key=lambda entry: entry[1])[2]
        return None

    def _insert(self, request: Request, lane: int, now: float) -> None:
        if self._opened is None:
            self._decay_load(now)
            self._opened = now
        heapq.heappush(self._lanes[lane], (request.deadline, next(self._seq), request))
        self._lane_of[request.request_id] = lane
        self._tokens += request.tokens
        self.counters["queued"] += 1

    def _decay_load(self, now: float) -> None:
        idle_ms = max(now - self._idle_since, 0.0) * 1000.0
        self._load *= math.exp(-idle_ms / self.config.batch_idle_tau_ms)

    # ---------------------------------------------------------------------------------- cancel, drain

    def cancel(self, request_id: str) -> Request | None:
        """Removes a queued request (the game aborted, the NPC despawned); None when it is not queued."""
        lane = self._lane_of.get(request_id)
        if lane is None:
            return None
        request = next(entry[2] for entry in self._lanes[lane] if entry[2].request_id == request_id)
        self._remove(request)
        return request

    def drain(self, reason: str) -> list[Outcome]:
        """Sheds everything queued (shutdown), each with an explicit outcome."""
        requests = [entry[2] for lane in self._lanes for entry in sorted(lane)]
        for request in requests:
            self._remove(request)
        return list(self._outcomes(*((r, "shed", reason) for r in requests)))

    def _remove(self, request: Request) -> None:
        """O(lane size): only cancel and shedding take a request out of the middle of a heap."""
        lane = self._lanes[self._lane_of.pop(request.request_id)]
        index = next(i for i, entry in enumerate(lane) if entry[2] is request)
        lane[index] = lane[-1]
        lane.pop()
        heapq.heapify(lane)
        self._tokens -= request.tokens
        self._window_closed_if_empty(self._last_now)

    def _outcomes(self, *items: tuple[Request, str, str]) -> tuple[Outcome, ...]:
        for _, status, _ in items:
            self.counters[status] += 1
        return tuple(Outcome(*item) for item in items)

    # ----------------------------------------------------------------------------------------- batches

    def wait_s(self, now: float) -> float | None:
        """Seconds until the current window closes: None when nothing is queued, 0 when a batch should go
        now (window over, a full batch waiting, or a deadline within the guard)."""
        if not self._lane_of:
            return None
        config = self.config
        if len(self) >= config.batch_max_requests or self._tokens >= config.batch_max_tokens:
            return 0.0
        close = self._opened + self.window_ms / 1000.0
        guard = config.batch_deadline_guard_ms / 1000.0
        earliest = min(lane[0][0] for lane in self._lanes if lane)
        return max(min(close, earliest - guard) - now, 0.0)

    def next_batch(self, now: float) -> Batch:
        """Drops the expired requests, then packs up to batch_max_requests / batch_max_tokens: Gold first,
        in deadline order; it stops at the first request that does not fit, so lower lanes never overtake a
        waiting higher one. Call when wait_s() is 0 (an early call just sends a smaller batch)."""
        self._last_now = now
        window_ms = self.window_ms
        dropped = self._expire(now)
        requests, tokens = self._pack()
        if requests:
            fill = max(len(requests) / self.config.batch_max_requests, tokens / self.config.batch_max_tokens)
            alpha = self.config.batch_load_alpha
            self._load = (1.0 - alpha) * self._load + alpha * fill
            self.counters["batches"] += 1
            self.counters["batched"] += len(requests)
        # Leftovers (the batch was full) keep the window of their oldest: none waits more than one window.
        self._opened = min((entry[2].arrival for lane in self._lanes for entry in lane), default=None)
        self._window_closed_if_empty(now)
        return Batch(requests, tokens, window_ms, dropped)

    def _expire(self, now: float) -> list[Outcome]:
        # Heads only: each lane is a heap on deadline, so nothing below a live head has expired.
        expired = []
        for lane in self._lanes:
            while lane and lane[0][0] <= now:
                expired.append(heapq.heappop(lane)[2])
        for request in expired:
            del self._lane_of[request.request_id]
            self._tokens -= request.tokens
        late = ((r, "expired", f"still queued {1000.0 * (now - r.arrival):.1f} ms after arrival, past its "
                               f"deadline of {1000.0 * (r.deadline - r.arrival):.0f} ms") for r in expired)
        return list(self._outcomes(*late))

    def _pack(self) -> tuple[list[Request], int]:
        max_requests, max_tokens = self.config.batch_max_requests, self.config.batch_max_tokens
        requests, tokens = [], 0
        for lane in self._lanes:
            while lane and len(requests) < max_requests and tokens + lane[0][2].tokens <= max_tokens:
                request = heapq.heappop(lane)[2]
                del self._lane_of[request.request_id]
                requests.append(request)
                tokens += request.tokens
            if lane:
                break  # strict priority: this lane still waits, the lanes below wait behind it
        self._tokens -= tokens
        return requests, tokens

    def _window_closed_if_empty(self, now: float) -> None:
        if not self._lane_of:
            self._opened = None
            self._idle_since = now
