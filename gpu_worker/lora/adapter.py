"""PEFT LoRA adapters: parsed, validated against the base model, converted to the engine's dtype.

A PEFT folder holds adapter_config.json (r, lora_alpha, use_rslora, target_modules, rank_pattern,
alpha_pattern) and adapter_model.safetensors with, per targeted module,
`...layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].
The delta of one module is `scale * B @ A` with scale = alpha / r (alpha / sqrt(r) with rsLoRA); we fold
the scale into B at load so the kernels only multiply.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gpu_worker.model.llama import ModelArgs

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Each PEFT module is a slice of one of our fused projections: (fused name, index of the slice).
FUSED_OF = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
            "down_proj": ("down_proj", 0)}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def module_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of the base model."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    h, i = args.hidden_size, args.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass
class LoRAAdapter:
    name: str
    path: str
    sha256: str
    # (layer, module) -> (A^T [in, r], B^T [r, out] with the scale folded in), contiguous, on the CPU in the
    # engine's dtype: already the pool's layout (AdapterPool.swap_in copies them without a transposed read)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    module_ranks: dict[str, int] = field(default_factory=dict)  # max rank over layers, per module

    @property
    def rank(self) -> int:
        return max(self.module_ranks.values())

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m for m in MODULES if m in self.module_ranks)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def pin_memory(self) -> LoRAAdapter:
        self.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in self.weights.items()}
        return self


def read_adapter_config(path: Path) -> dict:
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"adapter {path}: no adapter_config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"adapter {path}: adapter_config.json is not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(key) == bad:
            raise ValueError(f"adapter {path}: {key}=true is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter {path}: bias={config['bias']!r} is not supported (only 'none')")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise ValueError(f"adapter {path}: r must be a positive integer, got {config.get('r')!r}")
    return config


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rule: a pattern matches a module name that ends with it at a dot boundary."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def load_peft_adapter(name: str, path: str | Path, args: ModelArgs, dtype: torch.dtype,
                      max_rank: int) -> LoRAAdapter:
    """Reads and validates a PEFT LoRA folder; raises ValueError naming the adapter and the problem."""
    path = Path(path)
    config = read_adapter_config(path)
    weights_path = path / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise ValueError(f"adapter {name!r}: no adapter_model.safetensors in {path}")
    raw = _read_tensors(name, weights_path)
    shapes = module_shapes(args)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    prefixes: dict[tuple[int, str], str] = {}
    for key, tensor in raw.items():
        match = _KEY.search(key)
        if match is None:
            raise ValueError(f"adapter {name!r}: unsupported tensor {key!r} (only LoRA A/B of linear layers)")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in shapes:
            raise ValueError(f"adapter {name!r}: target module {module!r} does not exist in the base model "
                             f"(it has {', '.join(MODULES)})")
        if layer >= args.num_layers:
            raise ValueError(f"adapter {name!r}: layer {layer} does not exist "
                             f"(the model has {args.num_layers})")
        pairs.setdefault((layer, module), {})[which] = tensor
        prefixes[(layer, module)] = key[: match.start(2) + len(module)]
    if not pairs:
        raise ValueError(f"adapter {name!r}: adapter_model.safetensors holds no LoRA weights")
    weights, ranks = {}, {}
    for (layer, module), ab in sorted(pairs.items()):
        a, b = _checked_pair(name, layer, module, ab, shapes[module], max_rank)
        r = a.shape[0]
        module_key = prefixes[(layer, module)].removeprefix("base_model.model.")
        alpha = _pattern_value(config.get("alpha_pattern"), module_key, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weights[(layer, module)] = (a.T.to(dtype).contiguous(), (b.float() * scale).T.to(dtype).contiguous())
        ranks[module] = max(ranks.get(module, 0), r)
    return LoRAAdapter(name=name, path=str(path), sha256=_sha256(weights_path), weights=weights,
                       module_ranks=ranks)


def _checked_pair(name, layer, module, ab, shape, max_rank):
    if set(ab) != {"A", "B"}:
        raise ValueError(f"adapter {name!r}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
    a, b = ab["A"], ab["B"]
    in_features, out_features = shape
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or tuple(b.shape) != (out_features, r):
        raise ValueError(f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B "
                         f"{tuple(b.shape)}; the base model needs A [r, {in_features}] and B "
                         f"[{out_features}, r]")
    if r > max_rank:
        raise ValueError(f"adapter {name!r}: rank {r} of layer {layer} {module} is above the maximum "
                         f"max_lora_rank={max_rank}")
    return a, b


def _read_tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"adapter {name!r}: cannot read {path.name}: {e}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
