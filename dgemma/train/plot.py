"""`dgemma train plot RUN`: the loss curves of a run folder, drawn from its metrics.jsonl into RUN/loss.png.

    dgemma train plot runs/lora                  # runs/lora/loss.png
    dgemma train plot runs/a runs/b --out cmp.png

Left: the training loss and its two parts (denoising, encoder next-token), as logged (interval means), with the
validation losses as markers. Right: the learning rate. Needs matplotlib (`pip install "dgemma[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import Parser

CURVES = (("loss", "loss"), ("decoder_loss", "denoising"), ("encoder_loss", "encoder next-token"))


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.jsonl (is it a run folder of `dgemma train`?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON line") from None
    if not rows:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    return rows


def plot(runs: list[Path], out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise ImportError('dgemma train plot needs matplotlib: pip install "dgemma[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    for run in runs:
        rows = read_metrics(run)
        tag = f"{run.name}: " if len(runs) > 1 else ""
        for key, label in CURVES:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                line, = ax.plot(*zip(*pts), label=f"{tag}{label}", lw=1.6 if key == "loss" else 1.0,
                                alpha=1.0 if key == "loss" else 0.7)
                val = [(r["step"], r[f"val_{key}"]) for r in rows if r.get(f"val_{key}") is not None]
                if val:
                    ax.plot(*zip(*val), "o--", color=line.get_color(), ms=4, lw=0.8,
                            label=f"{tag}validation {label}")
        lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
        if lr:
            ax_lr.plot(*zip(*lr), label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(", ".join(r.name for r in runs))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    p = Parser(prog="dgemma train plot", description="Draw the loss curves of run folders (metrics.jsonl).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default=None, help="picture to write (None: RUN/loss.png of the first run)")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    try:
        out = plot(runs, Path(args.out) if args.out else runs[0] / "loss.png")
    except (ValueError, ImportError) as e:
        print(f"dgemma train plot: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
