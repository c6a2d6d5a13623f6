"""Builders of tiny random checkpoints for tests and benchmarks: models, PEFT adapters, a BPE tokenizer.

Everything is made locally and saved in the formats the engine loads in production (config.json +
safetensors, PEFT folders, tokenizer.json); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

_CORPUS_LINES = [
    "The vampire lord watches the village from the ruined chapel.",
    "A werewolf howls at the moon and the pack answers from the hills.",
    "The zombie horde shuffles toward the gate, hungry and slow.",
    "The ghoul feeds in the crypt and hides from the torchlight.",
    "The lich studies forbidden spells in the frozen tower.",
    "Traveller, you carry the smell of garlic. Leave my castle before dawn.",
    "I remember you. You brought me a silver ring and then you lied to me.",
    "{\"action\": \"attack\", \"target\": \"player_1\"}",
    "Quest: find the lost amulet in the marsh. Reward: 50 gold coins.",
    "Trust 0.75, affinity -0.20, promises kept 3, betrayals 1.",
]


def skip_gpu_tests_without_cuda(items) -> None:
    """pytest hook body: tests marked `gpu` are skipped (not failed) on a machine without CUDA."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Trains a byte-level BPE tokenizer on a small built-in corpus and saves it with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS_LINES * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out_dir))
    return out_dir


def model_config(family: str = "qwen2", hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 128, vocab: int = 512, max_position: int = 2048,
                 rope_scaling: dict | None = None, tie: bool | None = None, init_std: float = 0.1):
    """A transformers config of the given family; Qwen2 ties embeddings by default (qkv bias is implied)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[family]
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                  max_position_embeddings=max_position, initializer_range=init_std, rms_norm_eps=1e-6,
                  tie_word_embeddings=(family == "qwen2") if tie is None else tie, eos_token_id=0,
                  bos_token_id=None, pad_token_id=0)
    if family == "mistral":
        kwargs["sliding_window"] = None
    config = cls(**kwargs)
    if rope_scaling is not None:
        config.rope_parameters = {"rope_theta": 10000.0, **rope_scaling}
    return config


def build_model(out_dir: str | Path, family: str = "qwen2", seed: int = 0, max_shard_size: str | None = None,
                dtype: torch.dtype = torch.float32, **config_kwargs) -> Path:
    """Saves a random model of `family` as safetensors (sharded when max_shard_size is given)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = model_config(family, **config_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _randomize_norms(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)
    return out_dir


def _randomize_norms(model, seed: int) -> None:
    # RMSNorm weights start at 1 and biases at 0: perturb them so a loader that skips them fails tests.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.1)


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_ONLY = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_ONLY = ("gate_proj", "up_proj", "down_proj")


def build_adapter(model_dir: str | Path, out_dir: str | Path, r: int = 8, alpha: float = 16,
                  targets: tuple[str, ...] = ALL_LINEAR, use_rslora: bool = False, seed: int = 0,
                  rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                  scale_b: float = 0.05) -> Path:
    """Saves a PEFT LoRA adapter with random non-zero A and B (B is zero at a normal init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                        init_lora_weights=False, lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (scale_b if "lora_B" in name else 0.2))
    peft_model.save_pretrained(str(out_dir))
    return out_dir
