"""The region simulation (tier_scheduler/region.py, what `make demo` and bench.region run), small and short:
a few dozen NPCs and 2 players for a few seconds through the real npc-worker subprocess (the tiny Qwen2
fixture with fixture adapters under the region's adapter names) and memory on the real Redis (this test's
own key prefix), with the scheduler in process (SchedulerServer behind AsyncGameClient: its counters show
that Bronze talks never reach the worker) and as the `npc-scheduler serve` subprocess that `make demo` runs
(AsyncRemoteGameClient; its settings passed with --config, whose refusals are checked too). No archiver
here (tests/test_e2e_talk.py covers it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memory.config import MemoryConfig
from tier_scheduler.config import SchedulerConfig, Tier
from tier_scheduler.region import (
    REGION_ADAPTERS,
    REPO,
    LocalStack,
    RegionConfig,
    demo_scheduler_config,
    format_report,
    plot_latency,
    run_region,
)
from tier_scheduler.server import ServerConfig
from tier_scheduler.service import configs_from_mapping

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
    """The scheduler in process: a spy on its WorkerClient sees every batch and the NPC's tier."""
    submitted = []  # (request id, the NPC's tier when the batch left)

    async def go():
        memory_config = MemoryConfig(key_prefix=prefix, cold_restore=False)
        # Shorter Gold replies than the demo's 160 tokens: the test waits for the last one to end.
        scheduler_config = dataclasses.replace(demo_scheduler_config(), gold_talk_max_tokens=48)
        async with LocalStack(qwen2_dir, region_adapters, memory_config, scheduler_config=scheduler_config,
                              scheduler="inprocess") as stack:
            real_submit = stack.worker.submit

            async def spy(items, **kwargs):
                for item in items:
                    npc = next(n for n in stack.server._actors if item.request_id.endswith(n))
                    submitted.append((item.request_id, stack.server.actor(npc).tier))
                return await real_submit(items, **kwargs)

            stack.worker.submit = spy
            report = await run_region(stack.client, CONFIG, count_tokens=stack.count_tokens)
            return report, stack.client.stats()["npcs"], dict(stack.server.counters)

    report, left, stack_counters = asyncio.run(asyncio.wait_for(go(), 90))
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

    # Zombies of a horde acted as one: one worker request for the leader, an action for every member.
    horde_acts = sum(n for c, n in report.requests.items() if c.endswith(".horde_act"))
    assert horde_acts > 0 and report.horde_members >= 3 * horde_acts  # a horde has 3 zombies or more
    assert summary["horde_acts"] == horde_acts and stack_counters["horde_acts"] == horde_acts

    png = plot_latency(report, tmp_path / "region-latency.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


PROCESS_NPCS = 40


def test_region_through_the_scheduler_subprocess(qwen2_dir, region_adapters, prefix):
    """`make demo`'s layout: npc-scheduler serve between the game (AsyncRemoteGameClient) and the worker,
    its SchedulerConfig / ServerConfig given as a --config file; it exits 0 on SIGTERM at the end."""
    config = dataclasses.replace(CONFIG, npcs=PROCESS_NPCS, duration_s=2.5, seed=1)
    scheduler_config = dataclasses.replace(demo_scheduler_config(), gold_talk_max_tokens=48)
    server_config = ServerConfig(talk_temperature=0.7, horde_ground_axes=(0, 2))

    async def go():
        memory_config = MemoryConfig(key_prefix=prefix, cold_restore=False)
        async with LocalStack(qwen2_dir, region_adapters, memory_config, scheduler_config=scheduler_config,
                              server_config=server_config) as stack:
            assert stack.scheduler_ready.startswith("npc-scheduler ready ipc://")
            assert all(name in stack.scheduler_ready for name in REGION_ADAPTERS)  # resident=
            report = await run_region(stack.client, config, count_tokens=stack.count_tokens)
            left = (await stack.client.stats())["npcs"]
        return report, left, stack

    report, left, stack = asyncio.run(asyncio.wait_for(go(), 90))
    assert report.total_errors() == 0, format_report(report)
    assert stack.scheduler_exit == 0  # SIGTERM -> drain -> exit 0
    assert not hasattr(stack, "server")  # no SchedulerServer in this process

    assert sum(report.tier_counts.values()) == PROCESS_NPCS
    assert sum(report.server["tiers"].values()) == PROCESS_NPCS and report.server["npcs"] == PROCESS_NPCS
    assert report.timeline and all(sum(row[1:]) == PROCESS_NPCS for row in report.timeline)
    assert left == 0  # the region despawned its NPCs

    latencies = report.latencies()
    assert set(latencies) == set(report.requests) and report.requests["gold.talk"] > 0
    assert sum(n for c, n in report.requests.items() if c.endswith(".act")) > 0
    for category, count in report.requests.items():
        row = latencies[category]
        assert row["n"] == count and 0 <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], (category, row)
    assert report.tokens > 0 and report.server["worker_errors"] == 0
    talks = sum(n for category, n in report.requests.items() if category.endswith(".talk"))
    assert report.server["service"]["talk"] == talks  # the scheduler process's own counters


def test_scheduler_settings_round_trip_through_the_config_file():
    scheduler_config = SchedulerConfig(gold_act_max_tokens=64, gold_enter_m=20.0, batch_window_max_ms=12)
    server_config = ServerConfig(talk_chain=False, default_position=(1.0, 0.0, 2.5), horde_ground_axes=(0, 2))
    stack = LocalStack(".", ".", MemoryConfig(key_prefix="npc-test:x:"), scheduler_config=scheduler_config,
                       server_config=server_config)
    settings = json.loads(json.dumps(stack.scheduler_settings()))  # what the --config file holds
    assert settings == {"gold_act_max_tokens": 64, "gold_enter_m": 20.0, "batch_window_max_ms": 12,
                        "talk_chain": False, "default_position": [1.0, 0.0, 2.5], "horde_ground_axes": [0, 2]}
    assert configs_from_mapping(settings) == (scheduler_config, server_config)
    assert configs_from_mapping({}) == (SchedulerConfig(), ServerConfig())
    with pytest.raises(ValueError, match="scheduler='inprocess'"):  # the subprocess takes 2 memory fields
        LocalStack(".", ".", MemoryConfig(key_prefix="npc-test:x:", hot_max_entries=10))


@pytest.mark.parametrize("settings, named", [
    ({"gold_act_max_tokens": 64, "gold_act_max_token": 64}, "'gold_act_max_token' (did you mean "
                                                            "'gold_act_max_tokens'?)"),
    ({"gold_cap": 12.5}, "key 'gold_cap' must be an integer, got 12.5"),
    ({"talk_chain": "yes"}, "key 'talk_chain' must be true or false"),
    ({"silver_turn_window_min": 9}, "SchedulerConfig.silver_turn_window_min must be <= "),
    ({"top_p": 0}, "ServerConfig.top_p must be in (0, 1]"),
    (["gold_cap", 3], "must be a JSON object"),
])
def test_scheduler_refuses_a_bad_config_file_and_names_the_key(tmp_path, settings, named):
    """Before it loads a model or connects to anything (neither exists here): one line, exit code 2."""
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps(settings))
    cmd = [sys.executable, "-m", "tier_scheduler.service", "serve", "--worker", f"ipc://{tmp_path}/none.sock",
           "--endpoint", f"ipc://{tmp_path}/sched.sock", "--model", str(tmp_path / "no-model"),
           "--config", str(path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith(f"npc-scheduler: cannot start: --config {path}: ")
    assert named in done.stderr and done.stdout == ""
