"""Attaches the adapter pool to the model: each projection gets a delta hook that adds its rows' LoRA."""

from __future__ import annotations

from gpu_worker.lora.batch import add_lora
from gpu_worker.lora.pool import FUSED_SUBS, AdapterPool
from gpu_worker.model.llama import CausalLM


def attach_lora(model: CausalLM, pool: AdapterPool) -> None:
    for i, layer in enumerate(model.layers):
        for fused in FUSED_SUBS:
            parent = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
            layer.get_submodule(f"{parent}.{fused}").delta_hook = _hook(pool, i, fused)


def _hook(pool: AdapterPool, layer: int, fused: str):
    def add_delta(x, y):
        if pool.current is not None:  # None: no row of this step has an adapter, LoRA costs nothing
            at, bts = pool.weights[layer][fused]  # looked up per call: slots are reallocated when R grows
            add_lora(pool.current, x, y, at, bts)

    return add_delta
