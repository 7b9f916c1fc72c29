"""Packed tokens/s of batch generation, per objective and per preset, on one core.

    python bench/objectives.py [--seq-len 2048 8192] [--seconds 2] [--corpus DIR]

A packed token is a non-padding position of a (B, L) batch ("tokens/s"; "fill": their share of
the positions). Each figure is generate_batch() called for consecutive steps (new rows, new
windows) for about --seconds, single-threaded.
Targets: every objective >= 1M tokens/s per core at L = 2048, every preset >= 2M (the "target"
column; a shared or busy machine misses them for reasons of its own).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from objective_server.batching import generate_batch  # noqa: E402
from objective_server.objectives import parse_objective  # noqa: E402
from objective_server.objectives.presets import list_presets, preset  # noqa: E402

# One representative configuration per objective (lengths above the row length are cut to it).
OBJECTIVES = [  # one per family, and autoencoding with deshuffling
    {"family": "next_token", "length": 8192},
    {"family": "prefix_lm", "fraction": 0.75, "length": 8192},
    {"family": "infilling", "mean_span": 3, "rate": 0.15, "length": 1024},
    {"family": "copying", "length": 512},
    {"family": "deshuffling", "fraction": 0.5, "length": 512},
    {"family": "autoencoding", "mean_span": 3, "rate": 0.15, "length": 512},
    {"family": "autoencoding", "mean_span": 3, "rate": 0.15, "length": 512, "deshuffle": True},
    {"family": "selective_copying", "n_spans": 2, "length": 1024},
]


def measure(objectives, probs, tokens, special, seq_len, batch_size, seconds):
    step = packed = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or step < 3:
        b = generate_batch(objectives, probs, tokens, special, seed=0, batch_size=batch_size,
                           seq_len=seq_len, rank=0, world_size=1, step=step)
        packed += int(np.count_nonzero(b.segment_ids))
        step += 1
    return packed / elapsed, packed / (step * batch_size * seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048, 8192],
                    help="row lengths, one table each (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="seconds of batch generation per objective and preset (default: %(default)s)")
    ap.add_argument("--corpus", help="a prepared token store (default: the embedded default corpus)")
    args = ap.parse_args()

    from objective_server.corpus.default import default_store
    from objective_server.corpus.store import TokenStore

    store = TokenStore.open(args.corpus) if args.corpus else default_store()
    tokens, special = store.split("train").tokens, store.special
    console = Console()
    console.print(f"corpus {store.path} ({len(tokens):,} tokens), batch {args.batch_size}, one core")
    for seq_len in args.seq_len:
        table = Table(title=f"L = {seq_len}")
        for col in ("what", "tokens/s", "fill", "target"):
            table.add_column(col, justify="right" if col != "what" else "left")
        for spec in OBJECTIVES:
            obj = parse_objective({**spec, "length": min(spec["length"], seq_len)})
            rate, fill = measure([obj], [1.0], tokens, special, seq_len, args.batch_size, args.seconds)
            ok = "-" if seq_len != 2048 else "ok" if rate >= 1e6 else "MISS (1M)"
            table.add_row(obj.name, f"{rate / 1e6:.2f}M", f"{fill:.3f}", ok)
        # A preset's configurations are fitted to the row length, and some coincide at long rows.
        for name in list_presets():
            arms = preset(name, seq_len=seq_len)
            rate, fill = measure([o for o, _ in arms], [p for _, p in arms], tokens, special, seq_len,
                                 args.batch_size, args.seconds)
            ok = "-" if seq_len != 2048 else "ok" if rate >= 2e6 else "MISS (2M)"
            table.add_row(f"preset {name} ({len(arms)} configuration{'s' if len(arms) > 1 else ''})", f"{rate / 1e6:.2f}M", f"{fill:.3f}", ok)
        console.print(table)


if __name__ == "__main__":
    main()
