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
built from ordinary tensor ops is fast enough. The module's forward (autograd) serves inference and
is the reference; `fit` trains with a hand-written backward pass (`_Trainer`, checked against
autograd by the tests), because at tens of rows autograd's per-op overhead cost as much as the
matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

aten = torch.ops.aten  # the out= forms of the activation backwards


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


def _rms_norm(x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RMSNorm over the last dim as nn.RMSNorm computes it: (output, x / rms, 1 / rms)."""
    rstd = torch.mean(x * x, dim=-1, keepdim=True).add_(eps).rsqrt_()
    normalized = x * rstd
    return torch.mul(normalized, weight, out=out), normalized, rstd


def _rms_norm_backward(grad_out: Tensor, normalized: Tensor, rstd: Tensor, weight: Tensor, grad_weight: Tensor) -> Tensor:
    """Writes d weight into `grad_weight`; returns d input = rstd * (g - x_hat * mean(g * x_hat))
    with g = grad_out * weight."""
    product = grad_out * normalized
    torch.sum(product, dim=0, out=grad_weight)
    mean = torch.mv(product, weight).div_(weight.shape[0]).unsqueeze_(1)
    return (grad_out * weight).addcmul_(normalized, mean, value=-1.0).mul_(rstd)


class _ScanBuffer:
    """The Hillis-Steele scan of `_scan` over dim 0 of (T, W) rows, in one reusable buffer.

    Three slots of (carry, state) lines, each with a margin of P rows (P: the largest offset) that
    holds the shifted-in values (carry 1, state 0), so a round is two whole-tensor ops and no
    padding: new (carry, state) = carry * shifted (carry, state), then state += old state. Slot 0
    holds the gates and inputs (the caller writes them in place; rounds never overwrite them);
    rounds alternate between slots 1 and 2. `reverse` scans from the end (margin after the rows).
    Every view is made once: at tens of rows, indexing costs as much as the arithmetic."""

    def __init__(self, length: int, width: int, dtype: torch.dtype, reverse: bool) -> None:
        margin = 1 << ((length - 1).bit_length() - 1) if length > 1 else 1
        buffer = torch.empty(3, 2, length + margin, width, dtype=dtype)
        rows = slice(0, length) if reverse else slice(margin, None)
        margins = slice(length, None) if reverse else slice(0, margin)
        buffer[:, 0, margins].fill_(1.0)
        buffer[:, 1, margins].zero_()

        def shifted(slot: int, offset: int) -> Tensor:  # rows t - offset (t + offset if reverse)
            start = offset if reverse else margin - offset
            return buffer[slot, :, start : start + length]

        self.gates, self.inputs = buffer[0, 0, rows], buffer[0, 1, rows]
        self.rounds: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []
        source, offset = 0, 1
        while offset < length:
            target = 2 if source == 1 else 1
            if 2 * offset < length:  # the carry is needed again
                multiply = (shifted(source, offset), buffer[target, :, rows])
            else:
                multiply = (shifted(source, offset)[1], buffer[target, 1, rows])
            self.rounds.append((*multiply, buffer[source, 0, rows], buffer[target, 1, rows], buffer[source, 1, rows]))
            source, offset = target, 2 * offset
        self.states = buffer[source, 1, rows]
        self.previous_states = shifted(source, 1)[1]  # h one row earlier (later if reverse), 0 shifted in

    def run(self) -> Tensor:
        """All states h (T, W) of the gates and inputs written into `gates` and `inputs`."""
        for shifted, product, carry, state, old_state in self.rounds:
            torch.mul(shifted, carry, out=product)
            state.add_(old_state)
        return self.states


class _Trainer:
    """Full-batch MSE steps of a RewardModel with a hand-written backward pass.

    The same function as `F.mse_loss(model(rows[None])[0], targets)` and `backward()` (the tests
    check the gradients against autograd), but without autograd's per-op bookkeeping, with the
    scans in preallocated buffers and every gradient written in place into one flat buffer (so the
    clipping norm is one reduction). At the history lengths of a run (tens to a few hundred rows)
    the autograd step was mostly overhead around matmuls of a few hundred microseconds."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.params = list(model.parameters())
        sizes = [p.numel() for p in self.params]
        self.flat_grad = torch.zeros(sum(sizes), dtype=self.params[0].dtype)
        offset = 0
        for p, size in zip(self.params, sizes):
            p.grad = self.flat_grad[offset : offset + size].view_as(p)
            offset += size

        self._length = -1

    def release(self) -> None:
        for p in self.params:
            p.grad = None

    def _buffers(self, length: int, dtype: torch.dtype) -> None:
        """Scan buffers for this history length, kept across steps: one per layer forward (its
        states are read again in the backward pass), one reverse scan shared by the backward."""
        if length == self._length:
            return
        width = self.model.width
        self._forward_scans = [_ScanBuffer(length, width, dtype, reverse=False) for _ in self.model.layers]
        self._reverse_scan = _ScanBuffer(length, width, dtype, reverse=True)
        self._reverse_scan.gates[-1:].fill_(1.0)  # the last carry only ever meets shifted-in zeros
        self._length = length

    @torch.no_grad()
    def step(self, rows: Tensor, targets: Tensor) -> Tensor:
        """Forward and backward on rows (T, 2K), targets (T, K); fills every parameter's .grad;
        returns the MSE."""
        model = self.model
        k, width = model.num_configs, model.width
        length, dtype = rows.shape[0], rows.dtype
        self._buffers(length, dtype)
        losses, actions = rows.split(k, dim=-1)
        embedded_in = torch.empty(length, 2 * k, dtype=dtype)
        _, loss_hat, loss_rstd = _rms_norm(losses, model.loss_norm.weight, model.loss_norm.eps, embedded_in[:, :k])
        _, action_hat, action_rstd = _rms_norm(
            actions, model.action_norm.weight, model.action_norm.eps, embedded_in[:, k:]
        )
        x = torch.addmm(model.embed.bias, embedded_in, model.embed.weight.t())
        saved = []
        for norm, layer, scan in zip(model.norms, model.layers, self._forward_scans):
            normed, normalized, rstd = _rms_norm(x, norm.weight, norm.eps)
            pre = torch.addmm(layer.gates.bias, normed, layer.gates.weight.t())
            i, z, o, f = pre.split(width, dim=-1)
            forget = torch.sigmoid(f, out=scan.gates)
            input_gate = torch.sigmoid(i)
            torch.mul(input_gate, z, out=scan.inputs)
            output_gate = F.gelu(o)
            states, previous_states = scan.run(), scan.previous_states
            gated = output_gate * states
            x = x.addmm_(gated, layer.out.weight.t()).add_(layer.out.bias)  # x itself is not saved
            saved.append((normed, normalized, rstd, pre, input_gate, forget, output_gate, states, previous_states, gated))
        final_out, final_hat, final_rstd = _rms_norm(x, model.final_norm.weight, model.final_norm.eps)
        error = torch.addmm(model.head.bias, final_out, model.head.weight.t()).sub_(targets)
        loss = torch.mean(error * error)

        grad_pred = error.mul_(2.0 / error.numel())  # d MSE / d prediction
        torch.mm(grad_pred.t(), final_out, out=model.head.weight.grad)
        torch.sum(grad_pred, dim=0, out=model.head.bias.grad)
        grad_x = _rms_norm_backward(
            grad_pred @ model.head.weight, final_hat, final_rstd, model.final_norm.weight, model.final_norm.weight.grad
        )
        grad_pre = torch.empty(length, 4 * width, dtype=dtype)
        grad_i, grad_z, grad_o, grad_f = grad_pre.split(width, dim=-1)  # written in place below
        for norm, layer, layer_saved in zip(reversed(model.norms), reversed(model.layers), reversed(saved)):
            normed, normalized, rstd, pre, input_gate, forget, output_gate, states, previous_states, gated = layer_saved
            torch.mm(grad_x.t(), gated, out=layer.out.weight.grad)
            torch.sum(grad_x, dim=0, out=layer.out.bias.grad)
            grad_gated = grad_x @ layer.out.weight
            # The scan's backward is a reverse scan: d u_t = d h_t + f_{t+1} d u_{t+1}, and
            # d f_t = d u_t h_{t-1}.
            reverse = self._reverse_scan
            reverse.gates[:-1].copy_(forget[1:])
            torch.mul(grad_gated, output_gate, out=reverse.inputs)
            grad_update = reverse.run()
            _, z, o, _ = pre.split(width, dim=-1)
            aten.sigmoid_backward.grad_input(grad_update * z, input_gate, grad_input=grad_i)
            torch.mul(grad_update, input_gate, out=grad_z)
            aten.gelu_backward.grad_input(grad_gated * states, o, grad_input=grad_o)
            aten.sigmoid_backward.grad_input(grad_update * previous_states, forget, grad_input=grad_f)
            torch.mm(grad_pre.t(), normed, out=layer.gates.weight.grad)
            torch.sum(grad_pre, dim=0, out=layer.gates.bias.grad)
            grad_x.add_(_rms_norm_backward(grad_pre @ layer.gates.weight, normalized, rstd, norm.weight, norm.weight.grad))
        torch.mm(grad_x.t(), embedded_in, out=model.embed.weight.grad)
        torch.sum(grad_x, dim=0, out=model.embed.bias.grad)
        grad_embedded = grad_x @ model.embed.weight
        _rms_norm_backward(grad_embedded[:, :k], loss_hat, loss_rstd, model.loss_norm.weight, model.loss_norm.weight.grad)
        _rms_norm_backward(
            grad_embedded[:, k:], action_hat, action_rstd, model.action_norm.weight, model.action_norm.weight.grad
        )
        return loss

    def clip(self, max_norm: float) -> None:
        """As nn.utils.clip_grad_norm_: scale all gradients by max_norm / (norm + 1e-6) if below 1."""
        coefficient = max_norm / (float(torch.linalg.vector_norm(self.flat_grad)) + 1e-6)
        if coefficient < 1.0:
            self.flat_grad.mul_(coefficient)


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
    if rows.shape[0] == 0 and steps > 0:
        raise ValueError("cannot fit the reward model on an empty history")
    model.train()
    loss = torch.tensor(float("nan"))
    trainer = _Trainer(model)
    try:
        for _ in range(steps):
            loss = trainer.step(rows, targets)
            trainer.clip(max_grad_norm)
            optimizer.step()
    finally:
        trainer.release()
    model.eval()
    return float(loss)


def make_optimizer(model: RewardModel, lr: float = 5e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    # fused: one kernel per step over all parameters; about 4x faster than the loop on one CPU core.
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
