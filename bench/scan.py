"""Linear scan benchmark: time, bandwidth and error of every implementation against the
copy roofline measured in the same run.

    python bench/scan.py                  # CUDA: B=8, T in {1024, 4096, 16384}, D=2048, fp32 and bf16
    python bench/scan.py --device cpu     # CPU: B=2, D=512, C++ backend vs the reference
    python bench/scan.py --sweep          # CUDA: every kernel tile (vec, warps) at B=8, T=4096
    python bench/scan.py --json out.jsonl # also write one JSON record per measurement

Implementations: `linear_scan` (forward, reverse and bidirectional directions), torch's
compiled `associative_scan`, the sequential reference loop, and `accelerated-scan` (its CUDA
warp scan and its Triton scan) at its own (B, D, T) layout with gates in the tokens' dtype,
each variant in a child process because the warp scan is known to crash (illegal memory
access) in bf16 at T >= 4096. Bytes per element count each
input read once and each output written once: forward reads a, x and writes h; backward
reads a, h, dh and writes da, dx. Gates are always float32 for ours (bf16 gates lose the
decay); `bf16` means x, h and their gradients are bf16. Error is the relative L2 distance
of h to a float64 sequential scan of the same inputs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.scan import linear_scan_reference  # noqa: E402
from trainer.scan.op import _scan  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("ours", "associative", "reference", "accelerated")
SWEEP_TILES = ["1,4", "1,8", "1,16", "2,4", "2,8", "2,16", "4,8", "4,16", "1,4,2", "1,8,2", "2,4,2", "2,8,2", "4,8,2"]


@dataclass
class Record:
    impl: str
    direction: str
    dtype: str
    batch: int
    length: int
    width: int
    fwd_ms: float | None = None
    fwd_gbps: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_bwd_gbps: float | None = None
    rel_err: float | None = None
    note: str = ""


def bytes_per_element(dtype: str, gate_bytes: int = 4) -> tuple[int, int]:
    """(forward, backward) bytes moved per (b, t, d) element."""
    value = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    forward = gate_bytes + 2 * value  # read a, x; write h
    backward = 2 * gate_bytes + 3 * value  # read a, h, dh; write da, dx
    return forward, backward


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, budget_s: float, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median milliseconds of fn() after a warm-up, with as many samples as fit the budget.

    On CUDA each sample times several calls queued back to back between two events (enough
    for about 2 ms of device work), so the host's per-call cost (Python, the op's dispatch,
    autograd) overlaps the device work instead of being counted as idle device time, as it
    would be with one call between the events."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    single = time.perf_counter() - start
    inner = max(1, min(100, int(2e-3 / max(single, 1e-6)))) if device == "cuda" else 1
    reps = int(min(max_reps, max(min_reps, budget_s / max(inner * single, 1e-6))))
    samples = []
    if device == "cuda":
        for _ in range(reps):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / inner)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: str, nbytes: int, budget_s: float, allocate: bool = False) -> float:
    """Device-to-device copy, counting bytes read plus bytes written. With `allocate`, into
    a fresh tensor each time (clone): on CPU that adds the page faults every op that
    returns a new large tensor pays, since torch's CPU allocator does not cache."""
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = (lambda: src.clone()) if allocate else (lambda: dst.copy_(src))
    ms = time_ms(copy, device, budget_s, min_reps=5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_inputs(batch, length, width, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.rand(batch, length, width, device=device, generator=g).mul_(0.1).add_(0.9)
    resets = torch.rand(batch, length, width, device=device, generator=g) < 0.01
    a = a.masked_fill_(resets, 0.0)
    x = torch.randn(batch, length, width, device=device, generator=g).to(DTYPES[dtype])
    dh = torch.randn(batch, length, width, device=device, generator=g).to(DTYPES[dtype])
    return a, x, dh


def float64_states(a, x, split):
    with torch.no_grad():
        return linear_scan_reference(a.double(), x.double(), split=split)


class ReferenceStates:
    """float64 states of one input set per split, computed once (a loop over T each)."""

    def __init__(self, a, x):
        self.a, self.x, self.cache = a, x, {}

    def __call__(self, split):
        if split not in self.cache:
            self.cache[split] = float64_states(self.a, self.x, split)
        return self.cache[split]


def rel_err(h, want) -> float:
    h = h.double()
    if not torch.isfinite(h).all():
        return float("inf")
    return ((h - want).norm() / want.norm()).item()


def measure(fwd, grads_of, device, budget_s, fwd_bytes, bwd_bytes, numel, with_backward=True):
    """(fwd ms, fwd GB/s, fwd+bwd ms, fwd+bwd GB/s) for fwd() and grads_of() = fwd+bwd."""
    fwd_ms = time_ms(fwd, device, budget_s)
    result = [fwd_ms, numel * fwd_bytes / (fwd_ms * 1e-3) / 1e9, None, None]
    if with_backward:
        both_ms = time_ms(grads_of, device, budget_s)
        result[2:] = [both_ms, numel * (fwd_bytes + bwd_bytes) / (both_ms * 1e-3) / 1e9]
    return result


def bench_ours(a, x, dh, dtype, device, budget_s, backend, label, directions, want):
    batch, length, width = a.shape
    fwd_bytes, bwd_bytes = bytes_per_element(dtype)
    records = []
    a_g, x_g = a.clone().requires_grad_(), x.clone().requires_grad_()
    for direction in directions:
        split = {"forward": width, "reverse": 0, "bidirectional": width // 2}[direction]

        def fwd():
            with torch.no_grad():
                return _scan(a, x, None, split, backend)

        def grads_of():
            h = _scan(a_g, x_g, None, split, backend)
            return torch.autograd.grad(h, (a_g, x_g), dh)

        err = rel_err(fwd(), want(split))
        numbers = measure(fwd, grads_of, device, budget_s, fwd_bytes, bwd_bytes, a.numel())
        records.append(Record(label, direction, dtype, batch, length, width, *numbers, rel_err=err))
    return records


def bench_reference(a, x, dh, dtype, device, budget_s, want):
    batch, length, width = a.shape
    fwd_bytes, bwd_bytes = bytes_per_element(dtype)
    xf = x.float()  # the loop computes in x's dtype otherwise, losing bf16 accuracy at each step
    a_g, x_g = a.clone().requires_grad_(), xf.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return linear_scan_reference(a, xf)

    def grads_of():
        return torch.autograd.grad(linear_scan_reference(a_g, x_g), (a_g, x_g), dh.float())

    err = rel_err(fwd(), want(width))
    numbers = measure(fwd, grads_of, device, budget_s / 4, fwd_bytes, bwd_bytes, a.numel())
    return [Record("reference loop", "forward", dtype, batch, length, width, *numbers, rel_err=err,
                   note="python loop over T in fp32")]


def bench_associative_scan(a, x, dh, dtype, device, budget_s, with_backward, want):
    from torch._higher_order_ops import associative_scan

    batch, length, width = a.shape
    fwd_bytes, bwd_bytes = bytes_per_element(dtype)

    def combine(left, right):
        (a_l, x_l), (a_r, x_r) = left, right
        return a_l * a_r, a_r * x_l + x_r

    def states(a, x):
        # in fp32: pairs (a, x) combine in one dtype
        return associative_scan(combine, (a, x.float()), dim=1)[1].to(x.dtype)

    compiled = torch.compile(states, fullgraph=True, dynamic=False)
    a_g, x_g = a.clone().requires_grad_(), x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return compiled(a, x)

    def grads_of():
        return torch.autograd.grad(compiled(a_g, x_g), (a_g, x_g), dh)

    try:
        err = rel_err(fwd(), want(width))
        numbers = measure(fwd, lambda: None, device, budget_s, fwd_bytes, bwd_bytes, a.numel(), False)
        note = "compiled; pairs in fp32"
        if with_backward:
            try:
                both_ms = time_ms(grads_of, device, budget_s, min_reps=1)
                numbers[2:] = [both_ms, a.numel() * (fwd_bytes + bwd_bytes) / (both_ms * 1e-3) / 1e9]
            except Exception as exc:  # report, do not stop the benchmark
                note += f"; backward failed: {type(exc).__name__}: {str(exc)[:80]}"
        else:
            note += "; backward not timed (--assoc-backward)"
        return [Record("torch associative_scan", "forward", dtype, batch, length, width, *numbers,
                       rel_err=err, note=note)]
    except Exception as exc:
        return [Record("torch associative_scan", "forward", dtype, batch, length, width,
                       note=f"failed: {type(exc).__name__}: {str(exc)[:100]}")]


ACCELERATED_VARIANTS = ("warp", "triton")  # its CUDA warp scan, its Triton scan


def accelerated_scan_child(args) -> None:
    """Runs in a child process: accelerated-scan's `args.accelerated_variant` at its (B, D, T)
    layout, prints one JSON."""
    warp_scan = importlib.import_module(f"accelerated_scan.{args.accelerated_variant}").scan

    batch, length, width, dtype = args.batch, args.lengths[0], args.width, args.dtypes[0]
    a, x, dh = make_inputs(batch, length, width, dtype, "cuda")
    want = float64_states(a, x, width)
    # its layout and its gate dtype (= the tokens' dtype)
    a_t = a.to(DTYPES[dtype]).transpose(1, 2).contiguous()
    x_t = x.transpose(1, 2).contiguous()
    dh_t = dh.transpose(1, 2).contiguous()
    fwd_bytes = 3 * torch.tensor([], dtype=DTYPES[dtype]).element_size()
    bwd_bytes = 5 * torch.tensor([], dtype=DTYPES[dtype]).element_size()
    a_g, x_g = a_t.clone().requires_grad_(), x_t.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return warp_scan(a_t, x_t)

    def grads_of():
        return torch.autograd.grad(warp_scan(a_g, x_g), (a_g, x_g), dh_t)

    h = fwd()
    torch.cuda.synchronize()
    err = rel_err(h.transpose(1, 2), want)
    numbers = measure(fwd, grads_of, "cuda", args.budget, fwd_bytes, bwd_bytes, a.numel())
    name = f"accelerated-scan {args.accelerated_variant}"
    record = Record(name, "forward", dtype, batch, length, width, *numbers, rel_err=err,
                    note=f"(B, D, T) layout, {dtype} gates")
    print("RESULT " + json.dumps(asdict(record)))


def bench_accelerated_scan(batch, length, width, dtype, budget_s):
    """Each of accelerated-scan's variants in its own child process (its warp scan crashes the
    process in bf16 at T >= 4096)."""
    records = []
    for variant in ACCELERATED_VARIANTS:
        name = f"accelerated-scan {variant}"
        try:
            importlib.import_module(f"accelerated_scan.{variant}")
        except ImportError as exc:
            records.append(Record(name, "forward", dtype, batch, length, width, note=f"not installed ({exc})"))
            continue
        if length & (length - 1):
            records.append(Record(name, "forward", dtype, batch, length, width, note="needs a power-of-two T"))
            continue
        command = [sys.executable, __file__, "--accelerated-scan-child", "--accelerated-variant", variant,
                   "--batch", str(batch), "--lengths", str(length), "--width", str(width), "--dtypes", dtype,
                   "--budget", str(budget_s)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            records.append(Record(name, "forward", dtype, batch, length, width, note="timed out"))
            continue
        results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if results:
            records.append(Record(**json.loads(results[-1][len("RESULT "):])))
            continue
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        records.append(Record(name, "forward", dtype, batch, length, width,
                              note=f"crashed (exit {done.returncode}): {tail[0][:100]}"))
    return records


def print_table(records: list[Record], copy_gbps: float) -> None:
    header = (f"{'implementation':<24}{'dir':<14}{'fwd ms':>9}{'GB/s':>8}{'%copy':>7}"
              f"{'fwd+bwd ms':>12}{'GB/s':>8}{'%copy':>7}{'rel err':>10}  note")
    print(header)
    print("-" * len(header))

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-".rjust(len(format(0.0, spec)))

    for r in records:
        fwd_pct = r.fwd_gbps / copy_gbps * 100 if r.fwd_gbps else None
        both_pct = r.fwd_bwd_gbps / copy_gbps * 100 if r.fwd_bwd_gbps else None
        print(f"{r.impl:<24}{r.direction:<14}{fmt(r.fwd_ms, '9.3f')}{fmt(r.fwd_gbps, '8.0f')}"
              f"{fmt(fwd_pct, '7.1f')}{fmt(r.fwd_bwd_ms, '12.3f')}{fmt(r.fwd_bwd_gbps, '8.0f')}"
              f"{fmt(both_pct, '7.1f')}{fmt(r.rel_err, '10.1e')}  {r.note}", flush=True)


def sweep(args, copy_gbps) -> list[Record]:
    records = []
    length = 4096 if 4096 in args.lengths else args.lengths[0]
    for dtype in args.dtypes:
        a, x, dh = make_inputs(args.batch, length, args.width, dtype, "cuda")
        want = ReferenceStates(a, x)
        print(f"\nsweep: B={args.batch} T={length} D={args.width} {dtype}", flush=True)
        rows = []
        for tile in ["auto"] + SWEEP_TILES:
            if tile == "auto":
                os.environ.pop("BIRDIE_SCAN_CUDA_TILE", None)
            else:
                os.environ["BIRDIE_SCAN_CUDA_TILE"] = tile
            for r in bench_ours(a, x, dh, dtype, "cuda", args.budget, "cuda", f"tile {tile}",
                                ["forward", "reverse"], want):
                rows.append(r)
        os.environ.pop("BIRDIE_SCAN_CUDA_TILE", None)
        print_table(rows, copy_gbps)
        records += rows
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to time (default: cuda when there is a GPU)")
    parser.add_argument("--batch", type=int, help="B (default: 8 on CUDA, 2 on CPU)")
    parser.add_argument("--lengths", type=int, nargs="+", help="the T values, one table each (default: 1024 4096 16384)")
    parser.add_argument("--width", type=int, help="D (default: 2048 on CUDA, 512 on CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="x and h types; the gates are fp32 (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement (default: 1.0)")
    parser.add_argument("--sweep", action="store_true", help="CUDA: time every kernel tile")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                        help="which implementations to time (default: all that apply)")
    parser.add_argument("--assoc-backward", action="store_true",
                        help="also time associative_scan forward+backward (off by default: its compiled "
                             "backward took 68-98 s per call at T = 1024 on an H100)")
    parser.add_argument("--threads", type=int, help="CPU: torch intra-op threads")
    parser.add_argument("--json", type=Path, help="append one JSON record per measurement")
    parser.add_argument("--accelerated-scan-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--accelerated-variant", choices=ACCELERATED_VARIANTS, default="warp", help=argparse.SUPPRESS)
    args = parser.parse_args()

    cpu = args.device == "cpu"
    args.batch = args.batch or (2 if cpu else 8)
    args.lengths = args.lengths or [1024, 4096, 16384]
    args.width = args.width or (512 if cpu else 2048)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.accelerated_scan_child:
        accelerated_scan_child(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu")

    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    copy_bytes = (1 << 30) if device == "cuda" else (1 << 28)
    copy_gbps = copy_bandwidth_gbps(device, copy_bytes, args.budget)
    print(f"device: {name}; torch {torch.__version__}")
    print(f"copy roofline: {copy_gbps:.0f} GB/s (read + write of a {copy_bytes >> 20} MiB copy); "
          "%copy below is against it")
    if device == "cpu":
        fresh = copy_bandwidth_gbps(device, copy_bytes, args.budget, allocate=True)
        print(f"allocating copy (clone): {fresh:.0f} GB/s: the ceiling for any op returning a "
              "new large tensor here (page faults on fresh memory)")

    records: list[Record] = []
    if args.sweep:
        if device != "cuda":
            parser.error("--sweep needs CUDA")
        records += sweep(args, copy_gbps)
    else:
        for length in args.lengths:
            for dtype in args.dtypes:
                a, x, dh = make_inputs(args.batch, length, args.width, dtype, device)
                fwd_bytes, bwd_bytes = bytes_per_element(dtype)
                floor_fwd = a.numel() * fwd_bytes / (copy_gbps * 1e9) * 1e3
                floor_both = a.numel() * (fwd_bytes + bwd_bytes) / (copy_gbps * 1e9) * 1e3
                print(f"\nB={args.batch} T={length} D={args.width} {dtype} (gates fp32): "
                      f"{fwd_bytes} + {bwd_bytes} B/element; floor at copy bandwidth: "
                      f"fwd {floor_fwd:.3f} ms, fwd+bwd {floor_both:.3f} ms", flush=True)
                backend = "cuda" if device == "cuda" else "cpp"
                label = "linear_scan (cuda)" if device == "cuda" else "linear_scan (c++)"
                want = ReferenceStates(a, x)
                rows = []
                if "ours" in args.impls:
                    rows += bench_ours(a, x, dh, dtype, device, args.budget, backend, label,
                                       ["forward", "reverse", "bidirectional"], want)
                if "associative" in args.impls and device == "cuda":
                    rows += bench_associative_scan(a, x, dh, dtype, device, args.budget,
                                                   args.assoc_backward, want)
                if "reference" in args.impls:
                    rows += bench_reference(a, x, dh, dtype, device, args.budget, want)
                if "accelerated" in args.impls and device == "cuda":
                    rows += bench_accelerated_scan(args.batch, length, args.width, dtype, args.budget)
                print_table(rows, copy_gbps)
                records += rows
                del a, x, dh, want
                if device == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        with args.json.open("a") as f:
            for r in records:
                f.write(json.dumps({**asdict(r), "device": name, "copy_gbps": copy_gbps}) + "\n")


if __name__ == "__main__":
    main()
