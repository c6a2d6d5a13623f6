"""The region simulation (tier_scheduler/region.py, what `make demo` and bench.region run), small and short:
60 NPCs and 2 players for a few seconds through the real npc-worker subprocess (the tiny Qwen2 fixture with
fixture adapters under the region's adapter names), SchedulerServer behind AsyncGameClient, and MemoryStore
on the real Redis (this test's own key prefix). No archiver here (tests/test_e2e_talk.py covers it).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from memory.config import MemoryConfig
from tier_scheduler.config import Tier
from tier_scheduler.region import (
    REGION_ADAPTERS,
    LocalStack,
    RegionConfig,
    demo_scheduler_config,
    format_report,
    plot_latency,
    run_region,
)

FIXTURE_OF = {"dialogue_style": "all_r8", "action_policy": "mlp_r16", "emotional_response": "attn_r4",
              "nosferatu": "pattern_r8"}
NPCS = 60
CONFIG = RegionConfig(npcs=NPCS, players=2, size_m=200.0, lairs=4, duration_s=3.0, gold_talk_rate=0.5,
                      silver_talk_rate=0.3, bronze_talk_rate=0.3, gold_act_rate=0.5, silver_act_rate=0.3,
                      gold_event_rate=0.2, max_inflight=16, drain_timeout_s=15.0, request_timeout_s=20.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def region_adapters(adapters, tmp_path_factory):
    folder = tmp_path_factory.mktemp("region-adapters")
    for name in REGION_ADAPTERS:
        fixture = adapters[FIXTURE_OF[name.rsplit(".", 1)[-1]]]
        (folder / name).symlink_to(Path(fixture), target_is_directory=True)
    return folder


def test_region_runs_clean_through_the_real_worker(qwen2_dir, region_adapters, prefix, tmp_path):
    submitted = []  # (request id, the NPC's tier when the batch left)

    async def go():
        memory_config = MemoryConfig(key_prefix=prefix, cold_restore=False)
        # Shorter Gold replies than the demo's 160 tokens: the test waits for the last one to end.
        scheduler_config = dataclasses.replace(demo_scheduler_config(), gold_talk_max_tokens=48)
        async with LocalStack(qwen2_dir, region_adapters, memory_config,
                              scheduler_config=scheduler_config) as stack:
            real_submit = stack.worker.submit

            async def spy(items, **kwargs):
                for item in items:
                    npc = next(n for n in stack.server._actors if item.request_id.endswith(n))
                    submitted.append((item.request_id, stack.server.actor(npc).tier))
                return await real_submit(items, **kwargs)

            stack.worker.submit = spy
            report = await run_region(stack.client, CONFIG, count_tokens=stack.count_tokens)
            return report, stack.client.stats()["npcs"]

    report, left = asyncio.run(asyncio.wait_for(go(), 90))
    summary = report.summary()
    assert report.total_errors() == 0, format_report(report)

    # Every tier and type got traffic, and every request that ended has its latency.
    for category in ("gold.talk", "silver.talk", "bronze.talk", "gold.act", "silver.act"):
        assert report.requests[category] > 0, (category, dict(report.requests))
    latencies = report.latencies()
    assert set(latencies) == set(report.requests)
    for category, count in report.requests.items():
        row = latencies[category]
        assert row["n"] == count and 0 <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], (category, row)
    assert summary["gold_p95_ms"] is not None and summary["act_p95_ms"] is not None
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0

    # Tier counts cover every NPC, in the report and on the server (its stats at the end, before the
    # region despawned its NPCs).
    assert sum(report.tier_counts.values()) == NPCS
    assert sum(report.server["tiers"].values()) == NPCS and report.server["npcs"] == NPCS
    assert all(sum(row[1:]) == NPCS for row in report.timeline)
    assert left == 0

    # Bronze talks were barks: none reached the worker (a talk's tier is held while it replies).
    talks = [tier for request_id, tier in submitted if request_id.startswith("talk")]
    assert talks and Tier.BRONZE not in talks
    assert len(talks) <= report.requests["gold.talk"] + report.requests["silver.talk"]

    png = plot_latency(report, tmp_path / "region-latency.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
