"""EngineConfig: the one frozen configuration of the engine, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpu_worker.lora.pool import LoRAConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    quantization: str | None = None  # None | "nf4" (bitsandbytes 4-bit base weights)
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int = 256 << 20  # KV pool budget (both K and V, all layers)
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes when set (tests force tiny pools)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int = 2048  # token budget of one step (decode rows + prefill chunks)
    enable_prefix_caching: bool = True
    max_waiting: int = 4096  # bounded admission queue; add_request raises when full
    tokenizer: str | None = None  # folder with tokenizer.json for stop strings; default: the model folder
    # Multi-LoRA; the slots are allocated by the first load_adapter:
    # 2 * max_loras * max_lora_rank * sum over layers and projections of (in + out) elements.
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in (None, "nf4"):
            raise ValueError(f"EngineConfig.quantization must be None or 'nf4', got {self.quantization!r}")
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"EngineConfig.num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"EngineConfig.max_model_len must be >= 2, got {self.max_model_len}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"EngineConfig.device is {self.device!r} but CUDA is not available")
        from gpu_worker.lora.batch import resolve_kernel

        resolve_kernel(self.lora.kernel, torch.device(self.device))  # fails here, not at the first adapter

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
