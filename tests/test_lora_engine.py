"""Multi-LoRA in the engine against transformers + PEFT with the adapters merged into the weights."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_engine import GREEDY, assert_matches, hf_model_greedy, random_prompts
from transformers import AutoModelForCausalLM

from gpu_worker import Engine, EngineConfig, Request
from gpu_worker.lora.pool import LoRAConfig

STACKS = [(), ("all_r8",), ("attn_r4",), ("mlp_r16",), ("rslora_r32",), ("pattern_r8",), ("all_r64",),
          ("rslora_r32", "pattern_r8"), ("attn_r4", "mlp_r16", "all_r8")]


def merged_reference(model_dir, adapter_dirs, stack, prompts, max_new_tokens):
    """Greedy tokens/logprobs of the base with each adapter of `stack` merged into W in turn."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for name in stack:
        model = PeftModel.from_pretrained(model, str(adapter_dirs[name])).merge_and_unload()
    return hf_model_greedy(model, prompts, max_new_tokens)


@pytest.fixture(scope="module")
def references(qwen2_dir, adapters):
    prompts = random_prompts([11, 30], seed=21)
    return prompts, {stack: merged_reference(qwen2_dir, adapters, stack, prompts, GREEDY.max_tokens)
                     for stack in STACKS}


def lora_engine(qwen2_dir, adapters, **config):
    engine = Engine(EngineConfig(model=str(qwen2_dir), **config))
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine


@pytest.mark.parametrize("setting", [{}, {"max_num_batched_tokens": 8}])
def test_mixed_batch_matches_merged_peft(setting, qwen2_dir, adapters, references):
    prompts, refs = references
    engine = lora_engine(qwen2_dir, adapters, **setting)
    requests = [Request(prompt=p, adapters=stack, params=GREEDY) for stack in STACKS for p in prompts]
    completions = engine.generate(requests)
    expected = [ref for stack in STACKS for ref in refs[stack]]
    assert_matches(completions, expected, atol=2e-4)
    base_only, lora_rows = completions[:2], completions[2:]
    assert any(c.token_ids != base_only[i % 2].token_ids for i, c in enumerate(lora_rows))  # adapters act


def test_pool_smaller_than_adapters_in_use(qwen2_dir, adapters, references):
    """3 slots (one pinned), 6 stacks in flight: requests wait for slots; in-use adapters stay resident."""
    prompts, refs = references
    engine = lora_engine(qwen2_dir, adapters, lora=LoRAConfig(max_loras=3, max_cpu_loras=8))
    engine.pin_adapter("all_r8")
    stacks = STACKS[1:7]
    ids = [engine.add_request(Request(prompt=prompts[0], adapters=s, params=GREEDY)) for s in stacks]
    while engine.has_unfinished():
        engine.step()
        pool = engine.lora
        for seq in engine.scheduler.running:  # every running row finds its own adapters in its slots
            assert tuple(pool.slots[i] for i in seq.adapter_slots) == seq.adapters
        assert pool.slot_of.get("all_r8") is not None  # pinned: never evicted
    completions = [engine.take_completion(i) for i in ids]
    assert_matches(completions, [refs[s][0] for s in stacks], atol=2e-4)
    assert engine.lora.swaps >= len(stacks) - 1 and not engine.lora.in_use


def test_prefix_cached_under_one_stack_is_never_served_to_another(qwen2_dir, adapters, references):
    prompts, refs = references
    prompt = prompts[1]  # 30 tokens: one full block of 16 can be cached
    engine = lora_engine(qwen2_dir, adapters)
    first, = engine.generate([Request(prompt=prompt, adapters=("all_r8",), params=GREEDY)])
    other, = engine.generate([Request(prompt=prompt, adapters=("mlp_r16",), params=GREEDY)])
    base, = engine.generate([Request(prompt=prompt, params=GREEDY)])
    again, = engine.generate([Request(prompt=prompt, adapters=("all_r8",), params=GREEDY)])
    assert (first.num_cached_tokens, other.num_cached_tokens, base.num_cached_tokens) == (0, 0, 0)
    assert again.num_cached_tokens == 16
    assert_matches([first, other, base, again], [refs[("all_r8",)][1], refs[("mlp_r16",)][1], refs[()][1],
                                                 refs[("all_r8",)][1]], atol=2e-4)
    per_stack = engine.stats()["prefix_by_stack"]
    assert per_stack["all_r8"]["hit_tokens"] == 16 and per_stack["mlp_r16"]["hit_tokens"] == 0


def test_loading_while_serving(qwen2_dir, adapters, references):
    prompts, refs = references
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    busy = engine.add_request(Request(prompt=prompts[0], params=GREEDY))
    engine.step()
    engine.load_adapter("mlp_r16", adapters["mlp_r16"], wait=False)  # returns at once; loads on a thread
    waiting = engine.add_request(Request(prompt=prompts[0], adapters=("mlp_r16",), params=GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert_matches([engine.take_completion(busy), engine.take_completion(waiting)],
                   [refs[()][0], refs[("mlp_r16",)][0]], atol=2e-4)


def test_adapter_that_fails_in_the_background_fails_only_its_requests(qwen2_dir, adapters, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapters["all_r8"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = Engine(EngineConfig(model=str(qwen2_dir)))
    engine.load_adapter("broken", broken, wait=False)
    bad = engine.add_request(Request(prompt=[1, 2, 3], adapters=("broken",), params=GREEDY))
    good = engine.add_request(Request(prompt=[1, 2, 3], params=GREEDY))
    while engine.has_unfinished():
        engine.step()
    failed = engine.take_completion(bad)
    assert failed.finish_reason == "error" and "adapter_model.safetensors" in failed.error
    assert engine.take_completion(good).finish_reason == "length"
    with pytest.raises(ValueError, match="failed to load"):
        engine.add_request(Request(prompt=[1], adapters=("broken",)))


def _copy_adapter(src, dst, edit_config=None, edit_tensors=None):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(edit_config(config)))
    if edit_tensors:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        save_file(edit_tensors(tensors), str(dst / "adapter_model.safetensors"))
    return dst


def test_bad_adapters_get_clear_errors_and_the_engine_keeps_serving(qwen2_dir, adapters, tmp_path):
    engine = Engine(EngineConfig(model=str(qwen2_dir), lora=LoRAConfig(max_lora_rank=32,
                                                                        max_stack_rank=36)))
    with pytest.raises(ValueError, match="rank 64 .* above the maximum"):
        engine.load_adapter("big", adapters["all_r64"])
    fake_module = _copy_adapter(adapters["all_r8"], tmp_path / "fake", edit_tensors=lambda t: {
        k.replace("q_proj", "fc9"): v for k, v in t.items()})
    with pytest.raises(ValueError, match="target module 'fc9' does not exist"):
        engine.load_adapter("fake", fake_module)
    wrong_shape = _copy_adapter(adapters["all_r8"], tmp_path / "shape", edit_tensors=lambda t: {
        k: (v[:, :-1].contiguous() if "lora_A" in k else v) for k, v in t.items()})
    with pytest.raises(ValueError, match="base model needs A"):
        engine.load_adapter("shape", wrong_shape)
    no_weights = _copy_adapter(adapters["all_r8"], tmp_path / "noweights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        engine.load_adapter("noweights", no_weights)
    bad_json = _copy_adapter(adapters["all_r8"], tmp_path / "json")
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        engine.load_adapter("json", bad_json)
    truncated = _copy_adapter(adapters["all_r8"], tmp_path / "trunc")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        engine.load_adapter("trunc", truncated)

    for name in ("rslora_r32", "all_r8", "attn_r4", "mlp_r16", "pattern_r8"):
        engine.load_adapter(name, adapters[name])
    good = engine.add_request(Request(prompt=[1, 2, 3], adapters=("all_r8",), params=GREEDY))
    with pytest.raises(ValueError, match="total rank 40 .* over max_stack_rank=36"):
        engine.add_request(Request(prompt=[1], adapters=("rslora_r32", "all_r8")))
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.add_request(Request(prompt=[1], adapters=("nobody",)))
    with pytest.raises(ValueError, match="at most 4"):
        engine.add_request(Request(prompt=[1], adapters=("all_r8", "attn_r4", "mlp_r16", "pattern_r8",
                                                         "rslora_r32")))
    with pytest.raises(ValueError, match="repeats"):
        engine.add_request(Request(prompt=[1], adapters=("all_r8", "all_r8")))
    while engine.has_unfinished():
        engine.step()
    assert engine.take_completion(good).finish_reason == "length"


def test_unload_and_evicted_host_copy_reload(qwen2_dir, adapters, references):
    prompts, refs = references
    engine = lora_engine(qwen2_dir, {k: adapters[k] for k in ("all_r8", "attn_r4", "mlp_r16")},
                         lora=LoRAConfig(max_loras=1, max_cpu_loras=1))
    # One host slot: loading three evicts the first two from host memory; they reload from disk on use.
    assert list(engine.lora.cpu) == ["mlp_r16"]
    done = engine.generate([Request(prompt=prompts[0], adapters=(n,), params=GREEDY)
                            for n in ("all_r8", "attn_r4")])
    assert_matches(done, [refs[("all_r8",)][0], refs[("attn_r4",)][0]], atol=2e-4)
    engine.unload_adapter("attn_r4")
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.add_request(Request(prompt=[1], adapters=("attn_r4",)))


def test_a_reused_slot_holds_exactly_the_new_adapter(qwen2_dir, adapters):
    # swap_in writes every element of the slot once (the adapter's A^T / B^T, zeros for rank padding and
    # for untargeted modules) instead of zeroing it first: nothing of the previous tenant may survive.
    config = dict(lora=LoRAConfig(max_loras=2, max_cpu_loras=8))
    used = lora_engine(qwen2_dir, adapters, **config).lora
    fresh = lora_engine(qwen2_dir, adapters, **config).lora
    fresh.swap_in("all_r64", 0)  # the same rank width (64), slot 1 left untouched
    for name in ("all_r64", "rslora_r32", "mlp_r16"):  # every module and all 64 rank columns written
        used.swap_in(name, 1)
    assert used.rank_width == fresh.rank_width == 64  # rank-4 and rank-8 adapters leave padding
    for name in ("attn_r4", "pattern_r8"):  # attention only, rank 4; per-module ranks 8 and 4
        used.swap_in(name, 1)
        fresh.swap_in(name, 1)
        for layer_used, layer_fresh in zip(used.weights, fresh.weights, strict=True):
            for (at, bts), (at_f, bts_f) in zip(layer_used.values(), layer_fresh.values(), strict=True):
                assert torch.equal(at[1], at_f[1])
                assert all(torch.equal(bt[1], bt_f[1]) for bt, bt_f in zip(bts, bts_f, strict=True))
        fresh.swap_in("all_r64", 1)  # the next round's fresh pool starts from another tenant, too
