"""Attaches the adapter pool to the model: each projection gets a delta hook that adds its rows' LoRA."""

from __future__ import annotations

from gpu_worker.lora.batch import add_lora, resolve_kernel
from gpu_worker.lora.pool import FUSED_SUBS, AdapterPool
from gpu_worker.model.llama import CausalLM


def attach_lora(model: CausalLM, pool: AdapterPool) -> str:
    """Hooks every projection; returns the delta path that pool.config.kernel resolved to on pool.device.

    Raises ValueError when that choice cannot run there (see resolve_kernel). The hooks are attached even
    then, raising the same error on use, so a pool that was created anyway never silently adds nothing.
    """
    try:
        kernel, error = resolve_kernel(pool.config.kernel, pool.device), None
    except ValueError as e:
        kernel, error = None, e
    for i, layer in enumerate(model.layers):
        for fused in FUSED_SUBS:
            parent = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
            layer.get_submodule(f"{parent}.{fused}").delta_hook = _hook(pool, i, fused, kernel, error)
    if error is not None:
        raise error
    pool.kernel = kernel
    return kernel


def _hook(pool: AdapterPool, layer: int, fused: str, kernel: str | None, error: ValueError | None):
    def add_delta(x, y):
        if pool.current is not None:  # None: no row of this step has an adapter, LoRA costs nothing
            if error is not None:
                raise ValueError(str(error))
            at, bts = pool.weights[layer][fused]  # looked up per call: slots are reallocated when R grows
            add_lora(pool.current, x, y, at, bts, kernel)

    return add_delta
