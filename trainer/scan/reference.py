"""Pure-PyTorch linear scan: the readable definition the compiled backends are tested against.

`linear_scan_reference` is a plain loop over time, differentiable by ordinary autograd; run
it in float64 for tests. `scan_forward` / `scan_backward` are the same computation and its
hand-derived gradient, written for the fallback backend of the custom op (no autograd
graph, accumulation in the gates' dtype, outputs in the inputs' dtype).

Direction is per channel: channels [0, split) run left to right, [split, D) right to left.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _scan_left_to_right(a: Tensor, x: Tensor, h0: Tensor | None) -> Tensor:
    """h_t = a_t * h_{t-1} + x_t over dim 1, returned stacked as (B, T, D)."""
    state = torch.zeros_like(x[:, 0]) if h0 is None else h0
    states = []
    # unbind, not a[:, t]: the backward of T indexing ops would allocate T full-size
    # gradients (quadratic in T); unbind's backward is one stack
    for a_t, x_t in zip(a.unbind(1), x.unbind(1)):
        state = a_t * state + x_t
        states.append(state)
    return torch.stack(states, dim=1)


def _split_directions(split: int, d: int) -> tuple[slice, slice]:
    if not 0 <= split <= d:
        raise ValueError(f"split must lie in [0, D={d}], got {split}")
    return slice(0, split), slice(split, d)


def linear_scan_reference(
    a: Tensor,
    x: Tensor,
    reverse: bool = False,
    initial_state: Tensor | None = None,
    *,
    split: int | None = None,
) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + x_t (or its right-to-left mirror if `reverse`).

    (B, T, D) in, (B, T, D) out, computed in the promoted dtype of the arguments. `split`
    overrides `reverse`: channels [0, split) forward, [split, D) reverse.
    """
    d = x.shape[-1]
    if split is None:
        split = 0 if reverse else d
    fwd, rev = _split_directions(split, d)
    h0 = initial_state
    parts = []
    if split > 0:
        h0_fwd = None if h0 is None else h0[..., fwd]
        parts.append(_scan_left_to_right(a[..., fwd], x[..., fwd], h0_fwd))
    if split < d:
        flipped = _scan_left_to_right(
            a[..., rev].flip(1), x[..., rev].flip(1), None if h0 is None else h0[..., rev]
        )
        parts.append(flipped.flip(1))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def scan_forward(a: Tensor, x: Tensor, h0: Tensor | None, split: int) -> Tensor:
    """States in x's dtype, accumulated in a's dtype (float32 or float64)."""
    with torch.no_grad():
        h = linear_scan_reference(a, x.to(a.dtype), initial_state=h0, split=split)
    return h.to(x.dtype).contiguous()


def _backward_left_to_right(
    a: Tensor, h: Tensor, dh: Tensor, h0: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of the left-to-right scan: dx_t = dh_t + a_{t+1} dx_{t+1},
    da_t = dx_t h_{t-1} (h_{-1} = h0 or 0), dh0 = a_0 dx_0."""
    next_gates = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
    dx = _scan_left_to_right(next_gates.flip(1), dh.flip(1), None).flip(1)
    first = torch.zeros_like(h[:, :1]) if h0 is None else h0[:, None]
    previous = torch.cat([first, h[:, :-1]], dim=1)
    return dx * previous, dx, a[:, 0] * dx[:, 0]


def scan_backward(
    a: Tensor, h: Tensor, dh: Tensor, h0: Tensor | None, split: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_a, grad_x, grad_h0) of `scan_forward`, grad_h0 always in a's dtype."""
    d = a.shape[-1]
    fwd, rev = _split_directions(split, d)
    acc, value_dtype = a.dtype, h.dtype
    with torch.no_grad():
        h, dh = h.to(acc), dh.to(acc)
        results = []
        if split > 0:
            h0_fwd = None if h0 is None else h0[..., fwd]
            results.append(_backward_left_to_right(a[..., fwd], h[..., fwd], dh[..., fwd], h0_fwd))
        if split < d:
            da, dx, dh0 = _backward_left_to_right(
                a[..., rev].flip(1), h[..., rev].flip(1), dh[..., rev].flip(1),
                None if h0 is None else h0[..., rev],
            )
            results.append((da.flip(1), dx.flip(1), dh0))
        da, dx, dh0 = (torch.cat(parts, dim=-1) for parts in zip(*results))
    return da.contiguous(), dx.to(value_dtype).contiguous(), dh0.contiguous()
