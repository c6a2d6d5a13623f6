"""The fixtures build checkpoints that transformers, PEFT and our loader all read."""

import json

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def test_qwen2_fixture_is_tied_with_qkv_bias(qwen2_dir):
    cfg = json.loads((qwen2_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    with safe_open(str(qwen2_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "lm_head.weight" not in names


def test_llama_fixture_is_sharded(llama_dir):
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    assert model.config.model_type == "llama"


def test_tokenizer_round_trips(qwen2_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(str(qwen2_dir))
    text = "The vampire lord watches the village."
    ids = tok(text).input_ids
    assert 1 < len(ids) < len(text) and tok.decode(ids) == text
    assert tok.eos_token_id == 0


def test_adapters_have_random_nonzero_weights(adapters):
    for name, path in adapters.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            b_norms = [f.get_tensor(k).abs().sum().item() for k in f.keys() if "lora_B" in k]
        assert b_norms and min(b_norms) > 0, name
        assert cfg["peft_type"] == "LORA"
    assert json.loads((adapters["rslora_r32"] / "adapter_config.json").read_text())["use_rslora"] is True
    mlp = json.loads((adapters["mlp_r16"] / "adapter_config.json").read_text())
    assert set(mlp["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}


def test_gpu_marker_skips_cleanly_without_cuda(pytester):
    pytester.makeconftest("from gpu_worker.testing import skip_gpu_tests_without_cuda\n"
                          "def pytest_collection_modifyitems(config, items):\n"
                          "    skip_gpu_tests_without_cuda(items)\n")
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile("import pytest, torch\n@pytest.mark.gpu\ndef test_cuda():\n"
                        "    assert torch.zeros(1, device='cuda').item() == 0\n")
    result = pytester.runpytest()
    if torch.cuda.is_available():
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)
