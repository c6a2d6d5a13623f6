"""Attaches the adapter pool to the model: each projection gets a delta hook that adds its rows' LoRA."""

from __future__ import annotations

from gpu_worker.lora.batch import add_lora, resolve_kernel
from gpu_worker.lora.pool import FUSED_SUBS, AdapterPool
from gpu_worker.model.llama import CausalLM


def attach_lora(model: CausalLM, pool: AdapterPool) -> str:
    """Hooks every projection; returns (and sets as pool.kernel) the delta path that pool.config.kernel
    resolves to on pool.device. Raises ValueError before hooking anything when that choice cannot run there
    (resolve_kernel; EngineConfig already refuses such a config)."""
    kernel = resolve_kernel(pool.config.kernel, pool.device)
    for i, layer in enumerate(model.layers):
        for fused in FUSED_SUBS:
            parent = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
            layer.get_submodule(f"{parent}.{fused}").delta_hook = _hook(pool, i, fused, kernel)
    pool.kernel = kernel
    return kernel


def _hook(pool: AdapterPool, layer: int, fused: str, kernel: str):
    def add_delta(x, y):
        if pool.current is not None:  # None: no row of this step has an adapter, LoRA costs nothing
            at, bts = pool.weights[layer][fused]  # looked up per call: slots are reallocated when R grows
            add_lora(pool.current, x, y, at, bts, kernel)

    return add_delta
