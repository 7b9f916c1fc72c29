"""A prefix-LM Transformer: the upper bound the SSMs are compared with.

Top to bottom:

    token embedding
    n_layers x residual block
        x = x + Attention(RMSNorm(x))                     multi-head, RoPE from position_ids
        x = x + GatedMLP(RMSNorm(x))                      GeGLU, hidden width 8/3 d_model
    RMSNorm, LM head (tied to the embedding)

Attention from query q to key k is allowed iff q and k are in the same example and (k <= q, or
both are in the prefix when the model is bidirectional): packed examples never see each other,
the prefix is read bidirectionally and the suffix causally (Birdie §3). The mask is one boolean
(B, 1, L, L) matrix handed to `F.scaled_dot_product_attention`, built once per forward pass.
RoPE positions come from `position_ids`, which restart at 0 in every example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.common import LanguageModel, SequenceMasks, attention_allowed


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 8192
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    bidirectional: bool = False  # prefix-LM attention when True, plain causal when False
    rope_base: float = 10000.0
    mlp_expansion: float = 8 / 3
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of even width (RoPE rotates pairs)"
            )


@dataclass(frozen=True)
class AttentionContext:
    """What every attention layer reads, computed once per forward pass."""

    allowed: Tensor  # bool (B, 1, L, L)
    cos: Tensor  # (B, 1, L, head_dim / 2)
    sin: Tensor


def rope_angles(position_ids: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of position * base^(-2j / head_dim), j < head_dim / 2, as (B, 1, L, head_dim / 2)."""
    dtype = torch.promote_types(dtype, torch.float32)
    inverse_frequency = base ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=dtype) / head_dim)
    angles = position_ids.to(dtype)[:, None, :, None] * inverse_frequency
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (first half, second half) pairs of x (B, H, L, head_dim) by the angles."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, context: AttentionContext) -> Tensor:
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, context.cos, context.sin), apply_rope(k, context.cos, context.sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=context.allowed)
        return self.out_proj(y.transpose(1, 2).reshape(batch, length, d_model))

    def flops_per_token(self, seq_len: int) -> float:
        # projections, plus q.k and p.v over the whole L x L matrix (the masked kernel computes it all)
        d_model = self.out_proj.weight.shape[0]
        return 2.0 * (self.qkv.weight.numel() + self.out_proj.weight.numel()) + 4.0 * seq_len * d_model


class TransformerLM(LanguageModel):
    """Prefix-LM Transformer; `forward` takes the objective server's packed arrays."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config, [Attention(config.d_model, config.n_heads) for _ in range(config.n_layers)])

    def layer_context(self, masks: SequenceMasks) -> AttentionContext:
        head_dim = self.config.d_model // self.config.n_heads
        cos, sin = rope_angles(masks.position_ids, head_dim, self.config.rope_base, self.embed.weight.dtype)
        return AttentionContext(attention_allowed(masks, self.config.bidirectional), cos, sin)
