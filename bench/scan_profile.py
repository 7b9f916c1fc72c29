"""One launch of each scan kernel at the benchmark's main shape, for a profiler to read:

    ncu -k regex:linear_scan --section SpeedOfLight --section Occupancy python bench/scan_profile.py

Runs the forward and the backward kernel once per dtype (fp32 and bf16 x, fp32 gates) at
B = 8, T = 4096, D = 2048 (the first call builds the extension if needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.scan.op import _linear_scan_backward_op, _scan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[8, 4096, 2048], metavar=("B", "T", "D"),
                        help="the inputs' shape (default: 8 4096 2048)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="x and h types; the gates are fp32 (default: fp32 bf16)")
    parser.add_argument("--split", type=int, help="channels scanned left to right (default: all)")
    args = parser.parse_args()
    batch, length, width = args.shape
    split = width if args.split is None else args.split
    for name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        a = torch.rand(batch, length, width, device="cuda").mul_(0.1).add_(0.9)
        x = torch.randn(batch, length, width, device="cuda").to(dtype)
        dh = torch.randn(batch, length, width, device="cuda").to(dtype)
        h = _scan(a, x, None, split)
        _linear_scan_backward_op(a, h, dh, None, split, "auto")
        torch.cuda.synchronize()
        print(f"{name}: one forward and one backward launch at B={batch} T={length} D={width}")


if __name__ == "__main__":
    main()
