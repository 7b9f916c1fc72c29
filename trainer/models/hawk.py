"""Hawk: the recurrent model of the Griffin paper (De et al., 2024), trained the Birdie way.

Top to bottom:

    token embedding
    n_layers x residual block
        x = x + RecurrentBlock(RMSNorm(x))
        x = x + GatedMLP(RMSNorm(x))                      GeGLU, hidden width 8/3 d_model
    RMSNorm, LM head (tied to the embedding)

RecurrentBlock (temporal mixing), width `rnn_width`:

    gate branch:       GeLU(W_gate x)
    recurrent branch:  W_in x -> causal depthwise conv (width 4) -> RG-LRU
    out = W_out(gate branch * recurrent branch)

RG-LRU, per channel, on the conv output x_t:

    r_t = sigmoid(W_a x_t + b_a)                          recurrence gate
    i_t = sigmoid(W_x x_t + b_x)                          input gate
    a_t = sigmoid(Lambda)^(c r_t), c = 8                  computed as log a_t = -c r_t softplus(-Lambda)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)

Packed rows hold several examples: the state is cut where an example starts (a_t = 0, and the
input multiplier is then 1, as Griffin does at document boundaries) and the conv drops taps that
would reach into the previous example.

Bidirectional model (Birdie §5): every other layer splits its recurrence channels in two. The
first half scans left to right over the whole row; the second half scans right to left with gate
and input zero outside the prefix, cut where the next position starts another example, so it
carries prefix information only and the suffix stays causal. Same parameters and FLOPs as the
causal model. Every recurrence goes through `trainer.scan`.

Decoding: `prefill(prefix)` reads an example's prefix exactly as training does, then
`step(token, state)` costs O(1) per token (one scan state and a 3-input conv buffer per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.common import (
    LayerState,
    RecurrentLM,
    SegmentCausalConv1d,
    SequenceMasks,
    direction_masks,
    gate_dtype,
    layer_is_bidirectional,
)
from trainer.scan import linear_scan, linear_scan_bidirectional


@dataclass(frozen=True)
class HawkConfig:
    vocab_size: int = 8192
    d_model: int = 768
    n_layers: int = 12
    bidirectional: bool = False
    rnn_width: int | None = None  # width of the recurrence; d_model when None
    conv_width: int = 4
    gate_exponent: float = 8.0  # c in a = sigmoid(Lambda)^(c r)
    mlp_expansion: float = 8 / 3
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "conv_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rnn_width is not None and self.rnn_width < 1:
            raise ValueError(f"rnn_width must be >= 1, got {self.rnn_width}")
        if self.bidirectional and self.width % 2:
            raise ValueError(f"a bidirectional model splits the recurrence in halves: rnn_width must be even, got {self.width}")

    @property
    def width(self) -> int:
        return self.d_model if self.rnn_width is None else self.rnn_width


class RGLRU(nn.Module):
    """Real-gated linear recurrent unit; channels [0, split) forward, [split, width) reverse."""

    def __init__(self, width: int, gate_exponent: float, split: int):
        super().__init__()
        self.width, self.split, self.gate_exponent = width, split, gate_exponent
        self.gates = nn.Linear(width, 2 * width)  # recurrence gate W_a | input gate W_x
        self.decay = nn.Parameter(torch.empty(width))  # Lambda
        self.reset_gates()

    def reset_gates(self) -> None:
        # Griffin: a^c uniform in [0.9, 0.999] at r = 1, i.e. Lambda = logit(u^(1/c)).
        with torch.no_grad():
            a_c = torch.empty(self.width).uniform_(0.9, 0.999)
            self.decay.copy_(torch.logit(a_c ** (1.0 / self.gate_exponent)))
            nn.init.zeros_(self.gates.bias)

    def coefficients(self, x: Tensor, masks: SequenceMasks) -> tuple[Tensor, Tensor]:
        """Scan gates a (float32/64) and inputs u (x's dtype), both (B, L, width)."""
        gate_keep, input_keep = direction_masks(masks, self.width, self.split)
        dtype = gate_dtype(x)
        r, i = torch.sigmoid(self.gates(x).to(dtype)).chunk(2, dim=-1)
        log_a = -self.gate_exponent * r * F.softplus(-self.decay.to(dtype))
        a = torch.where(gate_keep, log_a.exp(), 0.0)
        # sqrt(1 - a^2) keeps the state at unit scale; expm1 keeps it accurate for a near 1,
        # the clamp keeps sqrt's gradient finite. Where the gate is cut the state restarts from
        # the full input (multiplier 1).
        multiplier = torch.where(gate_keep, torch.sqrt((-torch.expm1(2.0 * log_a)).clamp_min(1e-12)), 1.0)
        u = torch.where(input_keep, multiplier * i * x.to(dtype), 0.0)
        return a, u.to(x.dtype)

    def scan(self, a: Tensor, u: Tensor) -> Tensor:
        if self.split == self.width:
            return linear_scan(a, u)
        return linear_scan_bidirectional(a, u, self.split)

    def flops_per_token(self) -> float:
        # gate matmul, and one multiply-add per channel in the scan
        return 2.0 * self.gates.weight.numel() + 2.0 * self.width


class RecurrentBlock(nn.Module):
    """Griffin's temporal-mixing block: GeLU gate branch times conv -> RG-LRU branch."""

    def __init__(self, d_model: int, width: int, conv_width: int, gate_exponent: float, bidirectional: bool):
        super().__init__()
        self.width = width
        self.bidirectional = bidirectional
        self.in_proj = nn.Linear(d_model, 2 * width, bias=False)  # gate branch | recurrent branch
        self.conv = SegmentCausalConv1d(width, conv_width)
        self.rg_lru = RGLRU(width, gate_exponent, split=width // 2 if bidirectional else width)
        self.out_proj = nn.Linear(width, d_model, bias=False)

    def reset_gates(self) -> None:
        self.rg_lru.reset_gates()

    def _mix(self, x: Tensor, masks: SequenceMasks) -> tuple[Tensor, Tensor, Tensor]:
        """(output, conv inputs, states) for a (B, L, d_model) input."""
        gate, recurrent_in = self.in_proj(x).chunk(2, dim=-1)
        a, u = self.rg_lru.coefficients(self.conv(recurrent_in, masks.offset), masks)
        h = self.rg_lru.scan(a, u)
        return self.out_proj(F.gelu(gate) * h), recurrent_in, h

    def forward(self, x: Tensor, masks: SequenceMasks) -> Tensor:
        return self._mix(x, masks)[0]

    def prefill(self, x: Tensor, masks: SequenceMasks) -> tuple[Tensor, LayerState]:
        """As `forward` on rows that are one example each; also the state after the last
        position. (Reverse channels are cut on every suffix token, so their state is never
        read again.)"""
        y, recurrent_in, h = self._mix(x, masks)
        return y, LayerState(scan=h[:, -1].to(gate_dtype(h)), conv=self.conv.buffer(recurrent_in))

    def init_state(self, batch_size: int, device, dtype: torch.dtype) -> LayerState:
        return LayerState(
            scan=torch.zeros(batch_size, self.width, device=device, dtype=torch.promote_types(dtype, torch.float32)),
            conv=torch.zeros(batch_size, self.conv.width - 1, self.width, device=device, dtype=dtype),
        )

    def step(self, x: Tensor, state: LayerState, masks: SequenceMasks) -> tuple[Tensor, LayerState]:
        """One suffix token (B, d_model); `masks` from `SequenceMasks.decode_step`."""
        gate, recurrent_in = self.in_proj(x).chunk(2, dim=-1)
        conv_out, conv_buffer = self.conv.step(recurrent_in, state.conv)
        a, u = self.rg_lru.coefficients(conv_out[:, None], masks)
        h = a[:, 0] * state.scan + u[:, 0]
        return self.out_proj(F.gelu(gate) * h.to(x.dtype)), LayerState(scan=h, conv=conv_buffer)

    def flops_per_token(self, seq_len: int) -> float:
        matmuls = 2.0 * (self.in_proj.weight.numel() + self.out_proj.weight.numel())
        return matmuls + self.conv.flops_per_token() + self.rg_lru.flops_per_token()


class HawkLM(RecurrentLM):
    """Hawk language model; `forward` takes the objective server's packed arrays."""

    def __init__(self, config: HawkConfig):
        mixers = [
            RecurrentBlock(
                config.d_model,
                config.width,
                config.conv_width,
                config.gate_exponent,
                bidirectional=layer_is_bidirectional(config.bidirectional, index),
            )
            for index in range(config.n_layers)
        ]
        super().__init__(config, mixers)

