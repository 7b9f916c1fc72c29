"""The linear scan as a torch.library custom op, and its public entry points.

    h_t = a_t * h_{t-1} + x_t          elementwise over channels, layout (B, T, D)

The op `birdie::linear_scan(a, x, initial_state, split, backend)` scans channels
[0, split) left to right and [split, D) right to left, so forward, reverse and the
bidirectional layers' mixed scan are one op and one kernel launch. It has a fake
implementation (so torch.compile traces through it without a graph break) and autograd
through a second op, `birdie::linear_scan_backward`, which computes (da, dx, dh0) in one
fused pass. That is what torch.compile and torch.export trace; eager calls reach the same
backends through a plain autograd.Function (`_EagerLinearScan`), which costs half the host
time per call.

Backends, chosen by the device of the inputs ("auto"):
- CUDA tensors: the CUDA kernels (built on first use; a clear error when nvcc is missing);
- CPU tensors: the C++ CPU backend, or the pure-PyTorch reference with a one-time warning
  when it cannot be built;
- anything else: the reference.

Types: gates `a` are float32 (float64 for float64 inputs); reduced-precision gates are
refused because they lose the decay (0.999 rounds to 1.0 in bf16). `x` may be float32,
bfloat16 or float16; states come back in x's dtype; accumulation is in float32.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from trainer.scan import extension, reference

BACKENDS = ("auto", "cuda", "cpp", "reference")
_VALUE_DTYPES_FOR_FLOAT32_GATES = (torch.float32, torch.bfloat16, torch.float16)


def _cuda_tile() -> tuple[int, int, int]:
    """Optional tile override "VEC,WARPS[,STAGES]" for tuning (bench/scan.py --sweep); 0 = automatic."""
    spec = os.environ.get("BIRDIE_SCAN_CUDA_TILE", "")
    if not spec:
        return 0, 0, 0
    try:
        parts = [int(part) for part in spec.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise ValueError(f"BIRDIE_SCAN_CUDA_TILE must look like '2,8' or '2,8,2' (vec,warps[,stages]), got {spec!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 0


def _resolve_backend(device: torch.device, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "cuda"
        if device.type == "cpu" and extension.cpu_backend() is not None:
            return "cpp"
        return "reference"
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {device}")
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' needs CPU tensors, got {device}")
        if extension.cpu_backend() is None:
            raise RuntimeError("the C++ CPU backend could not be built (see the warning above)")
    return backend


def _forward_impl(a: Tensor, x: Tensor, initial_state: Tensor | None, split: int, backend: str) -> Tensor:
    kind = _resolve_backend(a.device, backend)
    if kind == "cuda":
        return extension.cuda_backend().forward(a, x, initial_state, split, *_cuda_tile())
    if kind == "cpp":
        return extension.cpu_backend().forward(a, x, initial_state, split)
    return reference.scan_forward(a, x, initial_state, split)


def _backward_impl(
    a: Tensor, h: Tensor, grad_h: Tensor, initial_state: Tensor | None, split: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    kind = _resolve_backend(a.device, backend)
    if kind == "cuda":
        grads = extension.cuda_backend().backward(a, h, grad_h, initial_state, split, *_cuda_tile())
    elif kind == "cpp":
        grads = extension.cpu_backend().backward(a, h, grad_h, initial_state, split)
    else:
        grads = reference.scan_backward(a, h, grad_h, initial_state, split)
    grad_a, grad_x, grad_h0 = grads
    return grad_a, grad_x, grad_h0


@torch.library.custom_op("birdie::linear_scan", mutates_args=())
def _linear_scan_op(
    a: Tensor, x: Tensor, initial_state: Tensor | None, split: int, backend: str
) -> Tensor:
    return _forward_impl(a, x, initial_state, split, backend)


@_linear_scan_op.register_fake
def _linear_scan_fake(a, x, initial_state, split, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("birdie::linear_scan_backward", mutates_args=())
def _linear_scan_backward_op(
    a: Tensor, h: Tensor, grad_h: Tensor, initial_state: Tensor | None, split: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(a, h, grad_h, initial_state, split, backend)


@_linear_scan_backward_op.register_fake
def _linear_scan_backward_fake(a, h, grad_h, initial_state, split, backend):
    return (
        torch.empty_like(a, memory_format=torch.contiguous_format),
        torch.empty_like(h, memory_format=torch.contiguous_format),
        a.new_empty((a.shape[0], a.shape[2])),
    )


def _setup_context(ctx, inputs, output):
    a, _x, initial_state, split, backend = inputs
    ctx.save_for_backward(a, output, initial_state)
    ctx.split = split
    ctx.backend = backend


def _gradients(ctx, grad_h, backward):
    """Gradients of (a, x, initial_state, split, backend) through `backward` (the backward op,
    or its implementation when called eagerly)."""
    a, h, initial_state = ctx.saved_tensors
    grad_h = _unit_channel_stride(grad_h.to(h.dtype))
    grad_a, grad_x, grad_h0 = backward(a, h, grad_h, initial_state, ctx.split, ctx.backend)
    return grad_a, grad_x, (grad_h0 if initial_state is not None else None), None, None


def _backward(ctx, grad_h):
    return _gradients(ctx, grad_h, _linear_scan_backward_op)


torch.library.register_autograd(
    "birdie::linear_scan", _backward, setup_context=_setup_context
)


class _EagerLinearScan(torch.autograd.Function):
    """The op's eager path: the same backends and the same backward, without torch.library's
    per-call dispatch layers. Host time of a forward+backward of a tiny scan on the 2-core dev box:
    265 us through the custom op, 133 us here (torch.autograd.grad alone takes ~70 us for any op);
    of a forward without grad: 30 -> 18 us, and ~8 us skipping autograd. On a GPU that overhead
    decides the time of small scans. torch.compile and torch.export trace the custom op instead
    (see `_scan`), so compiled graphs keep the op without a graph break."""

    @staticmethod
    def forward(ctx, a, x, initial_state, split, backend):  # type: ignore[override]
        h = _forward_impl(a, x, initial_state, split, backend)
        _setup_context(ctx, (a, x, initial_state, split, backend), h)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):  # type: ignore[override]
        return _gradients(ctx, grad_h, _backward_impl)


def _unit_channel_stride(t: Tensor) -> Tensor:
    # The kernels take any batch and time strides but need the channels contiguous.
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _prepare(
    a: Tensor, x: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validates user input and brings it to what the op takes."""
    if not isinstance(a, Tensor) or not isinstance(x, Tensor):
        raise TypeError("a and x must be tensors")
    if a.dim() != 3:
        raise ValueError(f"a must be (B, T, D), got shape {tuple(a.shape)}")
    if x.shape != a.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but a has {tuple(a.shape)}; they must match")
    if x.device != a.device:
        raise ValueError(f"x is on {x.device} but a is on {a.device}")
    if a.shape[1] == 0:
        raise ValueError("the sequence is empty (T = 0)")
    if a.dtype in (torch.bfloat16, torch.float16):
        raise TypeError(
            f"gates a must be float32, got {a.dtype}: reduced-precision gates lose the decay "
            "(0.999 rounds to 1.0 in bfloat16); compute the gates in float32 or pass a.float()"
        )
    if a.dtype == torch.float64:
        if x.dtype != torch.float64:
            raise TypeError(f"float64 gates need float64 x, got {x.dtype}")
    elif a.dtype == torch.float32:
        if x.dtype not in _VALUE_DTYPES_FOR_FLOAT32_GATES:
            raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    else:
        raise TypeError(f"gates a must be float32 (or float64), got {a.dtype}")
    if initial_state is not None:
        batch, _, width = a.shape
        if not isinstance(initial_state, Tensor):
            raise TypeError("initial_state must be a tensor or None")
        if tuple(initial_state.shape) != (batch, width):
            raise ValueError(
                f"initial_state must be (B, D) = ({batch}, {width}), got {tuple(initial_state.shape)}"
            )
        if initial_state.device != a.device:
            raise ValueError(f"initial_state is on {initial_state.device} but a is on {a.device}")
        if not initial_state.is_floating_point():
            raise TypeError(f"initial_state must be floating point, got {initial_state.dtype}")
        # the carried state is accumulated in the gates' precision; .to() keeps autograd
        initial_state = initial_state.to(a.dtype).contiguous()
    return _unit_channel_stride(a), _unit_channel_stride(x), initial_state


def _scan(
    a: Tensor, x: Tensor, initial_state: Tensor | None, split: int, backend: str = "auto"
) -> Tensor:
    """All states for channels [0, split) forward and [split, D) reverse."""
    a, x, initial_state = _prepare(a, x, initial_state)
    if not 0 <= split <= a.shape[-1]:
        raise ValueError(f"split must lie in [0, D={a.shape[-1]}], got {split}")
    if torch.compiler.is_compiling():
        return _linear_scan_op(a, x, initial_state, split, backend)
    needs_grad = a.requires_grad or x.requires_grad or (initial_state is not None and initial_state.requires_grad)
    if needs_grad and torch.is_grad_enabled():
        return _EagerLinearScan.apply(a, x, initial_state, split, backend)
    return _forward_impl(a, x, initial_state, split, backend)


def linear_scan(
    a: Tensor,
    x: Tensor,
    reverse: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """All states of h_t = a_t * h_{t-1} + x_t over dim 1 of (B, T, D) tensors.

    With `reverse`, the right-to-left mirror g_t = a_t * g_{t+1} + x_t. `initial_state`
    (B, D) is h_{-1} (g_T when reversed), zeros if None. Returns the states (B, T, D) in
    x's dtype, and with `return_final_state` also the state after the last step, (B, D).
    A gate of 0 resets the state: nothing flows across it, gradients included.
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError("x must be a (B, T, D) tensor")
    h = _scan(a, x, initial_state, 0 if reverse else x.shape[-1])
    if return_final_state:
        return h, (h[:, 0] if reverse else h[:, -1])
    return h


def linear_scan_bidirectional(
    a: Tensor,
    x: Tensor,
    split: int | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Channels [0, split) scanned left to right, [split, D) right to left, in one launch.

    `split` defaults to D // 2: the layout of a bidirectional layer whose state halves are
    concatenated. The final state is the left-to-right half's last state next to the
    right-to-left half's state at t = 0.
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError("x must be a (B, T, D) tensor")
    width = x.shape[-1]
    if split is None:
        split = width // 2
    h = _scan(a, x, initial_state, split)
    if return_final_state:
        return h, torch.cat([h[:, -1, :split], h[:, 0, split:]], dim=-1)
    return h
