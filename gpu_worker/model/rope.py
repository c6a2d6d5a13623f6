"""Rotary position embeddings: default, linear, llama3 and yarn scaling.

Formulas follow the papers (RoFormer; Llama 3.1 report; YaRN, arXiv 2309.00071). The config may spell the
parameters in the old style (`rope_theta` + `rope_scaling`) or the new one (`rope_parameters`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gpu_worker.kernels import cpu_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_type: str = "default"
    params: tuple[tuple[str, float], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.params).get(key, default)


def rope_spec_from_config(cfg: dict) -> RopeSpec:
    """Reads both config spellings; raises ValueError for a scaling type we do not implement."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params.update(scaling)
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.rope_scaling.rope_type {rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    numeric = tuple(sorted((k, v) for k, v in params.items() if isinstance(v, (int, float))))
    return RopeSpec(theta=theta, rope_type=rope_type, params=numeric)


def inv_freq_and_scale(spec: RopeSpec, head_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Returns inv_freq [head_dim // 2] (float32) and the factor that multiplies cos and sin."""
    base = spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv_freq = 1.0 / base
    if spec.rope_type == "linear":
        return inv_freq / spec.get("factor", 1.0), 1.0
    if spec.rope_type == "llama3":
        return _llama3(inv_freq, spec), 1.0
    if spec.rope_type == "yarn":
        return _yarn(base, spec, head_dim, max_position)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    factor = spec.get("factor", 8.0)
    low, high = spec.get("low_freq_factor", 1.0), spec.get("high_freq_factor", 4.0)
    old_len = spec.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are interpolated, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn(base: torch.Tensor, spec: RopeSpec, head_dim: int, max_position: int):
    factor = spec.get("factor") or max_position / spec.get("original_max_position_embeddings")
    orig_len = spec.get("original_max_position_embeddings", max_position)
    beta_fast, beta_slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1
    theta = spec.theta

    def dim_for_rotations(rotations: float) -> float:
        return head_dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep
    scale = spec.get("attention_factor")
    if scale is None:
        mscale, mscale_all = spec.get("mscale"), spec.get("mscale_all_dim")
        scale = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else _yarn_mscale(factor, 1.0)
    return inv_freq, float(scale)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (neox / rotate-half layout)."""

    def __init__(self, spec: RopeSpec, head_dim: int, max_position: int, dtype: torch.dtype):
        super().__init__()
        inv_freq, scale = inv_freq_and_scale(spec, head_dim, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.register_buffer("cos", (emb.cos() * scale).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * scale).to(dtype), persistent=False)

    def lookup(self, positions: torch.Tensor):
        """What apply_ needs for a step's positions [T]; looked up once per step, shared by all layers.

        On the CPU with the native ops: the positions themselves (the kernel indexes the tables). Else:
        cos, sin [T, 1, D/2] (both halves of a table row are equal: emb = cat(freqs, freqs)).
        """
        if positions.device.type == "cpu" and cpu_ops.cpu_ops_available():
            return positions
        return self.tables(positions)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] of the positions: what the torch path of apply_ takes."""
        half = self.cos.shape[-1] // 2
        return self.cos[positions, :half].unsqueeze(1), self.sin[positions, :half].unsqueeze(1)

    def apply_(self, looked_up, x: torch.Tensor) -> None:
        """Rotates x [T, heads, D] in place (rotate-half layout): (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).

        x may be a strided view (q and k heads of a fused qkv output); in place avoids new [T, H, D]
        temporaries, which cost page faults on the CPU.
        """
        if isinstance(looked_up, torch.Tensor):
            cpu_ops.rotary_embedding_(looked_up, x, None, self.cos, self.sin)
            return
        cos, sin = looked_up
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        x1_sin = x1 * sin
        x1.mul_(cos).addcmul_(x2, sin, value=-1)
        x2.mul_(cos).add_(x1_sin)

