"""Compiled loops (numba) for the reward model's training step: RMS norm forward and backward and
the gated scan's forward and backward, each one pass over its rows.

At the history lengths of a run (tens to a few hundred rows of width 256) every PyTorch op is a few
microseconds of dispatch around a few microseconds of arithmetic, and a training step of the
reward model was several hundred of them; these loops replace all but the matmuls (MKL) and the
activation functions (PyTorch's vectorised sigmoid and GeLU). They take float32 or float64 NumPy
views of torch tensors (no copies) and compute in that dtype; the inner loops run along a row's
contiguous channels, which LLVM vectorises. Row sums go through `_LANES` partial sums in a fixed
order (never fast-math reassociation), so a step is deterministic. `cache=True` keeps the machine
code on disk (numba's cache: beside this file, or a per-user directory where that is read-only),
so only the first process on a machine compiles (a few seconds).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"nogil": True, "cache": True, "boundscheck": False}
_LANES = 8  # partial sums per row reduction: one AVX2 register of float32


@njit(**_JIT)
def _row_dot(a, b, partial):  # type: ignore[no-untyped-def]
    """sum(a * b) over 1-D rows, as `_LANES` interleaved partial sums added in order at the end."""
    n = a.shape[0]
    blocked = n - n % _LANES
    for j in range(_LANES):
        partial[j] = 0.0
    for c in range(0, blocked, _LANES):
        for j in range(_LANES):
            partial[j] += a[c + j] * b[c + j]
    total = partial[0]
    for j in range(1, _LANES):
        total += partial[j]
    for c in range(blocked, n):
        total += a[c] * b[c]
    return total


@njit(**_JIT)
def rms_norm_forward(x, weight, eps, out, normalized, rstd):  # type: ignore[no-untyped-def]
    """Per row of x (T, W): rstd = 1 / sqrt(mean(x^2) + eps), normalized = x * rstd,
    out = normalized * weight (as nn.RMSNorm)."""
    rows, width = x.shape
    partial = np.empty(_LANES, dtype=x.dtype)
    for t in range(rows):
        xt, nt, ot = x[t], normalized[t], out[t]
        r = x.dtype.type(1.0 / np.sqrt(_row_dot(xt, xt, partial) / width + eps))
        rstd[t] = r
        for c in range(width):
            nt[c] = xt[c] * r
        for c in range(width):
            ot[c] = nt[c] * weight[c]


@njit(**_JIT)
def rms_norm_backward(grad_out, normalized, rstd, weight, grad_weight, grad_input, accumulate):  # type: ignore[no-untyped-def]
    """The backward of `rms_norm_forward`: writes d weight = sum_t grad_out * normalized into
    `grad_weight` and d x = rstd * (g - normalized * mean(g * normalized)), g = grad_out * weight,
    into `grad_input` (added to it if `accumulate`; skipped if `grad_input` has no rows)."""
    rows, width = grad_out.shape
    grad_weight[:] = 0.0
    for t in range(rows):
        gt, nt = grad_out[t], normalized[t]
        for c in range(width):
            grad_weight[c] += gt[c] * nt[c]
    if grad_input.shape[0] == 0:
        return
    g = np.empty(width, dtype=grad_out.dtype)
    partial = np.empty(_LANES, dtype=grad_out.dtype)
    for t in range(rows):
        gt, nt, dt = grad_out[t], normalized[t], grad_input[t]
        for c in range(width):
            g[c] = gt[c] * weight[c]
        mean = grad_out.dtype.type(_row_dot(g, nt, partial) / width)
        r = rstd[t]
        if accumulate:
            for c in range(width):
                dt[c] += r * (g[c] - nt[c] * mean)
        else:
            for c in range(width):
                dt[c] = r * (g[c] - nt[c] * mean)


@njit(**_JIT)
def gated_scan_forward(pre, input_gate, forget, output_gate, states, gated):  # type: ignore[no-untyped-def]
    """The gated SSM's recurrence h_t = f_t h_{t-1} + i_t z_t (h_{-1} = 0) and its gated output
    o_t h_t. `pre` (T, 4W) holds the pre-activations [i | z | o | f]; the gates are their
    activations (T, W). Writes `states` and `gated`."""
    rows, width = states.shape
    for t in range(rows):
        # Row first, then the column slice: a contiguous view, which the loops vectorise over.
        z, i, h, o, y = pre[t][width : 2 * width], input_gate[t], states[t], output_gate[t], gated[t]
        if t == 0:
            for c in range(width):
                h[c] = i[c] * z[c]
        else:
            f, previous = forget[t], states[t - 1]
            for c in range(width):
                h[c] = f[c] * previous[c] + i[c] * z[c]
        for c in range(width):
            y[c] = o[c] * h[c]


@njit(**_JIT)
def gated_scan_backward(grad_gated, pre, input_gate, forget, output_gate, states, grad_pre, carry):  # type: ignore[no-untyped-def]
    """The backward of `gated_scan_forward`, a reverse scan: d u_t = o_t d gated_t + f_{t+1} d u_{t+1}
    (u_t = i_t z_t). Writes into grad_pre (T, 4W) the gradients of the pre-activations i, z and f,
    and, in the o block, d GeLU(o) = d gated * h: the caller applies GeLU's derivative. `carry` (W,)
    is scratch."""
    rows, width = states.shape
    one = grad_pre.dtype.type(1)
    for t in range(rows - 1, -1, -1):
        gy, o, i, f, h = grad_gated[t], output_gate[t], input_gate[t], forget[t], states[t]
        z, row = pre[t][width : 2 * width], grad_pre[t]
        grad_i, grad_z, grad_o, grad_f = row[:width], row[width : 2 * width], row[2 * width : 3 * width], row[3 * width :]
        if t == rows - 1:
            for c in range(width):
                carry[c] = gy[c] * o[c]
        else:
            next_forget = forget[t + 1]
            for c in range(width):
                carry[c] = gy[c] * o[c] + next_forget[c] * carry[c]
        for c in range(width):
            du, ic = carry[c], i[c]  # loaded once: the stores below may alias them, for all LLVM knows
            grad_i[c] = du * z[c] * (ic * (one - ic))
            grad_z[c] = du * ic
            grad_o[c] = gy[c] * h[c]
        if t == 0:
            grad_f[:] = 0.0
        else:
            previous = states[t - 1]
            for c in range(width):
                fc = f[c]
                grad_f[c] = carry[c] * previous[c] * (fc * (one - fc))
