"""The Birdie paper's gated SSM: a gated linear recurrence with input-dependent forget gate.

Top to bottom:

    token embedding
    n_layers x residual block
        x = x + GatedSSM(RMSNorm(x))
        x = x + GatedMLP(RMSNorm(x))                      GeGLU, hidden width 8/3 d_model
    RMSNorm, LM head (tied to the embedding)

GatedSSM, state width `state_width`, one input projection for the four branches:

    i_t = sigmoid(W_i x_t)        input gate
    z_t = W_z x_t                 candidate
    o_t = GeLU(W_o x_t)           output gate
    f_t = sigmoid(W_f x_t)        forget gate
    h_t = f_t h_{t-1} + i_t z_t
    y_t = W_out(o_t h_t)

In packed rows the state is cut where an example starts (f = 0). Bidirectional models split the
state of every other layer: the first half scans left to right, the second half right to left
with forget gate and input zero outside the prefix and cut at example starts (Birdie §5), so
the suffix stays causal. Every recurrence goes through `trainer.scan`.

Decoding: `prefill(prefix)` as in training, then `step(token, state)` at O(1) per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.common import (
    LayerState,
    RecurrentLM,
    SequenceMasks,
    direction_masks,
    gate_dtype,
    layer_is_bidirectional,
)
from trainer.scan import linear_scan, linear_scan_bidirectional


@dataclass(frozen=True)
class GatedSSMConfig:
    vocab_size: int = 8192
    d_model: int = 768
    n_layers: int = 12
    bidirectional: bool = False
    state_width: int | None = None  # width of the recurrence; d_model when None
    mlp_expansion: float = 8 / 3
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.state_width is not None and self.state_width < 1:
            raise ValueError(f"state_width must be >= 1, got {self.state_width}")
        if self.bidirectional and self.width % 2:
            raise ValueError(f"a bidirectional model splits the state in halves: state_width must be even, got {self.width}")

    @property
    def width(self) -> int:
        return self.d_model if self.state_width is None else self.state_width


class GatedSSM(nn.Module):
    """h = f h + i z, y = W_out(o h); channels [0, split) forward, [split, width) reverse."""

    def __init__(self, d_model: int, width: int, bidirectional: bool):
        super().__init__()
        self.width = width
        self.split = width // 2 if bidirectional else width
        # Two projections so that the optimiser can tell them apart: the recurrence's gates
        # (input i, forget f) take no weight decay, the value z and the output branch o do.
        self.in_proj = nn.Linear(d_model, 2 * width)  # z | o
        self.gates = nn.Linear(d_model, 2 * width)  # i | f
        self.out_proj = nn.Linear(width, d_model, bias=False)
        self.reset_gates()

    def reset_gates(self) -> None:
        # Forget gates start at 0.9 .. 0.999 (for a zero input) so that information persists
        # from the first step; the other biases start at zero.
        with torch.no_grad():
            nn.init.zeros_(self.in_proj.bias)
            nn.init.zeros_(self.gates.bias)
            forget = torch.empty(self.width).uniform_(0.9, 0.999)
            self.gates.bias[self.width :] = torch.logit(forget)

    def coefficients(self, x: Tensor, masks: SequenceMasks) -> tuple[Tensor, Tensor, Tensor]:
        """Scan gates a = f (float32/64), inputs u = i z and output gate o, each (B, L, width)."""
        gate_keep, input_keep = direction_masks(masks, self.width, self.split)
        z, o = self.in_proj(x).chunk(2, dim=-1)
        i, f = self.gates(x).chunk(2, dim=-1)
        a = torch.where(gate_keep, torch.sigmoid(f.to(gate_dtype(f))), 0.0)
        u = torch.where(input_keep, torch.sigmoid(i) * z, 0.0)
        return a, u, F.gelu(o)

    def _scan(self, a: Tensor, u: Tensor) -> Tensor:
        if self.split == self.width:
            return linear_scan(a, u)
        return linear_scan_bidirectional(a, u, self.split)

    def _mix(self, x: Tensor, masks: SequenceMasks) -> tuple[Tensor, Tensor]:
        a, u, o = self.coefficients(x, masks)
        h = self._scan(a, u)
        return self.out_proj(o * h), h

    def forward(self, x: Tensor, masks: SequenceMasks) -> Tensor:
        return self._mix(x, masks)[0]

    def prefill(self, x: Tensor, masks: SequenceMasks) -> tuple[Tensor, LayerState]:
        """As `forward` on rows that are one example each; also the state after the last
        position (the reverse half is cut on every suffix token and never read again)."""
        y, h = self._mix(x, masks)
        return y, LayerState(scan=h[:, -1].to(gate_dtype(h)))

    def init_state(self, batch_size: int, device, dtype: torch.dtype) -> LayerState:
        return LayerState(scan=torch.zeros(batch_size, self.width, device=device, dtype=torch.promote_types(dtype, torch.float32)))

    def step(self, x: Tensor, state: LayerState, masks: SequenceMasks) -> tuple[Tensor, LayerState]:
        """One suffix token (B, d_model); `masks` from `SequenceMasks.decode_step`."""
        a, u, o = self.coefficients(x[:, None], masks)
        h = a[:, 0] * state.scan + u[:, 0]
        return self.out_proj(o[:, 0] * h.to(x.dtype)), LayerState(scan=h)

    def flops_per_token(self, seq_len: int) -> float:
        # projections, and one multiply-add per channel in the scan
        projections = self.in_proj.weight.numel() + self.gates.weight.numel() + self.out_proj.weight.numel()
        return 2.0 * projections + 2.0 * self.width


class GatedSSMLM(RecurrentLM):
    """Gated-SSM language model; `forward` takes the objective server's packed arrays."""

    def __init__(self, config: GatedSSMConfig):
        mixers = [
            GatedSSM(config.d_model, config.width, bidirectional=layer_is_bidirectional(config.bidirectional, index))
            for index in range(config.n_layers)
        ]
        super().__init__(config, mixers)
