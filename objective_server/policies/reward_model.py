"""The Birdie reward model: a small gated SSM that reads the controller's history and predicts rewards.

The history is a sequence of rows `[loss_vector_t, action_t]` (width 2K): the per-configuration
validation losses at evaluation t and the mixture that ran from t to the next evaluation. The model
predicts, at every row, the K-dim reward vector that follows it (birdie-method.md §4).

Each layer is the paper's gated SSM:

    i = sigmoid(W_i x), z = W_z x, o = GeLU(W_o x), f = sigmoid(W_f x)
    h_t = f_t * h_{t-1} + i_t * z_t,   y = W_out(o * h)

in a pre-norm residual block. The loss half and the action half of each row get separate RMS norms:
losses are O(1..10) and actions O(1/K), and one norm over both would drown the action half.

To score many candidate actions after one shared history, `prefix_states` runs the history once and
`predict_next` runs only the final row for every candidate from the shared per-layer states. The
prediction read is the one AT the candidate's own row (never a padding position: the public
reference code read a padded position and every prediction was 0).

Torch only (no compiled extension): histories are at most a few hundred rows, and a log-depth scan
built from ordinary tensor ops is fast enough and differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _scan(gates: Tensor, inputs: Tensor) -> Tensor:
    """Hillis-Steele scan of h_t = gates_t * h_{t-1} + inputs_t over dim 1 (h_{-1} = 0): log2(T)
    rounds of whole-tensor ops instead of T small steps."""
    length = inputs.shape[1]
    states, carry = inputs, gates
    offset = 1
    while offset < length:
        # Element t now covers (t - 2*offset, t]: compose with the window ending at t - offset.
        states = torch.addcmul(states, carry, F.pad(states[:, :-offset], (0, 0, offset, 0)))
        if 2 * offset < length:
            carry = carry * F.pad(carry[:, :-offset], (0, 0, offset, 0), value=1.0)
        offset *= 2
    return states


class _LinearRecurrence(torch.autograd.Function):
    """The scan with a hand-written backward (itself a reverse scan): about 4x faster than letting
    autograd record every round, which matters at 200 training steps per evaluation."""

    @staticmethod
    def forward(ctx, gates: Tensor, inputs: Tensor) -> Tensor:  # type: ignore[override]
        states = _scan(gates, inputs)
        ctx.save_for_backward(gates, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        gates, states = ctx.saved_tensors
        # d inputs_t = g_t + gates_{t+1} * d inputs_{t+1};  d gates_t = d inputs_t * h_{t-1}.
        next_gates = F.pad(gates[:, 1:], (0, 0, 0, 1))
        grad_inputs = _scan(next_gates.flip(1), grad_states.flip(1)).flip(1)
        previous_states = F.pad(states[:, :-1], (0, 0, 1, 0))
        return grad_inputs * previous_states, grad_inputs


def linear_recurrence(gates: Tensor, inputs: Tensor, initial: Tensor | None = None) -> Tensor:
    """All states of h_t = gates_t * h_{t-1} + inputs_t over dim 1 of (B, T, W) tensors;
    `initial` (B, W) is h_{-1} (zeros if None). Differentiable."""
    if gates.shape != inputs.shape or gates.dim() != 3:
        raise ValueError(f"gates and inputs must be equal (B, T, W) shapes, got {tuple(gates.shape)}, {tuple(inputs.shape)}")
    if inputs.shape[1] == 0:
        return inputs
    if initial is not None:
        # Fold h_{-1} into the first input: h_0 = a_0 h_{-1} + x_0.
        inputs = torch.cat([inputs[:, :1] + gates[:, :1] * initial[:, None], inputs[:, 1:]], dim=1)
    return _LinearRecurrence.apply(gates, inputs)


class GatedSSM(nn.Module):
    """One gated SSM layer (width -> width)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.gates = nn.Linear(width, 4 * width)  # W_i, W_z, W_o, W_f fused into one matmul
        self.out = nn.Linear(width, width)

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        i, z, o, f = self.gates(x).chunk(4, dim=-1)
        return torch.sigmoid(f), torch.sigmoid(i) * z, F.gelu(o)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, W) -> outputs (B, T, W) and the final state (B, W)."""
        forget, update, output_gate = self._parts(x)
        states = linear_recurrence(forget, update)
        return self.out(output_gate * states), states[:, -1]

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One position for each of N rows (N, W) after the state (W,) or (N, W)."""
        forget, update, output_gate = self._parts(x)
        new_state = forget * state + update
        return self.out(output_gate * new_state), new_state


class RewardModel(nn.Module):
    """Predicts the K-dim reward vector that follows each `[losses, action]` row."""

    def __init__(self, num_configs: int, width: int = 256, layers: int = 4) -> None:
        super().__init__()
        if num_configs < 1 or width < 1 or layers < 1:
            raise ValueError(f"num_configs, width and layers must be >= 1, got {num_configs}, {width}, {layers}")
        self.num_configs = num_configs
        self.width = width
        self.loss_norm = nn.RMSNorm(num_configs, eps=1e-6)
        self.action_norm = nn.RMSNorm(num_configs, eps=1e-6)
        self.embed = nn.Linear(2 * num_configs, width)
        self.norms = nn.ModuleList(nn.RMSNorm(width, eps=1e-6) for _ in range(layers))
        self.layers = nn.ModuleList(GatedSSM(width) for _ in range(layers))
        self.final_norm = nn.RMSNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_configs)

    def _embed(self, rows: Tensor) -> Tensor:
        if rows.shape[-1] != 2 * self.num_configs:
            raise ValueError(f"rows must have width 2K = {2 * self.num_configs}, got {rows.shape[-1]}")
        losses, actions = rows.split(self.num_configs, dim=-1)
        return self.embed(torch.cat([self.loss_norm(losses), self.action_norm(actions)], dim=-1))

    def forward(self, rows: Tensor) -> Tensor:
        """(B, T, 2K) rows -> (B, T, K): the prediction at row t reads rows 0..t only (causal)."""
        x = self._embed(rows)
        for norm, layer in zip(self.norms, self.layers):
            y, _ = layer(norm(x))
            x = x + y
        return self.head(self.final_norm(x))

    @torch.no_grad()
    def prefix_states(self, rows: Tensor) -> Tensor:
        """The per-layer states (layers, W) after reading the history rows (T, 2K); zeros if T = 0."""
        if rows.dim() != 2:
            raise ValueError(f"history rows must be (T, 2K), got shape {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return torch.zeros(len(self.layers), self.width)
        x = self._embed(rows[None])
        states = []
        for norm, layer in zip(self.norms, self.layers):
            y, last = layer(norm(x))
            states.append(last[0])
            x = x + y
        return torch.stack(states)

    @torch.no_grad()
    def predict_next(self, states: Tensor, rows: Tensor) -> Tensor:
        """Predictions (N, K) at one new row per candidate (N, 2K), each following the shared history
        whose per-layer states are `states` (from `prefix_states`)."""
        if rows.dim() != 2:
            raise ValueError(f"candidate rows must be (N, 2K), got shape {tuple(rows.shape)}")
        x = self._embed(rows)
        for state, norm, layer in zip(states, self.norms, self.layers):
            y, _ = layer.step(norm(x), state)
            x = x + y
        return self.head(self.final_norm(x))


def fit(
    model: RewardModel,
    optimizer: torch.optim.Optimizer,
    rows: Tensor,
    targets: Tensor,
    steps: int,
    max_grad_norm: float = 1.0,
) -> float:
    """`steps` full-batch MSE steps on the whole history (rows (T, 2K), targets (T, K)), gradients
    clipped to norm `max_grad_norm`; returns the MSE of the last step's forward pass (NaN if
    steps = 0)."""
    if rows.shape[0] != targets.shape[0] or targets.shape[-1] != model.num_configs:
        raise ValueError(f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)} do not match")
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(rows[None])[0], targets)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    model.eval()
    return float(loss.detach())


def make_optimizer(model: RewardModel, lr: float = 5e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    # fused: one kernel per step over all parameters; about 4x faster than the loop on one CPU core.
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
