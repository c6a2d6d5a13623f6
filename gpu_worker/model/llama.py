"""One decoder for the Llama, Qwen2 and Mistral families (RMSNorm, RoPE, GQA, SwiGLU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.attention import AttentionMetadata, paged_attention
from gpu_worker.kernels.cpu_ops import add_rms_norm_
from gpu_worker.model.layers import Linear, RMSNorm
from gpu_worker.model.rope import RopeSpec, RotaryEmbedding

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope: RopeSpec
    qkv_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None = None


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(args.hidden_size, [q_size, kv_size, kv_size], args.qkv_bias, dtype)
        self.o_proj = Linear(q_size, [args.hidden_size], False, dtype)
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos_sin, kv_cache, meta: AttentionMetadata):
        # x: [T, hidden] -> q: [T, H, D], k/v: [T, Hkv, D]
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # q and k heads are adjacent in the fused output: rotate them together, in place.
        self.rotary.apply_(cos_sin, qkv[:, : q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                                    self.head_dim))
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size: q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = Linear(args.hidden_size, [args.intermediate_size] * 2, False, dtype)
        self.down_proj = Linear(args.intermediate_size, [args.hidden_size], False, dtype)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        # In place on the gate half: no new [T, intermediate] tensor (down_proj reads the strided view).
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.self_attn = Attention(args, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.mlp = MLP(args, dtype)

    def forward(self, x, residual, cos_sin, kv_cache, meta):
        """x: the previous layer's MLP output (or the embeddings when residual is None); residual: the
        stream before that output was added. Returns (this layer's MLP output, the stream before it)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:  # residual += x; x = norm(residual), in one pass
            add_rms_norm_(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        x = self.self_attn(x, cos_sin, kv_cache, meta)
        add_rms_norm_(x, residual, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype):
        super().__init__()
        self.args = args
        rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position, dtype)
        self.rotary = rotary
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(args, rotary, dtype) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        tied = args.tie_word_embeddings
        self.lm_head = None if tied else Linear(args.hidden_size, [args.vocab_size], False, dtype)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [T]; kv_caches[i]: (k, v) each [num_blocks, block_size, Hkv, D]
        x, residual = self.embed_tokens(input_ids), None
        cos_sin = self.rotary.lookup(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos_sin, kv_cache, meta)
        return residual.add_(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] (only the rows that sample) -> [N, V] float32
        hidden = self.norm(hidden)
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def linear_layers(self) -> dict[str, Linear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Linear)}
