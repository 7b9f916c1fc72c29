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

The module's forward (autograd, with a log-depth scan built from tensor ops) serves inference and
is the reference. `fit` trains with a hand-written backward pass (`_Trainer`, checked against
autograd by the tests): at tens of rows, autograd's per-op overhead cost as much as the matmuls, so
a step is the matmuls (MKL), the activations (PyTorch) and, for everything between them, the
compiled loops of `reward_kernels` (numba: no compiler needed on the server).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objective_server.policies import reward_kernels as kernels

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


class _LayerBuffers:
    """One layer's activations for a history of T rows, kept from the forward pass for the
    backward pass (and reused from step to step)."""

    def __init__(self, length: int, width: int, dtype: torch.dtype) -> None:
        def rows(columns: int) -> Tensor:
            return torch.empty(length, columns, dtype=dtype)

        self.normed, self.normalized, self.rstd = rows(width), rows(width), torch.empty(length, dtype=dtype)
        self.pre = rows(4 * width)  # pre-activations [i | z | o | f]
        self.input_gate, self.forget, self.output_gate = rows(width), rows(width), rows(width)
        self.states, self.gated = rows(width), rows(width)
        i, _, o, f = self.pre.split(width, dim=-1)
        self.i, self.o, self.f = i, o, f
        # NumPy views of the same memory for the compiled loops (made once: each costs a microsecond).
        self.np = {name: getattr(self, name).numpy() for name in (
            "normed", "normalized", "rstd", "pre", "input_gate", "forget", "output_gate", "states", "gated"
        )}


class _Trainer:
    """Full-batch MSE steps of a RewardModel with a hand-written backward pass.

    The same function as `F.mse_loss(model(rows[None])[0], targets)` and `backward()` (the tests
    check the gradients against autograd). Matmuls are PyTorch's (MKL), the activations PyTorch's
    vectorised sigmoid and GeLU, and everything else the compiled loops of `reward_kernels`, into
    buffers allocated once per history length; every gradient is written in place into one flat
    buffer (so the clipping norm is one reduction). At the history lengths of a run, autograd's
    step was mostly per-op overhead around matmuls of a few hundred microseconds."""

    def __init__(self, model: RewardModel, flat: Tensor | None = None) -> None:
        """With `flat` (the optimizer's one tensor, see `make_optimizer`), the parameters take their
        values into it and become views of it, and its gradient is the flat gradient buffer."""
        self.model = model
        self.params = list(model.parameters())
        self.flat = flat
        self.flat_grad = torch.zeros(_parameter_count(model), dtype=self.params[0].dtype)
        offset = 0
        for p in self.params:
            size = p.numel()
            if flat is not None:
                flat[offset : offset + size].copy_(p.detach().reshape(-1))
                p.data = flat[offset : offset + size].view_as(p)
            p.grad = self.flat_grad[offset : offset + size].view_as(p)
            offset += size
        if flat is not None:
            flat.grad = self.flat_grad
        # NumPy views of the parameters and gradients the compiled loops read and write (the
        # optimizer updates the same memory in place).
        def weight_and_grad(norm: nn.RMSNorm) -> tuple[np.ndarray, np.ndarray]:
            return norm.weight.detach().numpy(), norm.weight.grad.numpy()

        self._weights = [weight_and_grad(norm) for norm in model.norms]
        self._final = weight_and_grad(model.final_norm)
        self._inputs = [weight_and_grad(norm) for norm in (model.loss_norm, model.action_norm)]
        self._length = -1

    def release(self) -> None:
        for p in self.params:
            p.grad = None
        if self.flat is not None:
            self.flat.grad = None

    def _buffers(self, length: int, dtype: torch.dtype) -> None:
        if length == self._length:
            return
        k, width = self.model.num_configs, self.model.width
        self._layers = [_LayerBuffers(length, width, dtype) for _ in self.model.layers]
        self._embedded = torch.empty(length, 2 * k, dtype=dtype)
        self._input_hat = torch.empty(length, 2 * k, dtype=dtype)
        self._input_rstd = torch.empty(2, length, dtype=dtype)
        self._x, self._final_out, self._final_hat = (torch.empty(length, width, dtype=dtype) for _ in range(3))
        self._final_rstd = torch.empty(length, dtype=dtype)
        self._grad_x, self._grad_gated, self._grad_normed = (torch.empty(length, width, dtype=dtype) for _ in range(3))
        self._grad_pre = torch.empty(length, 4 * width, dtype=dtype)
        self._grad_embedded = torch.empty(length, 2 * k, dtype=dtype)
        self._carry = np.empty(width, dtype=self._grad_pre.numpy().dtype)
        self._no_input = np.empty((0, 2 * k), dtype=self._carry.dtype)
        self._length = length

    @torch.no_grad()
    def step(self, rows: Tensor, targets: Tensor) -> Tensor:
        """Forward and backward on rows (T, 2K), targets (T, K); fills every parameter's .grad;
        returns the MSE."""
        model = self.model
        k, width = model.num_configs, model.width
        length, dtype = rows.shape[0], rows.dtype
        self._buffers(length, dtype)
        rows_np, embedded = rows.numpy(), self._embedded.numpy()
        input_hat, input_rstd = self._input_hat.numpy(), self._input_rstd.numpy()
        for half, (norm, (weight, _)) in enumerate(zip((model.loss_norm, model.action_norm), self._inputs)):
            columns = slice(half * k, (half + 1) * k)
            kernels.rms_norm_forward(
                rows_np[:, columns], weight, norm.eps, embedded[:, columns], input_hat[:, columns], input_rstd[half]
            )
        x = torch.addmm(model.embed.bias, self._embedded, model.embed.weight.t(), out=self._x)
        x_np = x.numpy()
        for norm, layer, buffers, (weight, _) in zip(model.norms, model.layers, self._layers, self._weights):
            b = buffers.np
            kernels.rms_norm_forward(x_np, weight, norm.eps, b["normed"], b["normalized"], b["rstd"])
            torch.addmm(layer.gates.bias, buffers.normed, layer.gates.weight.t(), out=buffers.pre)
            torch.sigmoid(buffers.i, out=buffers.input_gate)
            torch.sigmoid(buffers.f, out=buffers.forget)
            aten.gelu.out(buffers.o, out=buffers.output_gate)
            kernels.gated_scan_forward(b["pre"], b["input_gate"], b["forget"], b["output_gate"], b["states"], b["gated"])
            x.addmm_(buffers.gated, layer.out.weight.t()).add_(layer.out.bias)
        final_weight, final_grad = self._final
        final_out, final_hat, final_rstd = self._final_out.numpy(), self._final_hat.numpy(), self._final_rstd.numpy()
        kernels.rms_norm_forward(x_np, final_weight, model.final_norm.eps, final_out, final_hat, final_rstd)
        error = torch.addmm(model.head.bias, self._final_out, model.head.weight.t()).sub_(targets)
        loss = torch.mean(error * error)

        grad_pred = error.mul_(2.0 / error.numel())  # d MSE / d prediction
        torch.mm(grad_pred.t(), self._final_out, out=model.head.weight.grad)
        torch.sum(grad_pred, dim=0, out=model.head.bias.grad)
        grad_final = torch.mm(grad_pred, model.head.weight, out=self._grad_normed).numpy()
        grad_x = self._grad_x
        kernels.rms_norm_backward(grad_final, final_hat, final_rstd, final_weight, final_grad, grad_x.numpy(), False)
        grad_gated, grad_normed, grad_pre = self._grad_gated, self._grad_normed, self._grad_pre
        grad_o = grad_pre[:, 2 * width : 3 * width]
        for layer, buffers, (weight, weight_grad) in zip(
            reversed(model.layers), reversed(self._layers), reversed(self._weights)
        ):
            b = buffers.np
            torch.mm(grad_x.t(), buffers.gated, out=layer.out.weight.grad)
            torch.sum(grad_x, dim=0, out=layer.out.bias.grad)
            torch.mm(grad_x, layer.out.weight, out=grad_gated)
            kernels.gated_scan_backward(
                grad_gated.numpy(), b["pre"], b["input_gate"], b["forget"], b["output_gate"], b["states"],
                grad_pre.numpy(), self._carry,
            )
            aten.gelu_backward.grad_input(grad_o, buffers.o, grad_input=grad_o)
            torch.mm(grad_pre.t(), buffers.normed, out=layer.gates.weight.grad)
            torch.sum(grad_pre, dim=0, out=layer.gates.bias.grad)
            torch.mm(grad_pre, layer.gates.weight, out=grad_normed)
            kernels.rms_norm_backward(
                grad_normed.numpy(), b["normalized"], b["rstd"], weight, weight_grad, grad_x.numpy(), True
            )
        torch.mm(grad_x.t(), self._embedded, out=model.embed.weight.grad)
        torch.sum(grad_x, dim=0, out=model.embed.bias.grad)
        grad_embedded = torch.mm(grad_x, model.embed.weight, out=self._grad_embedded).numpy()
        for half, (weight, weight_grad) in enumerate(self._inputs):  # only the norm weights need gradients
            columns = slice(half * k, (half + 1) * k)
            kernels.rms_norm_backward(
                grad_embedded[:, columns], input_hat[:, columns], input_rstd[half], weight, weight_grad,
                self._no_input, False,
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
    trainer = _Trainer(model, _flat_parameter(optimizer, model))
    try:
        for _ in range(steps):
            loss = trainer.step(rows, targets)
            trainer.clip(max_grad_norm)
            optimizer.step()
    finally:
        trainer.release()
    model.eval()
    return float(loss)


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: RewardModel, lr: float = 5e-4, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW over ONE flat tensor of all the model's parameters (every one decays): `fit` copies the
    parameters into it and makes them views of it. One tensor is one fused kernel a step with no
    per-parameter bookkeeping (about 0.3 ms a step less than 27 tensors), and its state is three
    tensors to store."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.optim.AdamW([flat], lr=lr, weight_decay=weight_decay, fused=True)


def flat_optimizer_state(per_parameter: dict) -> dict:
    """The state dict of a `make_optimizer` AdamW from that of an AdamW over the model's parameters
    one by one (in `model.parameters()` order, as policy states before v2 hold): the moments
    concatenated in that order, the one step count they all share."""
    (group,) = per_parameter["param_groups"]
    states = [per_parameter["state"][i] for i in group["params"] if i in per_parameter["state"]]
    flat_group = {**group, "params": [0]}
    if not states:  # never stepped
        return {"state": {}, "param_groups": [flat_group]}
    if len(states) != len(group["params"]) or len({float(s["step"]) for s in states}) != 1:
        raise ValueError("per-parameter optimizer state with missing or unequal steps cannot be flattened")
    flat = {
        "step": states[0]["step"].clone(),  # not the caller's tensor: the optimizer steps it in place
        **{key: torch.cat([s[key].reshape(-1) for s in states]) for key in ("exp_avg", "exp_avg_sq")},
    }
    return {"state": {0: flat}, "param_groups": [flat_group]}


def _flat_parameter(optimizer: torch.optim.Optimizer, model: nn.Module) -> Tensor:
    """The one tensor of an optimizer from `make_optimizer` for this model."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    first = next(model.parameters())
    if len(params) != 1 or params[0].numel() != _parameter_count(model) or params[0].dtype != first.dtype:
        raise ValueError("the optimizer must be make_optimizer(model) for this model: one flat tensor of its parameters")
    return params[0]


def warm_up() -> None:
    """Compiles the training step's loops (or loads them from numba's cache) with one step of a tiny
    float32 model: the Docker image does this at build time. Leaves the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        model = RewardModel(2, width=8, layers=1)
        fit(model, make_optimizer(model), torch.zeros(3, 4), torch.zeros(3, 2), steps=1)
