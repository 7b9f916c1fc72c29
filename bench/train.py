"""Training throughput of a bidirectional Hawk: tokens/s and model FLOPs utilisation with our
scan and with the reference scan, and the share of step time spent waiting for data when the
batches come from an objective server on loopback.

    python bench/train.py                      # GPU: ~117M-parameter Hawk, L = 2048, B = 8, bf16 autocast
    python bench/train.py --device cpu --vocab-size 8192 --d-model 64 --n-layers 2 --seq-len 256 \
        --batch-size 2 --steps 3 --reference-steps 1 --server-steps 5      # a quick CPU run

The default model is GPT-2-small-sized (d_model 768, 12 blocks, vocabulary 32768; the "125M" of GPT-3's
and later papers' tables): 117,271,296 parameters in part 1.

Part 1 times full training steps (forward, backward, AdamW) on one fixed packed batch (examples
of 512 tokens, the first half prefix): `linear_scan` with its automatic backend (CUDA kernels
on a GPU, the C++ backend on a CPU) against the op's pure-PyTorch sequential reference backend,
taking turns step by step on one model; the median step time of each.
MFU = model FLOPs per token (`flops_per_token`: matmuls, convs, scans; forward + backward) x
tokens/s / peak; the peak is the GPU's dense bf16 peak from its name, or --peak-tflops.

Part 2 starts `birdie-server serve` (in-process store, default corpus) on a free loopback port,
creates a `birdie`-preset run of the same shape and trains through `trainer.train` for a few
steps (the vocabulary is then the corpus tokenizer's): tokens/s and the data-wait fraction (time
blocked on the prefetching batch iterator over the whole step time). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainer.models.hawk as hawk_module  # noqa: E402
from trainer.evaluate import forward_logits, token_losses  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.models.common import IGNORE_INDEX, PREFIX, SUFFIX  # noqa: E402
from trainer.scan.op import _scan  # noqa: E402
from trainer.train import TrainConfig, make_optimizer, train  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
EXAMPLE_LENGTH = 512


@contextlib.contextmanager
def scan_backend(backend: str):
    """Route Hawk's scans through one backend of the scan op ("auto": our kernels)."""
    if backend == "auto":
        yield
        return
    originals = hawk_module.linear_scan, hawk_module.linear_scan_bidirectional

    def forward_only(a, x):
        return _scan(a, x, None, x.shape[-1], backend)

    def bidirectional(a, x, split=None):
        return _scan(a, x, None, x.shape[-1] // 2 if split is None else split, backend)

    hawk_module.linear_scan, hawk_module.linear_scan_bidirectional = forward_only, bidirectional
    try:
        yield
    finally:
        hawk_module.linear_scan, hawk_module.linear_scan_bidirectional = originals


def packed_batch(batch_size: int, seq_len: int, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens in the server's layout: examples of EXAMPLE_LENGTH tokens, prefix then suffix."""
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(seq_len)
    offset = positions % EXAMPLE_LENGTH
    length = min(EXAMPLE_LENGTH, seq_len)
    prefix = offset < length // 2
    input_ids = torch.randint(300, vocab_size, (batch_size, seq_len), generator=generator)
    labels = torch.where(prefix, torch.full_like(input_ids, IGNORE_INDEX), input_ids.roll(-1, dims=1))
    arrays = {
        "input_ids": input_ids,
        "label_ids": labels,
        "attention_mask": torch.where(prefix, PREFIX, SUFFIX).expand(batch_size, seq_len),
        "segment_ids": (positions // EXAMPLE_LENGTH + 1).expand(batch_size, seq_len),
        "position_ids": offset.expand(batch_size, seq_len),
        "objective_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
    }
    return {name: a.contiguous().to(device) for name, a in arrays.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(args, device: torch.device, plan: dict[str, int]) -> list[dict]:
    """Median step time per scan backend; `plan` maps backend -> timed steps. One model and
    optimiser for all of them, and the backends take turns step by step, so a busy machine's
    load drift affects them alike."""
    torch.manual_seed(0)
    model = build_model("hawk", vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
                        bidirectional=True).to(device)
    config = TrainConfig(steps=1000, lr=1e-4, warmup_steps=10)
    optimizer, _ = make_optimizer(model, config, 1000, device)
    batch = packed_batch(args.batch_size, args.seq_len, args.vocab_size, device)
    labels = batch["label_ids"]
    count = (labels != IGNORE_INDEX).sum()

    compiled = torch.compile(model) if args.compile else model

    def step(backend: str) -> None:
        # torch.compile fuses the elementwise work around the scans (our op compiles without a
        # graph break); the reference scan's Python loop runs eagerly
        runner = compiled if backend == "auto" else model
        loss = token_losses(forward_logits(runner, batch), labels).sum() / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    times: dict[str, list[float]] = {backend: [] for backend in plan}
    memory: dict[str, float] = {}
    for round_index in range(args.warmup + max(plan.values())):
        for backend, steps in plan.items():
            if round_index >= args.warmup + steps:
                continue
            with scan_backend(backend):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                synchronize(device)
                started = time.perf_counter()
                step(backend)
                synchronize(device)
            if round_index >= args.warmup:
                times[backend].append(time.perf_counter() - started)
            if device.type == "cuda":
                memory[backend] = torch.cuda.max_memory_allocated(device) / 2**30
    records = []
    tokens = args.batch_size * args.seq_len
    for backend, measured in times.items():
        seconds = statistics.median(measured)
        flops = model.flops_per_token(args.seq_len) * tokens / seconds
        records.append({
            "part": "model", "scan": ("ours+compile" if args.compile else "ours") if backend == "auto" else backend, "parameters": model.num_params(),
            "step_ms": 1000 * seconds, "tokens_per_s": tokens / seconds, "model_tflops": flops / 1e12,
            "mfu": flops / (args.peak_tflops * 1e12) if args.peak_tflops else None, "steps": len(measured),
            **({"max_memory_gb": memory[backend]} if backend in memory else {}),
        })
    return records


def server_steps(args, device: torch.device) -> dict:
    from trainer.main_job import LocalServer

    with tempfile.TemporaryDirectory() as folder:
        env = {"BIRDIE_GENERATION_WORKERS": str(args.generation_workers), "BIRDIE_PREFETCH_DEPTH": str(args.server_prefetch)}
        print(f"starting the objective server (generation workers {args.generation_workers}) ...", file=sys.stderr)
        with LocalServer(Path(folder) / "server.log", env=env) as server:
            config = TrainConfig(
                model="hawk", d_model=args.d_model, n_layers=args.n_layers, bidirectional=True,
                server_url=server.url, run_name="bench", create_run=True, preset="birdie", seq_len=args.seq_len,
                batch_size=args.batch_size, policy="fixed", steps=args.server_steps, evaluate=False,
                lr=1e-4, warmup_steps=2, prefetch=args.prefetch, device=str(device), progress=False,
            )
            result = train(config)
    steady = result.history[args.warmup:] or result.history
    return {
        "part": "server", "scan": "ours", "parameters": result.num_params, "vocab_size": result.model.config.vocab_size,
        "steps": len(steady), "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in steady),
        "step_ms": 1000 * statistics.mean(r["step_seconds"] for r in steady),
        "data_wait": statistics.mean(r["data_wait"] for r in steady),
        "data_wait_max": max(r["data_wait"] for r in steady), "client_prefetch": args.prefetch,
        "generation_workers": args.generation_workers,
    }


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help="vocabulary of part 1's model (default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=768, help="Hawk's width (default: %(default)s)")
    parser.add_argument("--n-layers", type=int, default=12, help="number of Hawk blocks (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=2048, help="row length in tokens (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps with our scan (default: %(default)s)")
    parser.add_argument("--reference-steps", type=int, default=2,
                        help="timed steps with the reference scan (0: skip) (default: %(default)s)")
    parser.add_argument("--server-steps", type=int, default=20,
                        help="steps through the server (0: skip part 2) (default: %(default)s)")
    parser.add_argument("--prefetch", type=int, default=4,
                        help="client prefetch (batches in flight) (default: %(default)s)")
    parser.add_argument("--generation-workers", type=int, default=2,
                        help="server generation processes (default: %(default)s)")
    parser.add_argument("--server-prefetch", type=int, default=2,
                        help="steps the server generates ahead per rank (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, help="peak for MFU (default: the GPU's dense bf16 peak)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for our scan's steps")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="also append one JSON record per measurement to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.peak_tflops = args.peak_tflops or peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {device} ({name}), {torch.get_num_threads()} CPU threads; Hawk d_model "
          f"{args.d_model}, {args.n_layers} layers, vocab {args.vocab_size}, B = {args.batch_size}, L = {args.seq_len}; "
          f"peak {args.peak_tflops or 'unknown'} TFLOP/s")

    plan = {"auto": args.steps, **({"reference": args.reference_steps} if args.reference_steps else {})}
    records = time_steps(args, device, plan)
    if args.server_steps:
        records.append(server_steps(args, device))

    header = f"{'part':<7}{'scan':<14}{'params':>12}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>8}{'data wait':>11}"
    print(header)
    for r in records:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        tflops = f"{r['model_tflops']:.2f}" if "model_tflops" in r else ""
        wait = f"{r['data_wait']:.1%}" if "data_wait" in r else ""
        print(f"{r['part']:<7}{r['scan']:<14}{r['parameters']:>12,}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}"
              f"{tflops:>9}{mfu:>8}{wait:>11}")
    if len(records) > 1 and records[1]["scan"] == "reference":
        print(f"our scan: {records[1]['step_ms'] / records[0]['step_ms']:.1f}x faster steps than the reference scan")
    if args.json:
        with open(args.json, "a") as f:
            for r in records:
                f.write(json.dumps({**r, "device": name, "seq_len": args.seq_len, "batch_size": args.batch_size}) + "\n")


if __name__ == "__main__":
    main()
