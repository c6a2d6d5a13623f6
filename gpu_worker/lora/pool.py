"""Adapter pool: device slots (`max_loras`), a CPU tier (`max_cpu_loras`), LRU with pinning, background loads.

Three levels: known (name -> folder, reloadable from disk), CPU tier (parsed weights, pinned memory on
CUDA), device slots (weights copied into per-layer, per-module stacked tensors that the kernels index).
Disk reads and parsing run on a loader thread; everything else runs on the engine thread between steps,
so a step never waits on disk and slot tensors never change under a running forward pass.
An adapter used by a running sequence is never evicted from its slot; pinned adapters are never evicted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from gpu_worker.kernels.lora import triton_unavailable
from gpu_worker.lora.adapter import FUSED_OF, MODULES, LoRAAdapter, load_peft_adapter, module_shapes
from gpu_worker.lora.batch import KERNELS as LORA_KERNELS
from gpu_worker.model.llama import ModelArgs
from gpu_worker.request import RequestRejected

# PEFT modules of each fused projection, in the order of its output slices.
FUSED_SUBS = {fused: tuple(m for m in MODULES if FUSED_OF[m][0] == fused)
              for fused in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}


class AdapterNotReady(Exception):
    """The adapter is still loading, or no slot is free right now: retry at a later step."""


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 16  # device slots
    max_cpu_loras: int = 64  # parsed adapters kept in host memory
    max_lora_rank: int = 64  # slot width; a larger adapter is rejected
    max_stack: int = 4  # adapters per row
    max_stack_rank: int = 64  # sum of the ranks of a row's stack
    # How the deltas are added (gpu_worker/lora/batch.py): "auto" (Triton kernels on CUDA when triton is
    # importable, torch otherwise), "torch", or "triton" (forced; on a CPU only under TRITON_INTERPRET=1).
    kernel: str = "auto"

    def __post_init__(self):
        for name in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_stack", "max_stack_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoRAConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("LoRAConfig.max_cpu_loras must be >= max_loras (every slot has a host copy)")
        if self.kernel not in LORA_KERNELS:
            raise ValueError(f"LoRAConfig.kernel must be one of {LORA_KERNELS}, got {self.kernel!r}")
        reason = triton_unavailable() if self.kernel == "triton" else None
        if reason is not None:  # the device is checked again when the pool is attached (resolve_kernel)
            raise ValueError(f"LoRAConfig.kernel='triton': {reason}; use kernel='auto' or 'torch'")


class AdapterPool:
    def __init__(self, args: ModelArgs, config: LoRAConfig, dtype: torch.dtype, device: torch.device):
        self.args, self.config, self.dtype, self.device = args, config, dtype, device
        self.shapes = module_shapes(args)
        # weights[layer][fused] = (At [S, in, n_sub * R], [Bt_j [S, R, size_j] per sub]), layout in batch.py.
        # R (rank_width) starts small and grows with the largest adapter swapped in (up to max_lora_rank):
        # lower-rank adapters are zero-padded to R, so a fixed large R would multiply their cost.
        self.rank_width = 0
        self.weights: list[dict[str, tuple[torch.Tensor, list[torch.Tensor]]]] = []
        self.paths: dict[str, str] = {}
        self.cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()  # LRU order, oldest first
        self.slots: list[str | None] = [None] * config.max_loras
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # resident adapters, LRU order
        self.pinned: set[str] = set()
        self.in_use: Counter[str] = Counter()
        self.loading: dict[str, Future] = {}
        self.kernel = "torch"  # the delta path config.kernel resolved to on this device (set by attach_lora)
        self.failed: dict[str, str] = {}
        self.swaps = 0
        self.current = None  # the running step's LoRABatch (set by the model runner)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-loader")

    # --- registration and loading (engine thread) -----------------------------------------------------

    def load(self, name: str, path: str, pin: bool = False) -> Future:
        """Starts (or restarts) loading `name` from `path` on the loader thread; returns its future."""
        if name in self.in_use:
            raise ValueError(f"adapter {name!r} is in use by running requests; unload it first")
        self._drop(name)
        self.paths[name] = str(path)
        self.failed.pop(name, None)
        if pin:
            self.pinned.add(name)
        future = self._executor.submit(self._read, name, str(path))
        self.loading[name] = future
        return future

    def unload(self, name: str) -> None:
        if name not in self.paths:
            raise RequestRejected(RequestRejected.UNKNOWN_ADAPTER, f"unknown adapter {name!r}")
        if self.in_use[name]:
            raise ValueError(f"adapter {name!r} is in use by running requests")
        self._drop(name)
        self.paths.pop(name)
        self.pinned.discard(name)
        self.failed.pop(name, None)

    def pin(self, name: str, pinned: bool = True) -> None:
        if name not in self.paths:
            raise RequestRejected(RequestRejected.UNKNOWN_ADAPTER, f"unknown adapter {name!r}")
        (self.pinned.add if pinned else self.pinned.discard)(name)

    def _read(self, name: str, path: str) -> LoRAAdapter:
        adapter = load_peft_adapter(name, path, self.args, self.dtype, self.config.max_lora_rank)
        return adapter.pin_memory() if self.device.type == "cuda" else adapter

    def poll(self) -> None:
        """Moves finished loads into the CPU tier (called by the engine thread between steps)."""
        for name, future in list(self.loading.items()):
            if not future.done():
                continue
            del self.loading[name]
            try:
                adapter = future.result()
            except Exception as e:  # noqa: BLE001 - reported to every request that needs the adapter
                self.failed[name] = str(e)
                continue
            self._make_room_in_cpu()
            self.cpu[name] = adapter

    def wait(self, name: str) -> LoRAAdapter:
        """Blocks until `name` is loaded; raises ValueError with the load error."""
        future = self.loading.get(name)
        if future is not None:
            future.exception()
        self.poll()
        if name in self.failed:
            raise ValueError(self.failed[name])
        return self.cpu[name]

    # --- per-request use (engine thread) --------------------------------------------------------------

    def check_stack(self, names: tuple[str, ...]) -> None:
        """Validates a stack at request time; raises ValueError naming the problem."""
        if len(names) > self.config.max_stack:
            raise ValueError(f"Request.adapters has {len(names)} adapters; at most {self.config.max_stack}")
        if len(set(names)) != len(names):
            raise ValueError(f"Request.adapters repeats an adapter: {list(names)}")
        unknown = [n for n in names if n not in self.paths]
        if unknown:
            raise RequestRejected(RequestRejected.UNKNOWN_ADAPTER,
                                  f"Request.adapters: unknown adapter(s) {unknown}")
        failed = [n for n in names if n in self.failed]
        if failed:
            name = failed[0]
            raise RequestRejected(RequestRejected.ADAPTER_FAILED,
                                  f"Request.adapters: adapter {name!r} failed to load: {self.failed[name]}")
        ranks = [self.cpu[n].rank for n in names if n in self.cpu]
        if len(ranks) == len(names) and sum(ranks) > self.config.max_stack_rank:
            raise ValueError(f"Request.adapters: total rank {sum(ranks)} of {list(names)} is over "
                             f"max_stack_rank={self.config.max_stack_rank}")

    def acquire(self, names: tuple[str, ...]) -> tuple[int, ...]:
        """Makes every adapter of the stack resident and marks it in use; returns the slots.

        Raises AdapterNotReady (retry later) or ValueError (the request cannot run).
        """
        self.poll()
        for name in names:
            if name in self.failed:
                raise ValueError(f"adapter {name!r} failed to load: {self.failed[name]}")
            if name not in self.cpu and name not in self.loading:
                if name not in self.paths:
                    raise ValueError(f"adapter {name!r} was unloaded")
                self.load(name, self.paths[name], pin=name in self.pinned)  # evicted from host memory
            if name not in self.cpu:
                raise AdapterNotReady(name)
        self.check_stack(names)
        free_needed = sum(1 for n in names if n not in self.slot_of)
        if free_needed > len(self._evictable_slots(exclude=names)):
            raise AdapterNotReady("no free adapter slot")
        slots = tuple(self._make_resident(n, names) for n in names)
        for name in names:
            self.in_use[name] += 1
        return slots

    def release(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.in_use[name] -= 1
            if self.in_use[name] <= 0:
                del self.in_use[name]

    def uid(self, name: str) -> str:
        """Identity of the loaded weights (for prefix-cache keys): name and content hash."""
        return f"{name}@{self.cpu[name].sha256[:16]}"

    # --- slots ----------------------------------------------------------------------------------------

    def _evictable_slots(self, exclude: tuple[str, ...]) -> list[int]:
        free = [i for i, n in enumerate(self.slots) if n is None]
        evictable = [i for n, i in self.slot_of.items()
                     if n not in self.pinned and not self.in_use[n] and n not in exclude]
        return free + evictable

    def _make_resident(self, name: str, stack: tuple[str, ...]) -> int:
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            return self.slot_of[name]
        slot = self._evictable_slots(exclude=stack)[0]
        if self.slots[slot] is not None:
            del self.slot_of[self.slots[slot]]
        self.swap_in(name, slot)
        return slot

    def swap_in(self, name: str, slot: int) -> None:
        """Copies an adapter from the CPU tier into a device slot (the hot-swap)."""
        adapter = self.cpu[name]
        self.cpu.move_to_end(name)
        if adapter.rank > self.rank_width:
            self._grow(adapter.rank)
        width = self.rank_width
        # Every element of the slot is written once: the adapter's A^T / B^T (already in this layout, so
        # contiguous reads), zeros for the rank padding and for modules the adapter does not target.
        for layer, modules in enumerate(self.weights):
            for fused, (at, bts) in modules.items():
                for j, (module, bt) in enumerate(zip(FUSED_SUBS[fused], bts)):
                    cols = at[slot, :, j * width:(j + 1) * width]
                    pair = adapter.weights.get((layer, module))
                    if pair is None:
                        cols.zero_()
                        bt[slot].zero_()
                        continue
                    a_t, b_t = pair  # [in, r], [r, size]
                    r = a_t.shape[1]
                    cols[:, :r].copy_(a_t, non_blocking=True)
                    bt[slot, :r].copy_(b_t, non_blocking=True)
                    if r < width:
                        cols[:, r:].zero_()
                        bt[slot, r:].zero_()
        self.slots[slot] = name
        self.slot_of[name] = slot
        self.swaps += 1

    def _grow(self, rank: int) -> None:
        """Reallocates the slots with a rank width >= rank and copies the resident adapters back in."""
        width = min(max(8, 1 << (rank - 1).bit_length()), self.config.max_lora_rank)
        s, dev, dt = self.config.max_loras, self.device, self.dtype
        self.weights = []
        for _ in range(self.args.num_layers):
            layer = {}
            for fused, subs in FUSED_SUBS.items():
                in_features = self.shapes[subs[0]][0]
                at = torch.zeros(s, in_features, len(subs) * width, dtype=dt, device=dev)
                bts = [torch.zeros(s, width, self.shapes[m][1], dtype=dt, device=dev) for m in subs]
                layer[fused] = (at, bts)
            self.weights.append(layer)
        self.rank_width = width
        for resident, slot in list(self.slot_of.items()):
            self.swap_in(resident, slot)

    def _make_room_in_cpu(self) -> None:
        while len(self.cpu) >= self.config.max_cpu_loras:
            victim = next((n for n in self.cpu if n not in self.pinned and not self.in_use[n]
                           and n not in self.slot_of), None)
            if victim is None:
                return  # everything is pinned or resident: the tier grows past its soft limit
            del self.cpu[victim]

    def _drop(self, name: str) -> None:
        self.cpu.pop(name, None)
        self.loading.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.slots[slot] = None

    def stats(self) -> dict:
        return {"resident": {n: s for n, s in self.slot_of.items()}, "cpu": list(self.cpu),
                "loading": list(self.loading), "failed": dict(self.failed), "pinned": sorted(self.pinned),
                "swaps": self.swaps}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

