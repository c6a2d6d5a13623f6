"""Attaches the adapter pool to the model: each projection gets a delta hook that adds its rows' LoRA."""

from __future__ import annotations

from gpu_worker.lora.adapter import FUSED_OF, MODULES
from gpu_worker.lora.batch import add_lora
from gpu_worker.lora.pool import AdapterPool
from gpu_worker.model.llama import CausalLM


def attach_lora(model: CausalLM, pool: AdapterPool) -> None:
    for i, layer in enumerate(model.layers):
        for fused in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            parent = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
            linear = layer.get_submodule(f"{parent}.{fused}")
            linear.delta_hook = _hook(pool, i, _slices(fused, linear.output_sizes))


def _slices(fused: str, output_sizes: list[int]) -> list[tuple[str, int, int]]:
    """(PEFT module, offset, size) of each slice of a fused projection's output."""
    subs = sorted((FUSED_OF[m][1], m) for m in MODULES if FUSED_OF[m][0] == fused)
    offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
    return [(m, offsets[i], output_sizes[i]) for i, m in subs]


def _hook(pool: AdapterPool, layer: int, subs):
    weights = pool.weights[layer]

    def add_delta(x, y):
        if pool.current is not None:  # None: no row of this step has an adapter, LoRA costs nothing
            add_lora(pool.current, x, y, subs, weights)

    return add_delta
