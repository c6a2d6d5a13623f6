"""Session-scoped builders of tiny random checkpoints, and the `gpu` marker.

Models are saved as real Hugging Face folders (config.json + safetensors + tokenizer.json) so that tests
exercise the production loaders; nothing is downloaded.
"""

from __future__ import annotations

import os

# Triton fixes at import time whether its own library functions run interpreted, and bitsandbytes or
# transformers may import it before the kernel tests do: set it first. Tests that run compiled kernels
# on CUDA do so in a child process without this variable.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from gpu_worker.testing import (
    ALL_LINEAR,
    ATTENTION_ONLY,
    MLP_ONLY,
    build_adapter,
    build_model,
    build_tokenizer,
    skip_gpu_tests_without_cuda,
)

pytest_plugins = ["pytester"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests_without_cuda(items)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=512)


def _model_with_tokenizer(tmp_path_factory, tokenizer_dir, name, **kwargs):
    out = build_model(tmp_path_factory.mktemp(name), **kwargs)
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tokenizer_dir):
    """Qwen2: tied embeddings, qkv bias, GQA 4:2."""
    return _model_with_tokenizer(tmp_path_factory, tokenizer_dir, "qwen2", family="qwen2", seed=0)


@pytest.fixture(scope="session")
def tokenizer(qwen2_dir):
    """The Qwen2 fixture's tokenizer as the scheduler loads it (transformers' AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen2_dir))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir):
    """Llama: untied head, no bias, sharded safetensors."""
    return _model_with_tokenizer(tmp_path_factory, tokenizer_dir, "llama", family="llama", seed=1,
                                 max_shard_size="100KB")


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, qwen2_dir):
    """PEFT adapters on the Qwen2 model: mixed ranks and targets, one with rsLoRA, one with rank_pattern."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "all_r8": dict(r=8, alpha=16, targets=ALL_LINEAR),
        "attn_r4": dict(r=4, alpha=8, targets=ATTENTION_ONLY),
        "mlp_r16": dict(r=16, alpha=16, targets=MLP_ONLY),
        "rslora_r32": dict(r=32, alpha=8, targets=ALL_LINEAR, use_rslora=True),
        "pattern_r8": dict(r=8, alpha=16, targets=ALL_LINEAR, rank_pattern={"down_proj": 4},
                           alpha_pattern={"q_proj": 32}),
        "all_r64": dict(r=64, alpha=32, targets=ALL_LINEAR, scale_b=0.01),
    }
    return {name: build_adapter(qwen2_dir, root / name, seed=i, **spec)
            for i, (name, spec) in enumerate(specs.items())}


def _redis_prefix():
    """A Redis key prefix of its own (`npc-test:<uuid>:`); its keys are deleted afterwards."""
    import uuid

    import redis

    from memory.services import redis_url

    url = redis_url()
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        pytest.fail(f"no Redis at REDIS_URL={url} ({e}): start one with `python -m memory.services up`")
    prefix = f"npc-test:{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def prefix():
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    yield from _redis_prefix()


@pytest.fixture(scope="module")
def module_prefix():
    """A Redis key prefix of this module's own (for a module-scoped scheduler process)."""
    yield from _redis_prefix()


@pytest.fixture
def names(prefix):
    """(Redis key prefix, PostgreSQL schema) of this test's own; both removed afterwards."""
    import asyncio
    import uuid

    import asyncpg

    from memory.services import database_url

    schema = f"npc_test_{uuid.uuid4().hex}"
    yield prefix, schema

    async def drop_schema():
        conn = await asyncpg.connect(database_url())
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop_schema())
