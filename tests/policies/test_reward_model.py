"""The gated-SSM reward model: its scan, causality, the shared-prefix candidate step, training."""

from __future__ import annotations

import copy

import pytest
import torch

from objective_server.policies.reward_model import (
    RewardModel,
    _Trainer,
    fit,
    flat_optimizer_state,
    linear_recurrence,
    make_optimizer,
)


def sequential(gates: torch.Tensor, inputs: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    state = torch.zeros_like(inputs[:, 0]) if initial is None else initial
    states = []
    for t in range(inputs.shape[1]):
        state = gates[:, t] * state + inputs[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 33, 200])
def test_scan_matches_the_sequential_recurrence(length: int) -> None:
    g = torch.Generator().manual_seed(length)
    gates = torch.rand(2, length, 5, generator=g, dtype=torch.float64)
    inputs = torch.randn(2, length, 5, generator=g, dtype=torch.float64)
    initial = torch.randn(2, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_recurrence(gates, inputs), sequential(gates, inputs))
    torch.testing.assert_close(linear_recurrence(gates, inputs, initial), sequential(gates, inputs, initial))


def test_scan_gradient_is_correct() -> None:
    g = torch.Generator().manual_seed(0)
    gates = torch.rand(1, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(1, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    initial = torch.randn(1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_recurrence, (gates, inputs, initial))


def test_scan_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        linear_recurrence(torch.rand(1, 4, 3), torch.rand(1, 5, 3))


def small_model(k: int = 5, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(k, width=32, layers=2).eval()


def test_predictions_are_causal() -> None:
    model = small_model()
    rows = torch.rand(1, 9, 10)
    changed = rows.clone()
    changed[0, 6:] = torch.rand(3, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(rows)[0, :6], model(changed)[0, :6])
        assert not torch.allclose(model(rows)[0, 6:], model(changed)[0, 6:])


def test_candidate_step_equals_the_full_forward_at_the_candidates_own_row() -> None:
    """The shared-prefix shortcut must read exactly what a full pass reads at the LAST row."""
    model = small_model()
    history = torch.rand(7, 10)
    candidates = torch.rand(4, 10)
    fast = model.predict_next(model.prefix_states(history), candidates)
    with torch.no_grad():
        for i in range(4):
            full = model(torch.cat([history, candidates[i : i + 1]])[None])[0, -1]
            torch.testing.assert_close(fast[i], full, rtol=1e-5, atol=1e-6)


def test_candidate_step_with_no_history_is_the_first_row() -> None:
    model = small_model()
    candidates = torch.rand(3, 10)
    fast = model.predict_next(model.prefix_states(torch.zeros(0, 10)), candidates)
    with torch.no_grad():
        torch.testing.assert_close(fast, model(candidates[:, None])[:, 0])


def test_predictions_depend_on_the_action_half() -> None:
    """Separate RMS norms: the O(1/K) action half must not vanish next to the O(1) losses."""
    model = small_model()
    losses = torch.full((2, 5), 3.0)
    actions = torch.tensor([[0.96, 0.01, 0.01, 0.01, 0.01], [0.01, 0.01, 0.01, 0.01, 0.96]])
    out = model.predict_next(model.prefix_states(torch.zeros(0, 10)), torch.cat([losses, actions], dim=1))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_fit_learns_the_history() -> None:
    model = small_model(k=3)
    optimizer = make_optimizer(model, lr=3e-3)
    g = torch.Generator().manual_seed(1)
    rows = torch.rand(12, 6, generator=g)
    targets = torch.tanh(rows[:, 3:] * 3 - 1)  # reward grows with the action share
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(model(rows[None])[0], targets).item()
    after = fit(model, optimizer, rows, targets, steps=150)
    assert after < before / 10
    assert not model.training


def test_wrong_widths_are_errors() -> None:
    model = small_model(k=5)
    with pytest.raises(ValueError, match="2K"):
        model(torch.rand(1, 3, 8))
    with pytest.raises(ValueError):
        RewardModel(0)
    with pytest.raises(ValueError):
        fit(model, make_optimizer(model), torch.rand(4, 10), torch.rand(3, 5), steps=1)


def autograd_gradients(model: RewardModel, rows: torch.Tensor, targets: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """The MSE and its gradients by autograd, on a copy (the model's .grad belong to the trainer)."""
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = None
    loss = torch.nn.functional.mse_loss(model(rows[None])[0], targets)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    ("length", "k", "width"), [(1, 4, 16), (2, 4, 16), (3, 4, 16), (9, 4, 16), (33, 4, 16), (9, 11, 20)]
)
def test_training_step_gradients_equal_autograd(length: int, k: int, width: int) -> None:
    """fit's hand-written backward pass must be exactly the model's MSE gradient, at every step
    (its buffers are reused from step to step), and with forget gates at 0 and 1. Widths that are
    not a multiple of the compiled row sums' lanes (K = 11, width 20) take their tail loops."""

    torch.manual_seed(length)
    model = RewardModel(k, width=width, layers=2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        # Saturate some forget gates (pre-activations around -60 and +60).
        model.layers[0].gates.bias[-16:-12] = -60.0
        model.layers[1].gates.bias[-4:] = 60.0
    rows = torch.rand(length, 2 * k, dtype=torch.float64) * 3
    targets = torch.randn(length, k, dtype=torch.float64)
    trainer = _Trainer(model)
    for _ in range(2):
        expected_loss, expected = autograd_gradients(model, rows, targets)
        loss = trainer.step(rows, targets)
        assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
        for (name, p), want in zip(model.named_parameters(), expected):
            torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12, msg=name)
        with torch.no_grad():  # a different point for the second step
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    trainer.release()
    assert all(p.grad is None for p in model.parameters())


def test_fit_clips_the_gradient_norm_like_torch() -> None:
    """One fit step equals zero_grad / backward / clip_grad_norm_ / step done with autograd."""
    torch.manual_seed(3)
    reference, model = RewardModel(3, width=16, layers=2), RewardModel(3, width=16, layers=2)
    model.load_state_dict(reference.state_dict())
    rows, targets = torch.rand(6, 6) * 4, torch.randn(6, 3) * 10  # large errors: clipping is active
    optimizer = make_optimizer(model)  # one flat tensor; the reference is torch's per-parameter AdamW
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=5e-4, weight_decay=0.1)
    loss = torch.nn.functional.mse_loss(reference(rows[None])[0], targets)
    loss.backward()
    assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0) > 1.0
    reference_optimizer.step()
    assert fit(model, optimizer, rows, targets, steps=1) == pytest.approx(loss.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_fit_on_an_empty_history_is_an_error() -> None:
    model = small_model(k=2)
    with pytest.raises(ValueError, match="empty"):
        fit(model, make_optimizer(model), torch.zeros(0, 4), torch.zeros(0, 2), steps=1)


def test_fit_resumes_exactly_from_a_saved_model_and_optimizer() -> None:
    """Five steps in one go equal three steps, a save and load into a new model and optimizer, and
    two more: bit for bit (the policy's replicas continue each other this way)."""
    torch.manual_seed(4)
    rows, targets = torch.rand(8, 6) * 3, torch.randn(8, 3)
    straight = RewardModel(3, width=16, layers=2)
    first = copy.deepcopy(straight)
    fit(straight, make_optimizer(straight), rows, targets, steps=5)

    optimizer = make_optimizer(first)
    fit(first, optimizer, rows, targets, steps=3)
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    resumed = RewardModel(3, width=16, layers=2)
    resumed_optimizer = make_optimizer(resumed)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    fit(resumed, resumed_optimizer, rows, targets, steps=2)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_fit_needs_the_models_own_flat_optimizer() -> None:
    model, other = small_model(k=3), small_model(k=4)
    rows, targets = torch.rand(4, 6), torch.rand(4, 3)
    for optimizer in (torch.optim.AdamW(model.parameters()), make_optimizer(other)):
        with pytest.raises(ValueError, match="make_optimizer"):
            fit(model, optimizer, rows, targets, steps=1)


def test_flat_optimizer_state_from_per_parameter_adamw() -> None:
    """The conversion of an older per-parameter AdamW state continues training as that optimizer
    would (to float32 rounding: autograd there, the hand-written backward here), keeps a
    never-stepped state empty, and refuses parameters at different step counts."""
    torch.manual_seed(6)
    rows, targets = torch.rand(5, 6), torch.randn(5, 3)
    reference = RewardModel(3, width=16, layers=2)
    model = copy.deepcopy(reference)
    per_parameter = torch.optim.AdamW(reference.parameters(), lr=5e-4, weight_decay=0.1, fused=True)
    assert flat_optimizer_state(per_parameter.state_dict())["state"] == {}
    for _ in range(3):  # three per-parameter steps, as a v1 policy state holds them
        per_parameter.zero_grad()
        torch.nn.functional.mse_loss(reference(rows[None])[0], targets).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        per_parameter.step()
    model.load_state_dict(reference.state_dict())
    optimizer = make_optimizer(model)
    optimizer.load_state_dict(flat_optimizer_state(per_parameter.state_dict()))
    fit(model, optimizer, rows, targets, steps=1)
    per_parameter.zero_grad()
    torch.nn.functional.mse_loss(reference(rows[None])[0], targets).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    per_parameter.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)

    state = per_parameter.state_dict()
    state["state"][1]["step"] = state["state"][1]["step"] + 1
    with pytest.raises(ValueError, match="unequal steps"):
        flat_optimizer_state(state)
