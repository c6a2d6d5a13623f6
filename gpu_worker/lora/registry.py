"""Adapter registry in Redis: which LoRA adapters exist, how an NPC's stack resolves, which worker holds what.

Key layout (P is the registry's prefix, "npc:" by default):

| key | type | holds |
| --- | --- | --- |
| P adapter:<name> | hash | one AdapterRecord: its fields as strings, targets as a JSON list, "" for None |
| P adapters | set | every registered adapter name |
| P adapters:<archetype> | set | the names whose record has that archetype (index for `list`) |
| P profile:<npc_id> | hash | archetype, subfaction ("" for none) |
| P resident:<worker_id> | hash | adapter name -> "gpu" or "cpu"; expires unless the worker heartbeats |
| P workers | set | ids of workers that marked adapters resident (pruned lazily once their key expired) |

Adapter names: `<archetype>.<task>` (task adapter), `<archetype>.sub.<subfaction>[.<task>]` (subfaction
delta, for all tasks or one), `npc.<npc_id>[.<task>]` (NPC delta, for all tasks or one).

An NPC's stack for a task, base first: [archetype task adapter, subfaction delta, NPC delta]. A delta for
the task wins over the delta for all tasks; a missing delta is skipped; a missing NPC or task adapter is an
error.

The scripts read keys they compute (the archetype comes from the NPC profile), so they target one Redis
server, as the project runs; they are not cluster-safe as written.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import redis.asyncio as aioredis

ARCHETYPES = ("vampire", "werewolf", "zombie", "ghoul", "lich")
TASKS = ("personality", "dialogue_style", "action_policy", "emotional_response", "world_knowledge",
         "social_dynamics", "goal_prioritization")
KINDS = ("task", "subfaction", "npc")
TIERS = ("gpu", "cpu")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # npc ids and subfactions: no dots, they separate name parts
_WORKER_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 1 << 20


class UnknownNPC(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class UnknownAdapter(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def adapter_name(kind: str, archetype: str | None = None, task: str | None = None,
                 subfaction: str | None = None, npc_id: str | None = None) -> str:
    """The canonical name of an adapter, e.g. adapter_name("subfaction", "vampire", None, "nosferatu")."""
    suffix = f".{task}" if task else ""
    if kind == "task":
        return f"{archetype}.{task}"
    if kind == "subfaction":
        return f"{archetype}.sub.{subfaction}{suffix}"
    if kind == "npc":
        return f"npc.{npc_id}{suffix}"
    raise ValueError(f"kind: unknown {kind!r}; expected one of {KINDS}")


def parse_name(name: str, kind: str) -> dict:
    """The archetype, task, subfaction, npc_id that a name of `kind` spells (not an NPC delta's archetype)."""
    parts = name.split(".") if isinstance(name, str) else []
    fields: dict | None = None
    if kind == "task" and len(parts) == 2:
        fields = dict(archetype=parts[0], task=parts[1])
    elif kind == "subfaction" and len(parts) in (3, 4) and parts[1] == "sub":
        fields = dict(archetype=parts[0], subfaction=parts[2], task=parts[3] if len(parts) == 4 else None)
    elif kind == "npc" and len(parts) in (2, 3) and parts[0] == "npc":
        fields = dict(npc_id=parts[1], task=parts[2] if len(parts) == 3 else None)
    elif kind not in KINDS:
        raise ValueError(f"kind: unknown {kind!r}; expected one of {KINDS}")
    if fields is None:
        pattern = adapter_name(kind, "<archetype>", "<task>", "<subfaction>", "<npc_id>")
        raise ValueError(f"name: {name!r} is not a {kind} adapter name (expected {pattern})")
    return fields


@dataclass(frozen=True)
class AdapterRecord:
    """One registered PEFT LoRA adapter. `rank` is the largest rank of any module (r or its rank_pattern)."""

    name: str
    path: str
    rank: int
    targets: tuple[str, ...]
    version: int
    sha256: str  # hex digest of adapter_model.safetensors
    kind: str
    archetype: str  # an NPC delta's archetype is its NPC's
    task: str | None = None
    subfaction: str | None = None
    npc_id: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", str(self.path) if isinstance(self.path, Path) else self.path)
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        _check(self.kind in KINDS, "kind", f"unknown {self.kind!r}; expected one of {KINDS}")
        _check(self.archetype in ARCHETYPES, "archetype",
               f"unknown {self.archetype!r}; expected one of {ARCHETYPES}")
        _check(self.task is None or self.task in TASKS, "task",
               f"unknown {self.task!r}; expected one of {TASKS}")
        _check(self.kind != "task" or self.task is not None, "task", "a task adapter needs a task")
        self._check_ids()
        expected = adapter_name(self.kind, self.archetype, self.task, self.subfaction, self.npc_id)
        _check(self.name == expected, "name",
               f"{self.name!r} does not match its fields (expected {expected!r})")
        _check(isinstance(self.path, str) and self.path != "", "path", "must be a non-empty path")
        _check(_is_int(self.rank) and self.rank >= 1, "rank", f"must be an int >= 1, got {self.rank!r}")
        _check(_is_int(self.version) and self.version >= 1, "version",
               f"must be an int >= 1, got {self.version!r}")
        _check(isinstance(self.targets, tuple) and len(self.targets) > 0
               and all(isinstance(t, str) and t for t in self.targets),
               "targets", f"must be a non-empty tuple of module names, got {self.targets!r}")
        _check(isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256) is not None, "sha256",
               f"must be 64 lowercase hex digits, got {self.sha256!r}")

    def _check_ids(self) -> None:
        for field, wanted in (("subfaction", self.kind == "subfaction"), ("npc_id", self.kind == "npc")):
            value = getattr(self, field)
            if wanted:
                _check(isinstance(value, str) and _ID.fullmatch(value) is not None, field,
                       f"a {self.kind} adapter needs one of letters, digits, '_' or '-', got {value!r}")
            else:
                _check(value is None, field, f"must be None for a {self.kind} adapter, got {value!r}")

    @classmethod
    def from_peft_folder(cls, path: str | Path, name: str, kind: str, *, version: int = 1,
                         archetype: str | None = None, task: str | None = None, subfaction: str | None = None,
                         npc_id: str | None = None) -> AdapterRecord:
        """Reads a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into a record.

        Fields not given are taken from `name` (see parse_name); an NPC delta needs `archetype`.
        """
        folder = Path(path)
        fields = parse_name(name, kind)
        given = dict(archetype=archetype, task=task, subfaction=subfaction, npc_id=npc_id)
        fields.update({k: v for k, v in given.items() if v is not None})
        if fields.get("archetype") is None:
            raise ValueError(f"archetype: an NPC delta ({name!r}) needs its NPC's archetype")
        rank, targets = read_peft_config(folder)
        return cls(name=name, path=str(folder.resolve()), rank=rank, targets=targets, version=version,
                   sha256=sha256_file(folder / WEIGHTS_FILE), kind=kind, **fields)

    def to_hash(self) -> dict[str, str]:
        fields = asdict(self)
        fields["targets"] = json.dumps(list(self.targets))
        return {k: "" if v is None else str(v) for k, v in fields.items()}

    @classmethod
    def from_hash(cls, raw: dict) -> AdapterRecord:
        h = {_text(k): _text(v) for k, v in raw.items()}
        return cls(name=h["name"], path=h["path"], rank=int(h["rank"]),
                   targets=tuple(json.loads(h["targets"])), version=int(h["version"]), sha256=h["sha256"],
                   kind=h["kind"], archetype=h["archetype"],
                   task=h["task"] or None, subfaction=h["subfaction"] or None, npc_id=h["npc_id"] or None)


def read_peft_config(folder: Path) -> tuple[int, tuple[str, ...]]:
    """(max rank, sorted target modules) of a PEFT LoRA folder; ValueError on a missing or bad config."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config['peft_type']!r}, not 'LORA'")
    r, modules = config.get("r"), config.get("target_modules")
    if not _is_int(r) or not modules:
        raise ValueError(f"{config_path}: needs an int 'r' and 'target_modules', got r={r!r}, "
                         f"target_modules={modules!r}")
    # PEFT writes target_modules as a list (saved from a set: order is arbitrary) or one regex / "all-linear".
    targets = (modules,) if isinstance(modules, str) else tuple(sorted(modules))
    pattern_ranks = [v for v in (config.get("rank_pattern") or {}).values() if _is_int(v)]
    return max([r, *pattern_ranks]), targets


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (adapters of a 7B model run to hundreds of MB)."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (a PEFT adapter folder needs {WEIGHTS_FILE})")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# Registers a batch atomically: every record passes the version rules or none is written.
# ARGV: prefix, JSON [[name, version, sha256, archetype, [field, value, ...]], ...]
# Returns the conflicts: [[name, reason, stored version, stored sha256], ...]; empty when all were written.
_REGISTER_LUA = """
local p = ARGV[1]
local records = cjson.decode(ARGV[2])
local conflicts = {}
for _, r in ipairs(records) do
  local old = redis.call('HMGET', p .. 'adapter:' .. r[1], 'version', 'sha256')
  if old[1] then
    local stored = tonumber(old[1])
    if r[2] < stored then
      conflicts[#conflicts + 1] = {r[1], 'older', old[1], old[2]}
    elseif r[2] == stored and r[3] ~= old[2] then
      conflicts[#conflicts + 1] = {r[1], 'sha256', old[1], old[2]}
    end
  end
end
if #conflicts > 0 then return conflicts end
for _, r in ipairs(records) do
  local key = p .. 'adapter:' .. r[1]
  local old_archetype = redis.call('HGET', key, 'archetype')
  if old_archetype and old_archetype ~= r[4] then
    redis.call('SREM', p .. 'adapters:' .. old_archetype, r[1])
  end
  redis.call('HSET', key, unpack(r[5]))
  redis.call('SADD', p .. 'adapters', r[1])
  redis.call('SADD', p .. 'adapters:' .. r[4], r[1])
end
return conflicts
"""

# One round trip for a whole stack. A pipeline cannot do it: which task adapter and subfaction delta to read
# depends on the NPC profile, so a pipeline would first need a round trip to read the profile. The script
# also reads a consistent snapshot (scripts run atomically), never half of a concurrent re-registration.
# ARGV: prefix, npc_id, task. Returns {'ok', base, subfaction delta or false, npc delta or false} with each
# adapter a flat HGETALL list, {'no_npc'} or {'no_adapter', name}.
_RESOLVE_LUA = """
local p, npc, task = ARGV[1], ARGV[2], ARGV[3]
local profile = redis.call('HMGET', p .. 'profile:' .. npc, 'archetype', 'subfaction')
if not profile[1] then return {'no_npc'} end
local function get(name)
  local h = redis.call('HGETALL', p .. 'adapter:' .. name)
  if #h == 0 then return false end
  return h
end
local base_name = profile[1] .. '.' .. task
local base = get(base_name)
if not base then return {'no_adapter', base_name} end
local sub = false
if profile[2] and profile[2] ~= '' then
  local general = profile[1] .. '.sub.' .. profile[2]
  sub = get(general .. '.' .. task) or get(general)
end
local delta = get('npc.' .. npc .. '.' .. task) or get('npc.' .. npc)
return {'ok', base, sub, delta}
"""

# KEYS: resident hash, workers set. ARGV: ttl_ms, force ('1': set the TTL; '0': only when the key has
# none, since a heartbeat may have set a shorter one), worker id, name, tier, name, tier, ...
_MARK_RESIDENT_LUA = """
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] == '1' or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# ARGV: prefix, adapter name. Workers whose resident key expired (dead, or holding nothing) leave the set.
_WORKERS_WITH_LUA = """
local p, name = ARGV[1], ARGV[2]
local holders = {}
for _, w in ipairs(redis.call('SMEMBERS', p .. 'workers')) do
  local key = p .. 'resident:' .. w
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', p .. 'workers', w)
  elseif redis.call('HEXISTS', key, name) == 1 then
    holders[#holders + 1] = w
  end
end
return holders
"""


class AdapterRegistry:
    """Adapters, NPC profiles and worker residency in one Redis (asyncio client, bytes or str responses).

    Residency keys live `residency_ttl_s` after a worker's first mark unless `heartbeat` refreshes them, so a
    dead worker's adapters drop out of `workers_with` on their own.
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "npc:", residency_ttl_s: float = 30.0):
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix: must be a non-empty string, got {prefix!r}")
        self.client = client
        self.prefix = prefix
        self.residency_ttl_ms = _ttl_ms(residency_ttl_s)
        self._register = client.register_script(_REGISTER_LUA)
        self._resolve = client.register_script(_RESOLVE_LUA)
        self._mark_resident = client.register_script(_MARK_RESIDENT_LUA)
        self._workers_with = client.register_script(_WORKERS_WITH_LUA)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # ------------------------------------------------------------------------------------------ adapters

    async def register(self, record: AdapterRecord) -> None:
        """Stores `record`; a lower version than the stored one, or the same version with another sha256,
        raises ValueError. The same version and sha256 rewrites the record (e.g. a moved path)."""
        await self.register_many([record])

    async def register_many(self, records: Iterable[AdapterRecord]) -> None:
        """Registers all `records` or, when any breaks the version rules, none of them."""
        records = builtins.list(records)
        names = [r.name for r in records]
        if len(set(names)) != len(names):
            raise ValueError(f"records: duplicate names in one batch: {sorted(names)}")
        payload = [[r.name, r.version, r.sha256, r.archetype, _flatten(r.to_hash())] for r in records]
        conflicts = await self._register(args=[self.prefix, json.dumps(payload)])
        if conflicts:
            by_name = {r.name: r for r in records}
            raise ValueError("version: " + "; ".join(_describe_conflict(by_name, c) for c in conflicts))

    async def get(self, name: str) -> AdapterRecord | None:
        raw = await self.client.hgetall(self._key("adapter", name))
        return AdapterRecord.from_hash(raw) if raw else None

    async def unregister(self, name: str) -> bool:
        """Removes an adapter; False when it was not registered. Workers drop their own residency entries."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key("adapter", name))
            pipe.srem(self._key("adapters"), name)
            for archetype in ARCHETYPES:
                pipe.srem(self._key("adapters", archetype), name)
            deleted, *_ = await pipe.execute()
        return deleted > 0

    async def list(self, archetype: str | None = None,
                   kind: str | None = None) -> builtins.list[AdapterRecord]:
        """Registered adapters, sorted by name, optionally of one archetype and/or kind (off the hot path)."""
        if archetype is not None and archetype not in ARCHETYPES:
            raise ValueError(f"archetype: unknown {archetype!r}; expected one of {ARCHETYPES}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind: unknown {kind!r}; expected one of {KINDS}")
        index = self._key("adapters", archetype) if archetype else self._key("adapters")
        names = sorted(_text(n) for n in await self.client.smembers(index))
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._key("adapter", name))
            hashes = await pipe.execute()
        records = [AdapterRecord.from_hash(h) for h in hashes if h]  # empty: unregistered meanwhile
        return [r for r in records if kind is None or r.kind == kind]

    async def register_archetype_folder(self, root: str | Path, archetype: str,
                                        version: int = 1) -> builtins.list[AdapterRecord]:
        """Registers the 7 task adapters of `archetype` from `root/<archetype>.<task>/` PEFT folders, all or
        none: a missing folder, a bad folder or a version conflict registers nothing."""
        if archetype not in ARCHETYPES:
            raise ValueError(f"archetype: unknown {archetype!r}; expected one of {ARCHETYPES}")
        root = Path(root)
        folders = {task: root / f"{archetype}.{task}" for task in TASKS}
        missing = [task for task, folder in folders.items() if not folder.is_dir()]
        if missing:
            raise ValueError(f"{root}: archetype {archetype!r} is missing task adapter folders for "
                             f"{', '.join(missing)} (expected a PEFT folder {archetype}.<task>/ per task)")
        # Hashing hundreds of MB would stall the event loop: read the folders in a thread.
        records = await asyncio.to_thread(
            lambda: [AdapterRecord.from_peft_folder(folder, f"{archetype}.{task}", "task", version=version)
                     for task, folder in folders.items()])
        await self.register_many(records)
        return records

    # -------------------------------------------------------------------------------------- NPC stacks

    async def set_npc(self, npc_id: str, archetype: str, subfaction: str | None = None) -> None:
        _check(isinstance(npc_id, str) and _ID.fullmatch(npc_id) is not None, "npc_id",
               f"needs letters, digits, '_' or '-', got {npc_id!r}")
        _check(archetype in ARCHETYPES, "archetype", f"unknown {archetype!r}; expected one of {ARCHETYPES}")
        _check(subfaction is None or (isinstance(subfaction, str) and _ID.fullmatch(subfaction) is not None),
               "subfaction", f"needs letters, digits, '_' or '-', got {subfaction!r}")
        await self.client.hset(self._key("profile", npc_id),
                               mapping={"archetype": archetype, "subfaction": subfaction or ""})

    async def resolve_stack(self, npc_id: str, task: str) -> builtins.list[AdapterRecord]:
        """[task adapter, subfaction delta, NPC delta] of the NPC (missing deltas skipped) in ONE round trip:
        one EVALSHA of a Lua script (a server that lost its script cache costs a SCRIPT LOAD more)."""
        _check(task in TASKS, "task", f"unknown {task!r}; expected one of {TASKS}")
        reply = await self._resolve(args=[self.prefix, npc_id, task])
        status = _text(reply[0])
        if status == "no_npc":
            raise UnknownNPC(f"NPC {npc_id!r} has no profile under {self.prefix!r}: call set_npc first")
        if status == "no_adapter":
            raise UnknownAdapter(f"NPC {npc_id!r} needs task adapter {_text(reply[1])!r}, "
                                 "which is not registered")
        stack = [AdapterRecord.from_hash(_pairs(h)) for h in reply[1:] if h]
        for delta in stack[1:]:
            if delta.archetype != stack[0].archetype:
                raise ValueError(f"archetype: delta {delta.name!r} was made for a {delta.archetype}, but NPC "
                                 f"{npc_id!r} is a {stack[0].archetype}")
        return stack

    # --------------------------------------------------------------------------------------- residency

    async def mark_resident(self, worker_id: str, names: Iterable[str], tier: str = "gpu",
                            ttl_s: float | None = None) -> None:
        """Records that `worker_id` holds `names` in `tier`. The worker's entry expires after `ttl_s` when
        given; else a new entry gets the registry's residency TTL and an existing one keeps its own."""
        _check_worker(worker_id)
        _check(tier in TIERS, "tier", f"unknown {tier!r}; expected one of {TIERS}")
        names = _check_names(names)
        if not names:
            return
        ttl_ms = self.residency_ttl_ms if ttl_s is None else _ttl_ms(ttl_s)
        pairs = [x for name in names for x in (name, tier)]
        await self._mark_resident(keys=[self._key("resident", worker_id), self._key("workers")],
                                  args=[ttl_ms, "0" if ttl_s is None else "1", worker_id, *pairs])

    async def mark_evicted(self, worker_id: str, names: Iterable[str]) -> None:
        _check_worker(worker_id)
        names = _check_names(names)
        if names:
            await self.client.hdel(self._key("resident", worker_id), *names)

    async def heartbeat(self, worker_id: str, ttl_s: float | None = None) -> bool:
        """Keeps the worker's residency alive `ttl_s` more (default: the registry's TTL). False when it had
        already expired (or was empty): the worker must mark its adapters resident again."""
        _check_worker(worker_id)
        ttl_ms = self.residency_ttl_ms if ttl_s is None else _ttl_ms(ttl_s)
        return bool(await self.client.pexpire(self._key("resident", worker_id), ttl_ms))

    async def resident(self, worker_id: str) -> dict[str, str]:
        _check_worker(worker_id)
        raw = await self.client.hgetall(self._key("resident", worker_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def workers_with(self, name: str) -> builtins.list[str]:
        """Live workers holding `name` (either tier), sorted."""
        return sorted(_text(w) for w in await self._workers_with(args=[self.prefix, name]))


# ------------------------------------------------------------------------------------------------ helpers


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_worker(worker_id: str) -> None:
    _check(isinstance(worker_id, str) and _WORKER_ID.fullmatch(worker_id) is not None, "worker_id",
           f"needs letters, digits or '_.:@-' (at most 128), got {worker_id!r}")


def _check_names(names: Iterable[str]) -> list[str]:
    if isinstance(names, str):
        raise ValueError(f"names: expected an iterable of adapter names, got the string {names!r}")
    names = list(names)
    _check(all(isinstance(n, str) and n for n in names), "names", f"must be non-empty strings, got {names!r}")
    return names


def _ttl_ms(ttl_s: float) -> int:
    _check(isinstance(ttl_s, int | float) and ttl_s > 0, "ttl_s", f"must be > 0 seconds, got {ttl_s!r}")
    return max(1, round(ttl_s * 1000))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _flatten(mapping: dict[str, str]) -> list[str]:
    return [x for item in mapping.items() for x in item]


def _pairs(flat: list) -> dict:
    return dict(zip(flat[::2], flat[1::2]))


def _describe_conflict(by_name: dict[str, AdapterRecord], conflict: list) -> str:
    name, reason, stored_version, stored_sha = (_text(x) for x in conflict)
    new = by_name[name]
    if reason == "older":
        return f"{name!r} version {new.version} is lower than the registered version {stored_version}"
    return (f"{name!r} version {new.version} is already registered with sha256 {stored_sha[:12]}..., "
            f"not {new.sha256[:12]}...: bump the version")
