"""gpu_worker.lora.registry against the real Redis at REDIS_URL, each test under a prefix of its own."""

import asyncio
import hashlib
import json
import shutil
import time

import pytest
import redis
import redis.asyncio as aioredis

from gpu_worker.lora.registry import (
    ARCHETYPES,
    TASKS,
    AdapterRecord,
    AdapterRegistry,
    UnknownAdapter,
    UnknownNPC,
    parse_name,
)
from gpu_worker.testing import ALL_LINEAR, build_adapter, build_model
from memory.services import redis_url


def run(prefix, body, **client_kwargs):
    """Runs `await body(registry)` on a fresh asyncio client (pytest-asyncio is not used here)."""

    async def main():
        client = aioredis.Redis.from_url(redis_url(), **client_kwargs)
        try:
            return await body(AdapterRegistry(client, prefix))
        finally:
            await client.aclose()

    return asyncio.run(main())


def rec(name, kind="task", *, version=1, sha=None, rank=4, archetype=None, path="/adapters/x"):
    fields = parse_name(name, kind)
    if archetype is not None:
        fields["archetype"] = archetype
    sha = sha or hashlib.sha256(f"{name}:{version}".encode()).hexdigest()
    return AdapterRecord(name=name, path=path, rank=rank, targets=("q_proj", "v_proj"), version=version,
                         sha256=sha, kind=kind, **fields)


@pytest.fixture(scope="module")
def peft_root(tmp_path_factory):
    """root/vampire.<task>/ for the 7 tasks, distinct weights; world_knowledge: rank_pattern down_proj 16."""
    tmp = tmp_path_factory.mktemp("registry")
    model = build_model(tmp / "m", family="qwen2")
    root = tmp / "adapters"
    for i, task in enumerate(TASKS):
        pattern = {"down_proj": 16} if task == "world_knowledge" else None
        build_adapter(model, root / f"vampire.{task}", r=4, seed=i, rank_pattern=pattern)
    return root


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("change, field", [
    (dict(archetype="mummy"), "archetype"),
    (dict(task="singing", name="vampire.singing"), "task"),
    (dict(rank=0), "rank"),
    (dict(rank=True), "rank"),
    (dict(targets=()), "targets"),
    (dict(targets=("q_proj", "")), "targets"),
    (dict(version=0), "version"),
    (dict(sha256="abc"), "sha256"),
    (dict(sha256="A" * 64), "sha256"),
    (dict(kind="lora"), "kind"),
    (dict(name="vampire.personality"), "name"),
    (dict(subfaction="nosferatu"), "subfaction"),
    (dict(path=""), "path"),
])
def test_record_validation_names_the_field(change, field):
    good = rec("vampire.dialogue_style")
    fields = {**good.__dict__, **change}
    with pytest.raises(ValueError, match=f"^{field}:"):
        AdapterRecord(**fields)


def test_record_names_of_each_kind():
    sub = rec("vampire.sub.nosferatu", "subfaction")
    assert (sub.archetype, sub.subfaction, sub.task) == ("vampire", "nosferatu", None)
    sub_task = rec("vampire.sub.nosferatu.personality", "subfaction")
    assert sub_task.task == "personality"
    npc = rec("npc.v_17.action_policy", "npc", archetype="vampire")
    assert (npc.npc_id, npc.task, npc.archetype) == ("v_17", "action_policy", "vampire")
    with pytest.raises(ValueError, match="^name:"):
        parse_name("npc.a.b.c", "npc")
    with pytest.raises(ValueError, match="^npc_id:"):
        AdapterRecord(**{**npc.__dict__, "name": "npc.a b.action_policy", "npc_id": "a b"})


def test_from_peft_folder_reads_config_and_hashes_weights(peft_root):
    folder = peft_root / "vampire.dialogue_style"
    record = AdapterRecord.from_peft_folder(folder, "vampire.dialogue_style", "task", version=3)
    assert record.rank == 4
    assert record.targets == tuple(sorted(ALL_LINEAR))
    assert record.sha256 == sha256_of(folder / "adapter_model.safetensors")
    assert (record.kind, record.archetype, record.task) == ("task", "vampire", "dialogue_style")
    assert record.version == 3
    assert record.path == str(folder.resolve())
    name = "vampire.world_knowledge"
    patterned = AdapterRecord.from_peft_folder(peft_root / name, name, "task")
    assert patterned.rank == 16  # the largest module rank, not r
    npc = AdapterRecord.from_peft_folder(folder, "npc.v1", "npc", archetype="vampire")
    assert (npc.npc_id, npc.task, npc.archetype) == ("v1", None, "vampire")


def test_from_peft_folder_errors(peft_root, tmp_path):
    with pytest.raises(ValueError, match="needs its NPC's archetype"):
        AdapterRecord.from_peft_folder(peft_root / "vampire.personality", "npc.v1", "npc")
    with pytest.raises(ValueError, match="adapter_config.json: missing"):
        AdapterRecord.from_peft_folder(tmp_path / "nowhere", "vampire.personality", "task")

    broken = tmp_path / "broken"
    shutil.copytree(peft_root / "vampire.personality", broken)
    config = broken / "adapter_config.json"
    good_config = config.read_text()
    config.write_text(good_config[: len(good_config) // 2])
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        AdapterRecord.from_peft_folder(broken, "vampire.personality", "task")
    config.write_text(json.dumps({**json.loads(good_config), "r": "four"}))
    with pytest.raises(ValueError, match="needs an int 'r'"):
        AdapterRecord.from_peft_folder(broken, "vampire.personality", "task")
    config.write_text(json.dumps({**json.loads(good_config), "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="not 'LORA'"):
        AdapterRecord.from_peft_folder(broken, "vampire.personality", "task")
    config.write_text(good_config)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors: missing"):
        AdapterRecord.from_peft_folder(broken, "vampire.personality", "task")


# ------------------------------------------------------------------------------------------ register


def test_register_get_list_unregister_round_trip(prefix):
    records = [rec("vampire.personality"), rec("vampire.dialogue_style"), rec("werewolf.personality"),
               rec("vampire.sub.nosferatu", "subfaction"), rec("npc.v1", "npc", archetype="vampire")]

    async def body(reg):
        for r in records:
            await reg.register(r)
        assert await reg.get("vampire.personality") == records[0]
        assert await reg.get("npc.v1") == records[4]
        assert await reg.get("lich.personality") is None
        assert await reg.list() == sorted(records, key=lambda r: r.name)
        assert [r.name for r in await reg.list(archetype="vampire")] == [
            "npc.v1", "vampire.dialogue_style", "vampire.personality", "vampire.sub.nosferatu"]
        assert [r.name for r in await reg.list(archetype="vampire", kind="task")] == [
            "vampire.dialogue_style", "vampire.personality"]
        assert [r.name for r in await reg.list(kind="npc")] == ["npc.v1"]
        assert await reg.unregister("vampire.personality") is True
        assert await reg.unregister("vampire.personality") is False
        assert await reg.get("vampire.personality") is None
        assert "vampire.personality" not in [r.name for r in await reg.list(archetype="vampire")]
        with pytest.raises(ValueError, match="^archetype:"):
            await reg.list(archetype="mummy")

    run(prefix, body)


def test_version_rules(prefix):
    v2 = rec("lich.world_knowledge", version=2)

    async def body(reg):
        await reg.register(v2)
        with pytest.raises(ValueError, match="version 1 is lower than the registered version 2"):
            await reg.register(rec("lich.world_knowledge", version=1))
        with pytest.raises(ValueError, match="already registered with sha256"):
            await reg.register(rec("lich.world_knowledge", version=2, sha="f" * 64))
        assert await reg.get("lich.world_knowledge") == v2
        moved = AdapterRecord(**{**v2.__dict__, "path": "/elsewhere"})  # same version and weights: rewritten
        await reg.register(moved)
        assert (await reg.get("lich.world_knowledge")).path == "/elsewhere"
        v3 = rec("lich.world_knowledge", version=3)
        await reg.register(v3)
        assert await reg.get("lich.world_knowledge") == v3

    run(prefix, body)


def test_register_many_is_all_or_nothing(prefix):
    async def body(reg):
        await reg.register(rec("zombie.personality", version=5))
        with pytest.raises(ValueError, match="zombie.personality"):
            await reg.register_many([rec("zombie.action_policy"), rec("zombie.personality", version=4)])
        assert await reg.get("zombie.action_policy") is None
        with pytest.raises(ValueError, match="duplicate"):
            await reg.register_many([rec("zombie.action_policy"), rec("zombie.action_policy")])

    run(prefix, body)


def test_npc_delta_changing_archetype_moves_index(prefix):
    async def body(reg):
        await reg.register(rec("npc.x", "npc", archetype="ghoul"))
        await reg.register(rec("npc.x", "npc", archetype="lich", version=2))
        assert await reg.list(archetype="ghoul") == []
        assert [r.name for r in await reg.list(archetype="lich")] == ["npc.x"]

    run(prefix, body)


def test_register_archetype_folder(prefix, peft_root, tmp_path):
    partial = tmp_path / "partial"
    for task in TASKS:
        if task != "social_dynamics":
            shutil.copytree(peft_root / f"vampire.{task}", partial / f"vampire.{task}")

    async def body(reg):
        records = await reg.register_archetype_folder(peft_root, "vampire", version=2)
        assert [r.task for r in records] == list(TASKS)
        stored = await reg.list(archetype="vampire", kind="task")
        assert sorted(stored, key=lambda r: r.task) == sorted(records, key=lambda r: r.task)
        for r in stored:
            assert r.version == 2
            assert r.sha256 == sha256_of(peft_root / r.name / "adapter_model.safetensors")
        assert len({r.sha256 for r in stored}) == 7
        missing_one = r"'vampire' is missing task adapter folders for social_dynamics \("
        with pytest.raises(ValueError, match=missing_one):
            await reg.register_archetype_folder(partial, "vampire", version=3)
        assert {r.version for r in await reg.list(archetype="vampire")} == {2}  # nothing half-registered

    run(prefix, body)


def test_register_archetype_folder_lists_every_missing_task(prefix, tmp_path):
    async def body(reg):
        with pytest.raises(ValueError) as info:
            await reg.register_archetype_folder(tmp_path, "ghoul")
        for task in TASKS:
            assert task in str(info.value)
        assert await reg.list() == []

    run(prefix, body)


# ------------------------------------------------------------------------------------------- stacks


async def _populate(reg):
    for archetype in ARCHETYPES:
        if archetype != "lich":  # lich has no task adapters: resolving a lich NPC must fail
            await reg.register_many([rec(f"{archetype}.{task}") for task in TASKS])
    await reg.register(rec("vampire.sub.nosferatu", "subfaction"))
    await reg.register(rec("vampire.sub.nosferatu.dialogue_style", "subfaction"))
    await reg.register(rec("npc.drac", "npc", archetype="vampire"))
    await reg.register(rec("npc.drac.action_policy", "npc", archetype="vampire"))
    await reg.set_npc("drac", "vampire", subfaction="nosferatu")
    await reg.set_npc("plain", "werewolf")
    await reg.set_npc("lonely", "vampire", subfaction="ventrue")  # subfaction without a delta
    await reg.set_npc("kel", "lich")


def names(stack):
    return [r.name for r in stack]


def test_resolve_stack_order_and_specific_deltas(prefix):
    async def body(reg):
        await _populate(reg)
        assert names(await reg.resolve_stack("drac", "personality")) == [
            "vampire.personality", "vampire.sub.nosferatu", "npc.drac"]
        assert names(await reg.resolve_stack("drac", "dialogue_style")) == [
            "vampire.dialogue_style", "vampire.sub.nosferatu.dialogue_style", "npc.drac"]
        assert names(await reg.resolve_stack("drac", "action_policy")) == [
            "vampire.action_policy", "vampire.sub.nosferatu", "npc.drac.action_policy"]
        stack = await reg.resolve_stack("drac", "personality")
        assert stack[0] == await reg.get("vampire.personality")
        assert [r.kind for r in stack] == ["task", "subfaction", "npc"]

    run(prefix, body)


def test_resolve_stack_skips_missing_optional_deltas(prefix):
    async def body(reg):
        await _populate(reg)
        assert names(await reg.resolve_stack("plain", "social_dynamics")) == ["werewolf.social_dynamics"]
        assert names(await reg.resolve_stack("lonely", "personality")) == ["vampire.personality"]
        await reg.unregister("vampire.sub.nosferatu")
        assert names(await reg.resolve_stack("drac", "personality")) == ["vampire.personality", "npc.drac"]

    run(prefix, body)


def test_resolve_stack_errors(prefix):
    async def body(reg):
        await _populate(reg)
        with pytest.raises(UnknownNPC, match="'ghost' has no profile"):
            await reg.resolve_stack("ghost", "personality")
        with pytest.raises(UnknownAdapter, match="'lich.personality', which is not registered"):
            await reg.resolve_stack("kel", "personality")
        with pytest.raises(ValueError, match="^task:"):
            await reg.resolve_stack("drac", "singing")
        with pytest.raises(ValueError, match="^archetype:"):
            await reg.set_npc("x", "mummy")
        await reg.set_npc("drac", "werewolf")  # re-profiled: its vampire delta no longer fits
        with pytest.raises(ValueError, match="made for a vampire"):
            await reg.resolve_stack("drac", "personality")

    assert issubclass(UnknownNPC, KeyError) and issubclass(UnknownAdapter, KeyError)
    run(prefix, body)


def test_resolve_stack_is_one_round_trip(prefix):
    """Counts what crosses the socket: every write to Redis and every reply read back."""
    sends, reads = [], []

    async def body(reg):
        await _populate(reg)
        await reg.resolve_stack("drac", "personality")  # the first call may load the script into Redis
        conn = reg.client.connection  # single_connection_client: all traffic goes through this one
        send, read = conn.send_packed_command, conn.read_response

        async def counting_send(command, *args, **kwargs):
            sends.append(command)
            return await send(command, *args, **kwargs)

        async def counting_read(*args, **kwargs):
            reads.append(1)
            return await read(*args, **kwargs)

        conn.send_packed_command, conn.read_response = counting_send, counting_read
        try:
            for task in TASKS:
                sends.clear()
                reads.clear()
                stack = await reg.resolve_stack("drac", task)
                assert len(stack) == 3
                assert (len(sends), len(reads)) == (1, 1), task
                assert b"EVALSHA" in b"".join(sends[0]).upper()
            sends.clear()
            await reg.get("vampire.personality")  # the counter sees ordinary commands too
            assert len(sends) == 1
        finally:
            conn.send_packed_command, conn.read_response = send, read

    run(prefix, body, single_connection_client=True)


# ---------------------------------------------------------------------------------------- residency


def test_residency_mark_evict_and_lookup(prefix):
    async def body(reg):
        await reg.mark_resident("w1", ["vampire.personality", "npc.drac"], tier="gpu")
        await reg.mark_resident("w1", ["vampire.sub.nosferatu"], tier="cpu")
        await reg.mark_resident("w2", ["vampire.personality"], tier="cpu")
        assert await reg.resident("w1") == {"vampire.personality": "gpu", "npc.drac": "gpu",
                                            "vampire.sub.nosferatu": "cpu"}
        assert await reg.workers_with("vampire.personality") == ["w1", "w2"]
        await reg.mark_resident("w1", ["npc.drac"], tier="cpu")  # demoted to host memory
        assert (await reg.resident("w1"))["npc.drac"] == "cpu"
        await reg.mark_evicted("w1", ["vampire.personality", "not.there"])
        assert await reg.workers_with("vampire.personality") == ["w2"]
        await reg.mark_evicted("w2", ["vampire.personality"])
        assert await reg.workers_with("vampire.personality") == []
        assert await reg.resident("w2") == {}
        assert await reg.resident("never-seen") == {}
        with pytest.raises(ValueError, match="^tier:"):
            await reg.mark_resident("w1", ["x"], tier="disk")
        with pytest.raises(ValueError, match="^names:"):
            await reg.mark_resident("w1", "vampire.personality")
        with pytest.raises(ValueError, match="^worker_id:"):
            await reg.mark_resident("w 1", ["x"])

    run(prefix, body)


def test_residency_expires_without_heartbeat(prefix):
    async def body(reg):
        await reg.mark_resident("dying", ["vampire.personality"], ttl_s=1.0)
        await reg.mark_resident("alive", ["vampire.personality"], ttl_s=1.0)
        await reg.mark_resident("alive", ["npc.drac"])  # a later mark keeps the worker's TTL
        assert await reg.workers_with("vampire.personality") == ["alive", "dying"]
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:
            assert await reg.heartbeat("alive", ttl_s=1.0) is True
            await asyncio.sleep(0.25)
        assert await reg.resident("dying") == {}
        assert await reg.workers_with("vampire.personality") == ["alive"]
        assert await reg.resident("alive") == {"vampire.personality": "gpu", "npc.drac": "gpu"}
        assert await reg.heartbeat("dying") is False  # expired: it must mark its adapters again
        raw = redis.Redis.from_url(redis_url())
        try:
            assert not raw.sismember(prefix + "workers", "dying")  # pruned from the index
            assert 0 < raw.pttl(prefix + "resident:alive") <= 1000
        finally:
            raw.close()

    run(prefix, body)


def test_residency_default_ttl(prefix):
    async def body(reg):
        await reg.mark_resident("w", ["ghoul.personality"])
        assert 0 < await reg.client.pttl(prefix + "resident:w") <= 30_000

    run(prefix, body)
