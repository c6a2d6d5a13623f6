"""Building blocks: a linear layer with a per-row delta hook, RMSNorm."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# A delta hook adds to the layer's output in place: hook(x [T, in], y [T, out]) -> None. Multi-LoRA
# attaches one per projection; rows without an adapter pay nothing.
DeltaHook = Callable[[torch.Tensor, torch.Tensor], None]


class Linear(nn.Module):
    """y = x W^T + b, optionally fused from several projections (`output_sizes`), optionally nf4."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        out = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype), requires_grad=False) if bias else None
        self.quantized: nn.Module | None = None
        self.delta_hook: DeltaHook | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized(x) if self.quantized is not None else F.linear(x, self.weight, self.bias)
        if self.delta_hook is not None:
            self.delta_hook(x, y)
        return y

    def quantize_nf4(self, compute_dtype: torch.dtype) -> None:
        """Replaces the dense weight by a bitsandbytes nf4 Linear4bit (quantized when moved to the device)."""
        import bitsandbytes as bnb

        device = self.weight.device
        q = bnb.nn.Linear4bit(self.in_features, self.weight.shape[0], bias=self.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(self.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if self.bias is not None:
            q.bias = nn.Parameter(self.bias.data.to("cpu", compute_dtype), requires_grad=False)
        self.quantized = q.to(device)
        self.weight = nn.Parameter(torch.empty(0, dtype=compute_dtype, device=device), requires_grad=False)
        self.bias = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Half precision: normalise in fp32, scale in the model dtype (as the reference implementation does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
