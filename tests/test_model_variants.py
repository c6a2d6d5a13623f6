"""Model families, RoPE scalings, dtypes and the nf4 base against their references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import GREEDY, assert_matches, hf_greedy, random_prompts

from gpu_worker import Engine, EngineConfig, Request
from gpu_worker.request import Sequence
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.testing import build_model

ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(scaling, tmp_path):
    model_dir = build_model(tmp_path / scaling, family="llama", seed=5, rope_scaling=ROPE_SCALINGS[scaling])
    prompts = random_prompts([70, 9], seed=11)  # positions well past the original 32
    engine = Engine(EngineConfig(model=str(model_dir)))
    assert engine.model.args.rope.rope_type == scaling
    completions = engine.generate([Request(prompt=p, params=GREEDY) for p in prompts])
    assert_matches(completions, hf_greedy(model_dir, prompts, GREEDY.max_tokens))


def test_mistral_family_matches_transformers(tmp_path):
    model_dir = build_model(tmp_path / "mistral", family="mistral", seed=6, heads=8, kv_heads=2)
    prompts = random_prompts([12, 30], seed=12)
    engine = Engine(EngineConfig(model=str(model_dir), max_num_batched_tokens=16))
    completions = engine.generate([Request(prompt=p, params=GREEDY) for p in prompts])
    assert_matches(completions, hf_greedy(model_dir, prompts, GREEDY.max_tokens))


def test_unsupported_rope_type_is_rejected(tmp_path):
    model_dir = build_model(tmp_path / "m", family="llama", rope_scaling={"rope_type": "dynamic",
                                                                          "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type"):
        Engine(EngineConfig(model=str(model_dir)))


def last_logits(engine: Engine, prompt: list[int]) -> torch.Tensor:
    """Logits [V] after `prompt` through the engine's own runner (a one-chunk prefill)."""
    seq = Sequence(request_id="score", prompt_len=len(prompt), token_ids=list(prompt),
                   params=SamplingParams(), adapters=(), cache_key=b"", priority=0, deadline=None)
    seq.block_table = engine.blocks.allocate(math.ceil(len(prompt) / engine.blocks.block_size))
    try:
        logits, _ = engine.runner.run([(seq, len(prompt))])
    finally:
        engine.blocks.release(seq.block_table)
    return logits[0]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    # Wider than the default fixture so that 4-bit blocks of 64 weights fit every projection.
    return build_model(tmp_path_factory.mktemp("wide"), family="qwen2", seed=8, hidden=128, intermediate=256)


def logit_similarity(a: Engine, b: Engine, prompts) -> float:
    return min(F.cosine_similarity(last_logits(a, p), last_logits(b, p), dim=0).item() for p in prompts)


def test_bfloat16_close_to_float32(wide_model):
    prompts = random_prompts([20, 33, 7], seed=13)
    f32 = Engine(EngineConfig(model=str(wide_model)))
    bf16 = Engine(EngineConfig(model=str(wide_model), dtype="bfloat16"))
    assert bf16.runner.kv_caches[0][0].dtype == torch.bfloat16
    assert logit_similarity(f32, bf16, prompts) > 0.999
    completions = bf16.generate([Request(prompt=p, params=GREEDY) for p in prompts])
    assert all(len(c.token_ids) == GREEDY.max_tokens for c in completions)


def test_nf4_base_close_to_float_base(wide_model):
    import bitsandbytes as bnb

    prompts = random_prompts([20, 33, 7], seed=14)
    f32 = Engine(EngineConfig(model=str(wide_model)))
    nf4 = Engine(EngineConfig(model=str(wide_model), quantization="nf4"))
    layer = nf4.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer.quantized, bnb.nn.Linear4bit) and layer.weight.numel() == 0
    similarity = logit_similarity(f32, nf4, prompts)
    assert 0.9 < similarity < 0.99999  # close, and really quantized (not the float weights)
    completions = nf4.generate([Request(prompt=p, params=GREEDY) for p in prompts])
    assert all(len(c.token_ids) == GREEDY.max_tokens for c in completions)
