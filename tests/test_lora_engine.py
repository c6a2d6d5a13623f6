"""Multi-LoRA in the engine against transformers + PEFT with the adapters merged into the weights."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_engine import GREEDY, assert_matches, random_prompts
from transformers import AutoModelForCausalLM

from gpu_worker import Engine, EngineConfig, Request

STACKS = [(), ("all_r8",), ("attn_r4",), ("mlp_r16",), ("rslora_r32",), ("pattern_r8",), ("all_r64",),
          ("rslora_r32", "pattern_r8"), ("attn_r4", "mlp_r16", "all_r8")]


def merged_reference(model_dir, adapter_dirs, stack, prompts, max_new_tokens):
    """Greedy tokens/logprobs of the base with each adapter of `stack` merged into W in turn."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for name in stack:
        model = PeftModel.from_pretrained(model, str(adapter_dirs[name])).merge_and_unload()
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        tokens = out.sequences[0, len(prompt):].tolist()
        results.append((tokens, [torch.log_softmax(s[0].float(), -1)[t].item()
                                 for s, t in zip(out.logits, tokens)]))
    return results


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
