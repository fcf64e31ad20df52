"""Sudoku with rule constraints: the shipped solver with and without `--rules` on an RRN subset.

    python benchmarks/sudoku_rules.py                        # 10 puzzles per number of givens (180), attempts 1 and 8
    python benchmarks/sudoku_rules.py --per-givens 20 --attempts 1 --settle 0.99,0.9,0

Each configuration denoises the same puzzles with the same seeds (puzzle i: seed + i, retries
`attempt_seed`), one canvas per attempt, at the checkpoint's sampler settings (at most 12 steps per canvas).
"off" is the model alone; "rules P" masks every step with `dgemma.sudoku.rules.SudokuRules(settle=P)`. Reports the
exact rate, blank cells right and mean denoising steps per puzzle (all attempts counted), overall and per band of
givens, prints a table and writes benchmarks/results/sudoku_rules.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dgemma.sudoku.cli import run_diffusion
from dgemma.sudoku.data import load_puzzles

ROOT = Path(__file__).resolve().parents[1]
BANDS = ((17, 22), (23, 28), (29, 34))


def rrn_subset(path: Path, per_givens: int) -> tuple[np.ndarray, list]:
    """The first `per_givens` rows of each number of givens (the file is shuffled), as runs/sudoku.sh builds it."""
    seen: Counter = Counter()
    puzzles, solutions = [], []
    for r in load_puzzles(path):
        k = int(np.count_nonzero(r.puzzle))
        if seen[k] < per_givens:
            seen[k] += 1
            puzzles.append(r.puzzle)
            solutions.append(r.solution)
    return np.stack(puzzles), solutions


def summary(report: dict, puzzles: np.ndarray) -> dict:
    o = report["overall"]
    bands = {}
    for lo, hi in BANDS:
        rows = [m for k, m in report["by_givens"].items() if lo <= int(k) <= hi]
        n = sum(m["n"] for m in rows)
        bands[f"{lo}-{hi}"] = {"n": n, "exact": sum(m["exact"] * m["n"] for m in rows) / n,
                               "mean_steps": sum(m["mean_steps"] * m["n"] for m in rows) / n}
    return {"exact": o["exact"], "cell_accuracy": o["cell_accuracy"], "givens_preserved": o["givens_preserved"],
            "mean_steps": o["mean_steps"], "mean_attempts": report["mean_attempts"], "seconds": report["seconds"],
            "bands": bands}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--file", default=str(ROOT.parent / "shared" / "data" / "sudoku" / "rrn_test_18k.csv"))
    p.add_argument("--per-givens", type=int, default=10)
    p.add_argument("--attempts", default="1,8", help="comma list")
    p.add_argument("--settle", default="0.99", help="comma list of settle thresholds for the rules runs")
    p.add_argument("--full-sweep-once", action="store_true",
                   help="also run settle 0 (every cell bans its digit in its peers) at the first attempt count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sudoku_rules.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    puzzles, solutions = rrn_subset(Path(args.file), args.per_givens)
    settles = [float(x) for x in args.settle.split(",")]
    runs = []
    for a in [int(x) for x in args.attempts.split(",")]:
        configs = [None] + settles + ([0.0] if args.full_sweep_once and a == int(args.attempts.split(",")[0])
                                      and 0.0 not in settles else [])
        for settle in configs:
            t0 = time.perf_counter()
            report = run_diffusion(puzzles, solutions, None, None, 64, args.seed, False, attempts=a, rules=settle)
            runs.append({"attempts": a, "rules": settle, **summary(report, puzzles)})
            r = runs[-1]
            name = "off" if settle is None else f"rules {settle:g}"
            print(f"attempts {a:>2}  {name:<11} exact {100 * r['exact']:5.1f}%"
                  f"  cells {100 * r['cell_accuracy']:5.1f}%  mean steps {r['mean_steps']:6.2f}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    head = f"| attempts | rules | exact | blank cells right | mean steps | " + " | ".join(
        f"exact {lo}-{hi} givens" for lo, hi in BANDS) + " |"
    lines = [head, "|" + "---|" * (5 + len(BANDS))]
    for r in runs:
        rule = "off" if r["rules"] is None else f"settle {r['rules']:g}"
        lines.append(f"| {r['attempts']} | {rule} | {100 * r['exact']:.1f}% | {100 * r['cell_accuracy']:.1f}% | "
                     f"{r['mean_steps']:.2f} | " + " | ".join(f"{100 * b['exact']:.0f}%" for b in r["bands"].values())
                     + " |")
    print(f"\n{Path(args.file).name}: {len(puzzles)} puzzles ({args.per_givens} per number of givens, 17-34), "
          f"seed {args.seed}, at most 12 steps per canvas")
    print("\n".join(lines))
    out = {"file": Path(args.file).name, "per_givens": args.per_givens, "n": len(puzzles), "seed": args.seed,
           "threads": args.threads, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
