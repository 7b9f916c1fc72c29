"""trainer.scan: the compiled backends against a float64 sequential reference.

CPU tests run everywhere (the C++ backend is built once per machine and cached). CUDA tests
carry the `gpu` marker and skip without a device: `python -m pytest tests/trainer/test_scan.py -m gpu`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from trainer.scan import extension, linear_scan, linear_scan_bidirectional, linear_scan_reference
from trainer.scan.op import _scan

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# (name, split as a function of D): which channels scan left to right
DIRECTIONS = {
    "forward": lambda d: d,
    "reverse": lambda d: 0,
    "bidirectional": lambda d: d // 2,
    "odd_split": lambda d: d // 2 + 1,
}


@pytest.fixture(scope="session")
def cpp_backend():
    """The C++ CPU backend, built (or loaded from the cache) once for the whole session."""
    module = extension.cpu_backend()
    if module is None:
        pytest.fail("the C++ CPU backend failed to build; see the RuntimeWarning")
    return module


def make_inputs(
    batch: int, length: int, width: int, *, seed: int, dtype=torch.float32, gate_dtype=None,
    device="cpu", reset_rate: float = 0.05, with_initial_state: bool = True,
):
    """Gates in [0.8, 1) (long memory) with exact zeros (resets); normal inputs."""
    g = torch.Generator().manual_seed(seed)
    gate_dtype = gate_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    a = 0.8 + 0.2 * torch.rand(batch, length, width, generator=g, dtype=torch.float64)
    a = torch.where(torch.rand(batch, length, width, generator=g, dtype=torch.float64) < reset_rate, 0.0, a)
    x = torch.randn(batch, length, width, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, width, generator=g, dtype=torch.float64) if with_initial_state else None
    grad = torch.randn(batch, length, width, generator=g, dtype=torch.float64)
    return (
        a.to(device=device, dtype=gate_dtype),
        x.to(device=device, dtype=dtype),
        None if h0 is None else h0.to(device=device, dtype=gate_dtype),
        grad.to(device=device, dtype=dtype),
    )


def reference_with_grads(a, x, h0, split, grad):
    """States and (da, dx, dh0) from autograd through the float64 loop, on the same values."""
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in (a, x, h0)]
    h = linear_scan_reference(leaves[0], leaves[1], initial_state=leaves[2], split=split)
    h.backward(grad.double().cpu())
    return h.detach(), [t.grad if t is not None else None for t in leaves]


def op_with_grads(a, x, h0, split, grad, backend="auto", layout=None):
    """States and gradients of the op. `layout(a, x)` may turn the leaves into the
    (non-contiguous) views that the op is called with; gradients are the leaves'."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, x, h0)]
    a_in, x_in = layout(*leaves[:2]) if layout else leaves[:2]
    if layout:
        assert torch.equal(a_in, leaves[0]) and torch.equal(x_in, leaves[1])
        assert not (a_in.is_contiguous() and x_in.is_contiguous())
    h = _scan(a_in, x_in, leaves[2], split, backend)
    h.backward(grad)
    return h.detach(), [t.grad if t is not None else None for t in leaves]


def rel_err(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values in the output"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_matches_reference(a, x, h0, split, grad, tol, backend="auto", layout=None):
    h, grads = op_with_grads(a, x, h0, split, grad, backend, layout)
    h_ref, grads_ref = reference_with_grads(a, x, h0, split, grad)
    assert h.dtype == x.dtype and h.shape == x.shape and h.is_contiguous()
    assert rel_err(h, h_ref) < tol, "states"
    for name, got, want in zip(("a", "x", "initial_state"), grads, grads_ref):
        if want is not None:
            assert got.dtype == {"a": a, "x": x, "initial_state": h0}[name].dtype
            assert rel_err(got, want) < tol, f"gradient of {name}"


# ----------------------------------------------------------------------------- CPU backends


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("length", [1, 7, 1000, 4097])
def test_cpp_float32_matches_float64_reference(cpp_backend, direction, length):
    width = 70  # not a multiple of 32 or of the 64-channel CPU blocks
    a, x, h0, grad = make_inputs(2, length, width, seed=length)
    assert_matches_reference(a, x, h0, DIRECTIONS[direction](width), grad, tol=1e-5, backend="cpp")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("length", [1, 7, 1000])
def test_cpp_float64_agrees_with_autograd_to_rounding(cpp_backend, direction, length):
    a, x, h0, grad = make_inputs(3, length, 33, seed=100 + length, dtype=torch.float64)
    assert_matches_reference(a, x, h0, DIRECTIONS[direction](33), grad, tol=1e-13, backend="cpp")


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [7, 4097])
def test_cpp_reduced_precision_inputs_accumulate_in_float32(cpp_backend, value_dtype, length):
    a, x, h0, grad = make_inputs(2, length, 40, seed=7, dtype=value_dtype)
    # the reference sees the same rounded inputs in float64; what remains is output rounding
    assert_matches_reference(a, x, h0, 20, grad, tol=1e-2, backend="cpp")


def test_reduced_precision_keeps_slow_decay():
    """Gates of 0.999 in float32 with bf16 inputs: the decay survives over 2000 steps (in bf16
    gates 0.999 would round to 1.0 and the state would grow without bound)."""
    length = 2000
    a = torch.full((1, length, 8), 0.999)
    x = torch.ones(1, length, 8, dtype=torch.bfloat16)
    h = linear_scan(a, x)
    want = (1 - 0.999**length) / (1 - 0.999)  # geometric series: 864.8
    assert abs(h[0, -1, 0].item() - want) / want < 1e-2


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "odd_split"])
def test_gradcheck_float64(cpp_backend, backend, direction):
    a, x, h0, _ = make_inputs(2, 6, 5, seed=3, dtype=torch.float64, reset_rate=0.1)
    split = DIRECTIONS[direction](5)
    inputs = tuple(t.requires_grad_() for t in (a, x, h0))
    assert torch.autograd.gradcheck(lambda a, x, h0: _scan(a, x, h0, split, backend), inputs)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_reference_fallback_backend_matches(cpp_backend, backend):
    a, x, h0, grad = make_inputs(2, 300, 45, seed=11)
    assert_matches_reference(a, x, h0, 17, grad, tol=1e-5, backend=backend)


@pytest.mark.parametrize("reverse", [False, True])
def test_zero_gate_resets_state_and_blocks_gradients_exactly(cpp_backend, reverse):
    length, reset = 50, 20
    a, x, h0, _ = make_inputs(2, length, 37, seed=5, reset_rate=0.0)
    # forward: a_reset = 0 cuts [0, reset) from [reset, T); reverse: cuts (reset, T) from [0, reset]
    a[:, reset] = 0.0
    a, x, h0 = (t.requires_grad_() for t in (a, x, h0))
    h = linear_scan(a, x, reverse=reverse, initial_state=h0)
    after = slice(reset, None) if not reverse else slice(None, reset + 1)
    before = slice(None, reset) if not reverse else slice(reset + 1, None)

    # the states past the reset are exactly those of a fresh scan of that part
    fresh = linear_scan(a[:, after].detach(), x[:, after].detach(), reverse=reverse)
    assert torch.equal(h[:, after].detach(), fresh)

    weights = torch.randn_like(h)
    (h[:, after] * weights[:, after]).sum().backward()
    assert torch.all(x.grad[:, before] == 0)
    assert torch.all(a.grad[:, before] == 0)
    assert torch.all(h0.grad == 0)
    assert torch.all(x.grad[:, after] != 0)  # and the gradient does reach the kept part


def test_zero_gates_everywhere_make_states_equal_inputs(cpp_backend):
    a, x, h0, grad = make_inputs(2, 33, 19, seed=2)
    zeros = torch.zeros_like(a)
    for split in (19, 0, 9):
        h, (da, dx, dh0) = op_with_grads(zeros, x, h0, split, grad)
        assert torch.equal(h, x)
        assert torch.equal(dx, grad)
        assert torch.all(dh0 == 0)


def channel_slice(a, x):
    """Chunks of one wide projection: time stride 2D, unit channel stride (no copy needed)."""
    return torch.cat([a, torch.rand_like(a)], dim=-1)[..., : a.shape[-1]], torch.cat(
        [torch.randn_like(x), x], dim=-1
    )[..., x.shape[-1] :]


def time_major(a, x):
    """Storage (B, D, T): channel stride != 1, copied before the kernel."""
    return a.transpose(1, 2).contiguous().transpose(1, 2), x.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def batch_step(a, x):
    """Every other batch row of a larger tensor."""
    return (
        torch.stack([a, torch.rand_like(a)], dim=1).flatten(0, 1)[::2],
        torch.stack([torch.randn_like(x), x], dim=1).flatten(0, 1)[1::2],
    )


def misaligned(a, x):
    """Views one element into their storage: wide vector loads would be misaligned."""
    pad_a, pad_x = torch.zeros_like(a[..., :1]), torch.zeros_like(x[..., :1])
    return torch.cat([pad_a, a], dim=-1)[..., 1:], torch.cat([pad_x, x], dim=-1)[..., 1:]


LAYOUTS = {f.__name__: f for f in (channel_slice, time_major, batch_step, misaligned)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(cpp_backend, layout):
    a, x, h0, grad = make_inputs(4, 65, 24, seed=9)
    for split in (24, 0, 10):
        h, grads = op_with_grads(a, x, h0, split, grad, layout=LAYOUTS[layout])
        h_contiguous, grads_contiguous = op_with_grads(a, x, h0, split, grad)
        assert torch.equal(h, h_contiguous)
        for got, want in zip(grads, grads_contiguous):
            assert torch.equal(got, want)


def test_gates_shared_across_the_batch(cpp_backend):
    """A gate row broadcast over the batch (batch stride 0) reaches the kernel as is."""
    a, x, h0, grad = make_inputs(4, 40, 24, seed=10)
    a_row = a[:1].clone().requires_grad_()
    h = linear_scan(a_row.expand(4, -1, -1), x, initial_state=h0)
    h.backward(grad)
    h_ref, (da_ref, _, _) = reference_with_grads(a[:1].expand(4, -1, -1), x, h0, 24, grad)
    assert rel_err(h, h_ref) < 1e-5
    assert rel_err(a_row.grad, da_ref.sum(0, keepdim=True)) < 1e-5


def test_non_contiguous_upstream_gradient(cpp_backend):
    a, x, h0, _ = make_inputs(2, 30, 16, seed=4)
    a.requires_grad_()
    h = linear_scan(a, x)
    # sum() sends back an expanded gradient (all strides 0)
    h.sum().backward()
    want = reference_with_grads(a, x, None, 16, torch.ones(2, 30, 16))[1][0]
    assert rel_err(a.grad, want) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
def test_final_state_and_chunked_continuation(cpp_backend, reverse):
    a, x, h0, _ = make_inputs(2, 64, 21, seed=8, dtype=torch.float64)
    h, final = linear_scan(a, x, reverse=reverse, initial_state=h0, return_final_state=True)
    assert torch.equal(final, h[:, 0] if reverse else h[:, -1])
    # scanning in two pieces, carrying the state, gives the same states
    first, second = (slice(None, 40), slice(40, None)) if not reverse else (slice(40, None), slice(None, 40))
    h1, carried = linear_scan(a[:, first], x[:, first], reverse, h0, return_final_state=True)
    h2 = linear_scan(a[:, second], x[:, second], reverse, carried)
    pieces = torch.cat([h1, h2] if not reverse else [h2, h1], dim=1)
    assert torch.allclose(pieces, h, rtol=1e-12, atol=1e-12)


def test_initial_state_in_another_dtype_gets_its_gradient_in_that_dtype(cpp_backend):
    a, x, _, grad = make_inputs(2, 10, 8, seed=1, dtype=torch.bfloat16)
    h0 = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    h = linear_scan(a, x, initial_state=h0)
    h.backward(grad)
    assert h0.grad.dtype == torch.bfloat16
    want = reference_with_grads(a, x, h0.detach().float(), 8, grad)[1][2]
    assert rel_err(h0.grad, want) < 1e-2


def test_bidirectional_is_a_forward_and_a_reverse_scan_side_by_side(cpp_backend):
    a, x, h0, _ = make_inputs(3, 77, 50, seed=12)
    split = 20
    h, final = linear_scan_bidirectional(a, x, split, initial_state=h0, return_final_state=True)
    left = linear_scan(a[..., :split], x[..., :split], initial_state=h0[:, :split])
    right = linear_scan(a[..., split:], x[..., split:], reverse=True, initial_state=h0[:, split:])
    assert torch.equal(h, torch.cat([left, right], dim=-1))
    assert torch.equal(final, torch.cat([left[:, -1], right[:, 0]], dim=-1))
    assert torch.equal(linear_scan_bidirectional(a, x), _scan(a, x, None, 25))


def test_invalid_inputs_raise_clear_errors():
    a, x, h0, _ = make_inputs(2, 5, 4, seed=0)
    with pytest.raises(TypeError, match="float32"):
        linear_scan(a.bfloat16(), x)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        linear_scan(a, x.to(torch.int32))
    with pytest.raises(TypeError, match="float64 gates need float64"):
        linear_scan(a.double(), x)
    with pytest.raises(ValueError, match="must match"):
        linear_scan(a, x[:, :3])
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        linear_scan(a[0], x[0])
    with pytest.raises(ValueError, match="empty"):
        linear_scan(a[:, :0], x[:, :0])
    with pytest.raises(ValueError, match=r"initial_state must be \(B, D\)"):
        linear_scan(a, x, initial_state=h0[:1])
    with pytest.raises(ValueError, match="split"):
        linear_scan_bidirectional(a, x, split=5)
    with pytest.raises(ValueError, match="backend"):
        _scan(a, x, None, 4, "triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _scan(a, x, None, 4, "cuda")


def test_cpp_backend_checks_arguments_itself(cpp_backend):
    a, x, _, _ = make_inputs(2, 5, 4, seed=0)
    with pytest.raises(RuntimeError, match="split"):
        cpp_backend.forward(a, x, None, 9)
    with pytest.raises(RuntimeError, match="unit stride"):
        cpp_backend.forward(a, x.transpose(1, 2).contiguous().transpose(1, 2), None, 4)
    with pytest.raises(RuntimeError, match="initial state"):
        cpp_backend.forward(a, x, torch.zeros(2, 4, dtype=torch.float64), 4)


@pytest.mark.parametrize("split", [0, 6, 13])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_custom_op_registration_opcheck(cpp_backend, split, with_initial_state):
    a, x, h0, _ = make_inputs(2, 11, 13, seed=split, with_initial_state=with_initial_state)
    a.requires_grad_()
    x.requires_grad_()
    if h0 is not None:
        h0.requires_grad_()
    torch.library.opcheck(torch.ops.birdie.linear_scan.default, (a, x, h0, split, "auto"))


def _layer(a_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a = torch.sigmoid(a_logits)
    forward, final = linear_scan(a, x, return_final_state=True)
    both = linear_scan_bidirectional(a, torch.tanh(x))
    backward = linear_scan(a, x, reverse=True, initial_state=final)
    return (forward * both + backward).square().mean()


def test_torch_compile_traces_without_graph_breaks(cpp_backend):
    a_logits, x, _, _ = make_inputs(2, 40, 24, seed=21)
    explanation = torch._dynamo.explain(_layer)(a_logits, x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1

    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")
    eager_inputs = [t.clone().requires_grad_() for t in (a_logits, x)]
    compiled_inputs = [t.clone().requires_grad_() for t in (a_logits, x)]
    eager_loss = _layer(*eager_inputs)
    compiled_loss = compiled(*compiled_inputs)
    eager_loss.backward()
    compiled_loss.backward()
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-6)
    for got, want in zip(compiled_inputs, eager_inputs):
        assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_eager_path_equals_the_custom_op(cpp_backend, backend):
    """Eager calls go through a plain autograd.Function, compiled graphs through the custom op:
    the same values and gradients, bit for bit, and neither is differentiable twice."""
    from trainer.scan.op import _linear_scan_op

    a, x, h0, grad = make_inputs(2, 300, 40, seed=8)
    eager_leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
    op_leaves = [t.clone().requires_grad_() for t in (a, x, h0)]
    eager = _scan(*eager_leaves, 17, backend)
    through_op = _linear_scan_op(*op_leaves, 17, backend)
    assert eager.grad_fn is not None and "EagerLinearScan" in type(eager.grad_fn).__name__
    assert torch.equal(eager, through_op)
    eager.backward(grad)
    through_op.backward(grad)
    for got, want in zip(eager_leaves, op_leaves):
        assert torch.equal(got.grad, want.grad)
    with torch.no_grad():  # no autograd record at all without grad
        assert torch.equal(_scan(a, x, h0, 17, backend), eager.detach())
    # A second derivative is refused, not silently wrong.
    leaves = [t.clone().requires_grad_() for t in (a, x)]
    (first,) = torch.autograd.grad(_scan(*leaves, None, 17, backend).square().sum(), leaves[1], create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        first.sum().backward()


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph(cpp_backend):
    a_logits, x, _, _ = make_inputs(2, 40, 24, seed=22)
    compiled = torch.compile(_layer, fullgraph=True)
    inputs = [t.clone().requires_grad_() for t in (a_logits, x)]
    loss = compiled(*inputs)
    loss.backward()
    assert torch.allclose(loss, _layer(a_logits, x), rtol=1e-5)
    assert all(torch.isfinite(t.grad).all() for t in inputs)


def test_fallback_to_reference_warns_once_when_the_build_fails(monkeypatch):
    def failing_build(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(extension, "_loaded", {})
    monkeypatch.setattr(extension, "_prebuilt", lambda module: None)
    monkeypatch.setattr(extension, "_jit_build", failing_build)
    a, x, h0, _ = make_inputs(1, 12, 5, seed=0)
    with pytest.warns(RuntimeWarning, match="falling back to the pure-PyTorch reference"):
        h = linear_scan(a, x, initial_state=h0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_scan(a, x, initial_state=h0)  # no second warning
    h_ref = linear_scan_reference(a.double(), x.double(), initial_state=h0.double())
    assert rel_err(h, h_ref) < 1e-6


@pytest.mark.parametrize("cuda_version, cuda_home, message", [
    (None, "/usr/local/cuda", "not a CUDA build"),
    ("12.4", None, "nvcc was not found"),
])
def test_cuda_backend_explains_why_it_cannot_be_built(monkeypatch, cuda_version, cuda_home, message):
    import torch.utils.cpp_extension as cpp_extension

    attempts = []
    monkeypatch.setattr(extension, "_loaded", {})
    monkeypatch.setattr(extension, "_failures", {})
    monkeypatch.setattr(extension, "_prebuilt", lambda module: None)
    monkeypatch.setattr(extension, "_jit_build", lambda *args, **kwargs: attempts.append(args))
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    with pytest.raises(RuntimeError, match=f"CUDA linear_scan backend is unavailable: .*{message}"):
        extension.cuda_backend()
    # the failure is remembered: no 30-second build attempt on every later call
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    with pytest.raises(RuntimeError, match=message):
        extension.cuda_backend()
    assert attempts == []


def test_jit_build_directory_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension.build_root().parent == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extension.build_root().is_relative_to(Path.home() / ".cache" / "birdie" / "ext")


@pytest.mark.slow
def test_install_time_build_is_the_backend_it_loads(tmp_path):
    """`BIRDIE_BUILD_EXT=1` makes setup.py build the C++ backend as trainer.scan._scan_cpu (here
    in place, in a copy of the project), and the extension loader then takes it instead of a just-in-
    time build, with the same results."""
    root = Path(__file__).resolve().parents[2]
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "trainer", tmp_path / "trainer", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "BIRDIE_BUILD_EXT": "1"}
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert list((tmp_path / "trainer" / "scan").glob("_scan_cpu*.so"))
    check = (
        "import torch\n"
        "from trainer.scan import extension, linear_scan, linear_scan_reference\n"
        "extension._jit_build = None  # a just-in-time build would fail loudly\n"
        "module = extension.cpu_backend()\n"
        "assert module.__name__ == 'trainer.scan._scan_cpu', module.__name__\n"
        "assert module.__file__.startswith(%r), module.__file__\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a, x = torch.rand(2, 300, 40, generator=g), torch.randn(2, 300, 40, generator=g)\n"
        "error = (linear_scan(a, x).double() - linear_scan_reference(a.double(), x.double())).abs().max()\n"
        "assert error < 1e-5, float(error)\n"
    ) % str(tmp_path)
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_kernels_compile_for_sm90(tmp_path):
    """The kernels and the host launch code build for Hopper with no GPU present."""
    source = Path(extension.CSRC) / "scan_kernels_check.cu"
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-O2", "-arch=sm_90", "-o", str(tmp_path / "check"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- CUDA backend


@gpu
@needs_cuda
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("length", [1, 7, 1000, 4097])
@pytest.mark.parametrize("width", [33, 256])
def test_cuda_matches_float64_reference(value_dtype, direction, length, width):
    a, x, h0, grad = make_inputs(2, length, width, seed=length + width, dtype=value_dtype, device="cuda")
    tol = 1e-5 if value_dtype == torch.float32 else 1e-2
    assert_matches_reference(a, x, h0, DIRECTIONS[direction](width), grad, tol=tol, backend="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("length", [4096, 16384])
def test_cuda_bf16_is_correct_at_long_lengths(length):
    a, x, h0, grad = make_inputs(2, length, 64, seed=length, dtype=torch.bfloat16, device="cuda")
    assert_matches_reference(a, x, h0, 32, grad, tol=1e-2, backend="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("tile", ["1,1", "1,8", "2,4", "2,16", "4,3", "4,8", "4,16", "1,8,2", "2,3,2", "4,16,2"])
def test_cuda_every_tile_gives_the_same_result(monkeypatch, tile):
    a, x, h0, grad = make_inputs(3, 1000, 264, seed=31, device="cuda")
    default = op_with_grads(a, x, h0, 132, grad, "cuda")
    monkeypatch.setenv("BIRDIE_SCAN_CUDA_TILE", tile)
    tiled = op_with_grads(a, x, h0, 132, grad, "cuda")
    assert rel_err(tiled[0], default[0]) < 1e-6
    for got, want in zip(tiled[1], default[1]):
        assert rel_err(got, want) < 1e-6


@gpu
@needs_cuda
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_non_contiguous_inputs(layout, value_dtype):
    a, x, h0, grad = make_inputs(4, 300, 64, seed=13, dtype=value_dtype, device="cuda")
    tol = 1e-5 if value_dtype == torch.float32 else 1e-2
    assert_matches_reference(a, x, h0, 32, grad, tol=tol, backend="cuda", layout=LAYOUTS[layout])


@gpu
@needs_cuda
def test_cuda_gradcheck_float64():
    a, x, h0, _ = make_inputs(2, 9, 7, seed=3, dtype=torch.float64, device="cuda", reset_rate=0.1)
    inputs = tuple(t.requires_grad_() for t in (a, x, h0))
    for split in (7, 0, 3):
        assert torch.autograd.gradcheck(lambda a, x, h0: _scan(a, x, h0, split, "cuda"), inputs)


@gpu
@needs_cuda
def test_cuda_zero_gates_block_gradients_exactly():
    a, x, h0, _ = make_inputs(2, 3000, 96, seed=5, device="cuda", reset_rate=0.0)
    a[:, 1500] = 0.0
    a, x, h0 = (t.requires_grad_() for t in (a, x, h0))
    h = linear_scan(a, x, initial_state=h0)
    h[:, 1500:].sum().backward()
    assert torch.all(x.grad[:, :1500] == 0) and torch.all(a.grad[:, :1500] == 0)
    assert torch.all(h0.grad == 0)


@gpu
@needs_cuda
def test_cuda_torch_compile_fullgraph():
    a_logits, x, _, _ = make_inputs(2, 300, 64, seed=21, device="cuda")
    compiled = torch.compile(_layer, fullgraph=True)
    inputs = [t.clone().requires_grad_() for t in (a_logits, x)]
    eager = [t.clone().requires_grad_() for t in (a_logits, x)]
    loss, eager_loss = compiled(*inputs), _layer(*eager)
    loss.backward()
    eager_loss.backward()
    assert torch.allclose(loss, eager_loss, rtol=1e-5)
    for got, want in zip(inputs, eager):
        assert rel_err(got.grad, want.grad) < 1e-5


@gpu
@needs_cuda
@pytest.mark.slow
def test_cuda_indexing_beyond_two_to_the_31_elements():
    """B*T*D > 2^31: offsets must be 64-bit. Checked on the tail against a fresh scan of
    the tail started from the state just before it."""
    length, width = 2**21, 1040  # 2.18e9 elements
    a = torch.rand(1, length, width, device="cuda").mul_(0.2).add_(0.8)
    x = torch.randn(1, length, width, device="cuda", dtype=torch.bfloat16)
    h = linear_scan(a, x)
    tail = 1000
    h_tail = linear_scan(a[:, -tail:], x[:, -tail:], initial_state=h[:, -tail - 1])
    assert rel_err(h_tail, h[:, -tail:]) < 1e-2


@gpu
@needs_cuda
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_standalone_kernel_check_passes(tmp_path):
    """scan_kernels_check.cu: the raw kernels against a float64 host reference, every tile."""
    source = Path(extension.CSRC) / "scan_kernels_check.cu"
    major, minor = torch.cuda.get_device_capability()
    binary = tmp_path / "check"
    build = subprocess.run(
        ["nvcc", "-std=c++17", "-O2", f"-arch=sm_{major}{minor}", "-o", str(binary), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": str(torch.cuda.current_device())})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
