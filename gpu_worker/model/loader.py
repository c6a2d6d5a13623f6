"""Loads a Hugging Face checkpoint folder (config.json + safetensors, sharded or not) into CausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from gpu_worker.model.llama import SUPPORTED_MODEL_TYPES, CausalLM, ModelArgs
from gpu_worker.model.rope import rope_spec_from_config

# Checkpoint tensors that carry nothing we need (older exports save RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"model: no config.json in {model_dir}")
    return json.loads(path.read_text())


def model_args_from_config(cfg: dict) -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"config.model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return ModelArgs(
        model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), max_position=cfg.get("max_position_embeddings", 4096),
        rope=rope_spec_from_config(cfg), qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
    )


def safetensors_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise ValueError(f"model: shard(s) {missing} named in {index.name} are missing from {model_dir}")
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors weights in {model_dir}")
    return files


def _target(name: str) -> tuple[str, int | None]:
    """Maps a checkpoint name to (our parameter name, slice index within a fused projection)."""
    name = name.removeprefix("model.")
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        if f"self_attn.{proj}." in name:
            return name.replace(proj, "qkv_proj"), i
    for i, proj in enumerate(("gate_proj", "up_proj")):
        if f"mlp.{proj}." in name:
            return name.replace(proj, "gate_up_proj"), i
    return name, None


def load_weights(model: CausalLM, files: list[Path]) -> None:
    params = dict(model.named_parameters())
    filled: set[tuple[str, int | None]] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                _copy(params, model, name, f.get_tensor(name), filled)
    expected = _expected_pieces(model)
    missing = sorted(f"{n}[{i}]" if i is not None else n for n, i in expected - filled)
    if missing:
        raise ValueError(f"model: weights missing from the checkpoint: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")


def _copy(params, model, name, tensor, filled) -> None:
    target, piece = _target(name)
    if target == "lm_head.weight" and model.lm_head is None:
        return  # tied: the embedding is the head
    if target not in params:
        raise ValueError(f"model: unexpected tensor {name!r} in checkpoint")
    param = params[target]
    if piece is None:
        dst = param.data
    else:
        owner = model.get_submodule(target.rsplit(".", 1)[0])
        offset = sum(owner.output_sizes[:piece])
        dst = param.data.narrow(0, offset, owner.output_sizes[piece])
    if tuple(dst.shape) != tuple(tensor.shape):
        raise ValueError(f"model: tensor {name!r} has shape {tuple(tensor.shape)}, config expects "
                         f"{tuple(dst.shape)}")
    dst.copy_(tensor.to(dst.dtype))
    filled.add((target, piece))


def _expected_pieces(model: CausalLM) -> set[tuple[str, int | None]]:
    expected = set()
    for name, _ in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        sizes = getattr(owner, "output_sizes", [None])
        if len(sizes) > 1 and name.endswith(("weight", "bias")):
            expected.update((name, i) for i in range(len(sizes)))
        else:
            expected.add((name, None))
    return expected


def load_model(model_dir: str | Path, dtype: torch.dtype,
               device: str | torch.device) -> tuple[CausalLM, dict]:
    cfg = read_config(model_dir)
    args = model_args_from_config(cfg)
    files = safetensors_files(model_dir)
    with torch.device("cpu"):
        model = CausalLM(args, dtype)
    load_weights(model, files)
    return model.to(device).eval(), cfg
