"""Request queues: Gold before Silver, Bronze never reaches the LLM, shedding order (Bronze-lane work, then
Silver, Gold only when its own lane is full) with explicit outcomes, deadline expiry, token budgets, and
the adaptive batching window."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tier_scheduler.config import SchedulerConfig, Tier
from tier_scheduler.queues import OUTCOME_STATUSES, Request, RequestQueues

_ids = itertools.count()


def req(tier=Tier.GOLD, kind="talk", tokens=100, deadline=None, npc="npc-1"):
    return Request(f"r{next(_ids)}", npc, tier, kind, tokens, deadline=deadline)


def small_config(**overrides):
    base = dict(gold_queue_max=4, silver_queue_max=4, bronze_queue_max=4, max_queued=6)
    return SchedulerConfig(**{**base, **overrides})


# --------------------------------------------------------------------------------------------- order


def test_gold_before_silver_before_background_then_deadline_order():
    queues = RequestQueues(SchedulerConfig())
    warm = req(Tier.GOLD, "warm")
    silver = req(Tier.SILVER, "talk")
    gold_act = req(Tier.GOLD, "act")  # deadline 200 ms
    gold_talk = req(Tier.GOLD, "talk")  # deadline 150 ms
    for r in (warm, silver, gold_act, gold_talk):
        assert queues.push(r, now=0.0) == ()
    batch = queues.next_batch(now=0.001)
    assert batch.requests == [gold_talk, gold_act, silver, warm]
    assert batch.tokens == 400 and batch.dropped == []
    assert gold_talk.deadline == pytest.approx(0.150) and gold_act.deadline == pytest.approx(0.200)
    assert len(queues) == 0 and queues.wait_s(1.0) is None


def test_bronze_talk_and_act_never_reach_the_llm():
    queues = RequestQueues(SchedulerConfig())
    for kind in ("talk", "act"):
        (outcome,) = queues.push(req(Tier.BRONZE, kind), now=0.0)
        assert outcome.status == "refused" and "bark" in outcome.reason
    assert len(queues) == 0
    assert queues.push(req(Tier.BRONZE, "summary"), now=0.0) == ()  # background work is fine
    assert queues.lane_sizes() == {"gold": 0, "silver": 0, "bronze": 1}


def test_prompt_over_the_batch_budget_is_refused():
    queues = RequestQueues(SchedulerConfig(batch_max_tokens=1000))
    (outcome,) = queues.push(req(tokens=1001), now=0.0)
    assert outcome.status == "refused" and "1001 tokens" in outcome.reason


def test_bad_requests_raise():
    queues = RequestQueues(SchedulerConfig())
    with pytest.raises(ValueError, match="kind"):
        queues.push(req(kind="dance"), now=0.0)
    r = req()
    queues.push(r, now=0.0)
    with pytest.raises(ValueError, match="already queued"):
        queues.push(Request(r.request_id, "npc", Tier.GOLD, "talk", 5), now=0.0)


# ------------------------------------------------------------------------------------------ shedding


def test_shedding_order_background_then_silver_never_gold():
    queues = RequestQueues(small_config())
    background = [req(Tier.SILVER, "warm") for _ in range(2)]
    silver = [req(Tier.SILVER) for _ in range(4)]
    for r in background + silver:
        assert queues.push(r, now=0.0) == ()
    assert len(queues) == 6  # max_queued
    shed = [queues.push(req(Tier.GOLD), now=0.0) for _ in range(4)]
    statuses = [(o.status, o.request) for outcomes in shed for o in outcomes]
    # Newest first within a lane; the background lane empties before any Silver request goes.
    assert statuses == [("shed", background[1]), ("shed", background[0]), ("shed", silver[3]),
                        ("shed", silver[2])]
    assert all("made room for GOLD" in o.reason for outcomes in shed for o in outcomes)
    assert queues.lane_sizes() == {"gold": 4, "silver": 2, "bronze": 0}
    # Gold's own lane is full: the only way Gold is refused, with an explicit error.
    (overloaded,) = queues.push(req(Tier.GOLD), now=0.0)
    assert overloaded.status == "overloaded" and "GOLD queue full" in overloaded.reason


def test_silver_and_background_are_shed_when_nothing_lower_is_queued():
    queues = RequestQueues(small_config())
    for _ in range(4):
        queues.push(req(Tier.GOLD), now=0.0)
    for _ in range(2):
        queues.push(req(Tier.SILVER), now=0.0)
    silver = req(Tier.SILVER)
    (outcome,) = queues.push(silver, now=0.0)
    assert (outcome.request, outcome.status) == (silver, "shed")
    assert "no lower-tier work" in outcome.reason
    (outcome,) = queues.push(req(Tier.GOLD, "summary"), now=0.0)
    assert outcome.status == "shed"


def test_full_silver_lane_sheds_the_new_silver_request():
    queues = RequestQueues(small_config(max_queued=100))
    for _ in range(4):
        queues.push(req(Tier.SILVER), now=0.0)
    (outcome,) = queues.push(req(Tier.SILVER), now=0.0)
    assert outcome.status == "shed" and "SILVER queue full" in outcome.reason


def test_config_keeps_room_for_gold():
    with pytest.raises(ValueError, match="max_queued"):
        SchedulerConfig(gold_queue_max=10, max_queued=5)


operations = st.lists(st.tuples(st.sampled_from(["gold", "silver", "warm", "batch"]),
                                st.integers(1, 3000), st.floats(0.0, 0.05)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=operations)
def test_every_request_is_batched_or_answered_exactly_once(ops):
    """Conservation under random load: nothing vanishes silently, and Gold is refused only when its own
    lane is full."""
    config = SchedulerConfig(gold_queue_max=8, silver_queue_max=8, bronze_queue_max=8, max_queued=12,
                             batch_max_requests=5, batch_max_tokens=6000)
    queues = RequestQueues(config)
    now, pushed, settled = 0.0, {}, {}
    for op, tokens, dt in ops:
        now += dt
        if op == "batch":
            batch = queues.next_batch(now)
            assert len(batch.requests) <= 5 and batch.tokens <= 6000
            lanes = [r.lane for r in batch.requests]
            assert lanes == sorted(lanes)  # Gold first
            settled.update({r.request_id: "batched" for r in batch.requests})
            settled.update({o.request.request_id: o.status for o in batch.dropped})
            continue
        tier, kind = {"gold": (Tier.GOLD, "talk"), "silver": (Tier.SILVER, "talk"),
                      "warm": (Tier.GOLD, "warm")}[op]
        r = req(tier, kind, tokens)
        gold_lane_full = queues.lane_sizes()["gold"] >= config.gold_queue_max
        pushed[r.request_id] = r
        for outcome in queues.push(r, now):
            assert outcome.status in OUTCOME_STATUSES and outcome.reason
            assert outcome.request.request_id not in settled
            settled[outcome.request.request_id] = outcome.status
            if outcome.request.lane == Tier.GOLD and outcome.status != "expired":
                assert outcome.status == "overloaded" and gold_lane_full
    for outcome in queues.drain("shutdown"):
        settled[outcome.request.request_id] = outcome.status
    assert settled.keys() == pushed.keys()


# ------------------------------------------------------------------------------------------ deadlines


def test_expired_requests_are_dropped_explicitly():
    queues = RequestQueues(SchedulerConfig())
    gold = req(Tier.GOLD)  # 150 ms
    silver = req(Tier.SILVER)  # 400 ms
    queues.push(gold, now=0.0)
    queues.push(silver, now=0.0)
    batch = queues.next_batch(now=0.2)
    assert batch.requests == [silver]
    (expired,) = batch.dropped
    assert expired.request is gold and expired.status == "expired"
    assert "200.0 ms after arrival" in expired.reason and "150 ms" in expired.reason
    assert queues.counters["expired"] == 1


def test_a_request_past_its_deadline_on_arrival_expires_at_once():
    queues = RequestQueues(SchedulerConfig())
    (outcome,) = queues.push(req(deadline=1.0), now=2.0)
    assert outcome.status == "expired" and len(queues) == 0


def test_cancel_and_drain():
    queues = RequestQueues(SchedulerConfig())
    a, b = req(), req(Tier.SILVER)
    queues.push(a, now=0.0)
    queues.push(b, now=0.0)
    assert queues.cancel(a.request_id) is a and queues.cancel(a.request_id) is None
    (outcome,) = queues.drain("scheduler stopping")
    assert (outcome.request, outcome.status, outcome.reason) == (b, "shed", "scheduler stopping")
    assert queues.wait_s(0.0) is None


# ------------------------------------------------------------------------------------------- packing


def test_packing_respects_budgets_and_strict_priority():
    queues = RequestQueues(SchedulerConfig(batch_max_tokens=1000, batch_max_requests=3))
    gold = [req(Tier.GOLD, tokens=400), req(Tier.GOLD, tokens=700)]
    silver = req(Tier.SILVER, tokens=50)
    for r in (*gold, silver):
        queues.push(r, now=0.0)
    first = queues.next_batch(now=0.01)
    assert first.requests == [gold[0]]  # the next Gold does not fit; Silver must not overtake it
    second = queues.next_batch(now=0.02)
    assert second.requests == [gold[1], silver]
    many = [req(Tier.SILVER, tokens=10) for _ in range(5)]
    for r in many:
        queues.push(r, now=0.03)
    assert queues.next_batch(now=0.04).requests == many[:3]


# -------------------------------------------------------------------------------------------- window


def test_window_opens_with_the_first_request_and_closes_early_when_needed():
    config = SchedulerConfig(batch_max_requests=4)
    queues = RequestQueues(config)
    assert queues.wait_s(0.0) is None
    queues.push(req(Tier.SILVER), now=1.0)
    assert queues.window_ms == pytest.approx(config.batch_window_min_ms)  # idle: narrowest
    assert queues.wait_s(1.0) == pytest.approx(0.005)
    assert queues.wait_s(1.003) == pytest.approx(0.002)
    assert queues.wait_s(1.010) == 0.0
    for _ in range(3):
        queues.push(req(Tier.SILVER), now=1.001)
    assert queues.wait_s(1.001) == 0.0  # a full batch is waiting


def test_window_closes_before_a_deadline():
    queues = RequestQueues(SchedulerConfig(batch_deadline_guard_ms=10.0))
    queues.push(req(deadline=1.012), now=1.0)
    assert queues.wait_s(1.0) == pytest.approx(0.002)


def test_window_widens_under_load_and_narrows_when_idle():
    config = SchedulerConfig(batch_max_requests=8, batch_window_min_ms=5.0, batch_window_max_ms=15.0)
    queues = RequestQueues(config)
    now = 0.0
    for _ in range(30):  # full batches back to back
        for _ in range(8):
            queues.push(req(Tier.GOLD, tokens=10), now)
        now += 0.005
        queues.next_batch(now)
    assert queues.window_ms > 14.9
    for _ in range(30):  # single requests, back to back: small batches
        queues.push(req(Tier.GOLD, tokens=10), now)
        now += 0.005
        queues.next_batch(now)
    assert 5.0 <= queues.window_ms < 6.5
    for _ in range(30):
        for _ in range(8):
            queues.push(req(Tier.GOLD, tokens=10), now)
        now += 0.015
        queues.next_batch(now)
    assert queues.window_ms > 14.9
    queues.push(req(Tier.GOLD, tokens=10), now + 1.0)  # a request after a second of idle
    assert queues.window_ms == pytest.approx(5.0, abs=0.01)


def test_leftovers_keep_the_window_of_the_oldest():
    queues = RequestQueues(SchedulerConfig(batch_max_requests=2))
    for t in (1.000, 1.001, 1.002):
        queues.push(req(Tier.SILVER), now=t)
    assert len(queues.next_batch(now=1.003).requests) == 2
    # The leftover arrived at 1.002: its window closes one window after that, not after this batch.
    assert queues.wait_s(1.003) == pytest.approx(1.002 + queues.window_ms / 1000 - 1.003)
