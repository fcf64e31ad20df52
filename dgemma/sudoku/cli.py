"""`dgemma sudoku`: train, evaluate, run and benchmark the Sudoku solver.

    dgemma sudoku solve 53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79
    dgemma sudoku eval ../shared/data/sudoku/satnet_10k.csv --rows -1000: --json satnet.json
    dgemma sudoku train --out runs/sudoku/diffusion --steps 2000 --warmup 50      # runs/sudoku.sh: the shipped recipe
    dgemma sudoku train --out runs/sudoku/ar --steps 2000 --warmup 50 --ar
    dgemma sudoku bench ../shared/data/sudoku/satnet_10k.csv --rows -200: --ar-model runs/sudoku/ar/final

The default model is the one shipped in the package (dgemma/assets/sudoku). Errors print one line and exit 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..cli import Parser

# MARK: helpers


class InputError(ValueError):
    """Malformed or contradictory user input: reported as one line, exit status 2."""


def _progress(total: int, label: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False, console=None)


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _write_json(path: str, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


# MARK: train


class _Stop(Exception):
    def __init__(self, records):
        self.records = records


def _stopper(stop_at: int | None):
    def hook(trainer, rec):
        if stop_at is not None and trainer.step >= stop_at:
            trainer.save()
            raise _Stop([rec])
    return hook


def train_main(argv: list[str]) -> int:
    p = Parser(prog="dgemma sudoku train", description="Train the Sudoku solver (block diffusion) or its AR baseline.")
    p.add_argument("--out", required=True, help="run folder (resumed from its latest checkpoint when present)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ar", action="store_true", help="train the autoregressive baseline (encoder next-token loss only)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps/20, at most 100)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--self-cond-prob", type=float, default=None, help="default 0.5 (diffusion), 0 (AR)")
    p.add_argument("--givens", default=None, help="training givens range LO:HI (default: the recipe's 22:45)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None,
                   help="checkpoint and stop at this step; the schedule still spans --steps (a budgeted run that a "
                        "later call can resume, with a re-aimed --steps)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--export", default=None, help="also write the final model here (default: OUT/final only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the published runs used 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    _threads(args.threads)

    import torch

    from .. import checkpoint
    from ..model import DiffusionGemma
    from ..train import Trainer
    from . import recipe

    out = Path(args.out)
    givens = recipe.GIVENS_RANGE
    if args.givens:
        lo, _, hi = args.givens.partition(":")
        givens = (int(lo), int(hi or lo))
    overrides = {}
    if args.warmup is not None:
        overrides["warmup"] = args.warmup
    if args.self_cond_prob is not None:
        overrides["self_cond_prob"] = args.self_cond_prob
    cfg = recipe.train_config(args.steps, args.batch_size, ar=args.ar, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                              save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
                              **overrides)
    latest = out / "checkpoints" / "LATEST"
    if latest.is_file() and (out / "checkpoints" / latest.read_text().strip() / "model").is_dir():
        # A resumed run keeps its architecture: the Trainer then restores weights, optimiser, data position, RNGs.
        model = checkpoint.load(out / "checkpoints" / latest.read_text().strip() / "model",
                                dtype=torch.float32).model
    else:
        model = DiffusionGemma(recipe.model_config(hidden_size=args.hidden_size, num_hidden_layers=args.layers))
        model.init_weights(generator=torch.Generator().manual_seed(args.seed))
    source = recipe.SudokuSource(seed=args.seed, givens=givens)
    gen = recipe.generation_config()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(model, source, cfg, out, generation=gen, device=device, on_step=_stopper(args.stop_at))
    if trainer.step:
        print(f"resumed from step {trainer.step} ({trainer.position} examples)", file=sys.stderr)
    objective = "ar" if args.ar else "diffusion"
    run_file = out / "run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    if trainer.step and run.get("objective", objective) != objective:
        raise InputError(f"{out} holds a {run['objective']} run; resuming it as {objective} would mix objectives")
    run = {"objective": objective, "givens": list(givens), "params": sum(p.numel() for p in model.parameters()),
           "stages": run.get("stages", []) + [{"from_step": trainer.step, "threads": torch.get_num_threads(),
                                               "argv": argv}]}
    _write_json(str(run_file), run)
    t0 = time.perf_counter()
    try:
        records = trainer.train()
    except _Stop as stop:
        records = stop.records
    final = trainer.export(out / "final")
    if args.export:
        trainer.export(args.export)
    last = records[-1] if records else {}
    print(json.dumps({"final": str(final), "step": trainer.step, "loss": last.get("loss"),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


# MARK: solve


def _read_puzzles(arg: str) -> list[tuple[str, np.ndarray]]:
    """(label, puzzle) from an 81-cell string or a .csv/.txt file; InputError with one line when malformed."""
    from .board import parse_board
    from .data import load_puzzles

    path = Path(arg)
    if path.is_file():
        records = load_puzzles(path)
        if not records:
            raise InputError(f"{path}: no puzzles in the file")
        return [(f"{path.name}#{i + 1}", r.puzzle) for i, r in enumerate(records)]
    if path.suffix.lower() in (".csv", ".txt") or os.sep in arg:
        raise InputError(f"{arg}: no such file")
    try:
        return [("puzzle", parse_board(arg))]
    except ValueError as e:
        raise InputError(f"malformed puzzle: {e}") from None


def _contradiction(puzzle: np.ndarray) -> str | None:
    """Why a puzzle cannot be solved (a repeated given, or no solution at all), else None."""
    from .board import givens_conflict, solve

    g = puzzle.reshape(9, 9)
    if givens_conflict(puzzle):
        units = [("row", lambda i: g[i]), ("column", lambda i: g[:, i]),
                 ("box", lambda i: g[3 * (i // 3):3 * (i // 3) + 3, 3 * (i % 3):3 * (i % 3) + 3].ravel())]
        for name, unit in units:
            for i in range(9):
                vals = unit(i)[unit(i) > 0]
                dup = [d for d in set(vals.tolist()) if (vals == d).sum() > 1]
                if dup:
                    return f"digit {dup[0]} appears twice in {name} {i + 1}"
    if solve(puzzle) is None:
        return "the givens admit no solution"
    return None


def check_board(puzzle: np.ndarray, board: np.ndarray) -> dict:
    """Validity of a model's board: complete and rule-abiding, and keeping every given."""
    from .board import is_complete_valid, is_consistent
    from .metrics import conflict_free_cells

    valid, consistent = is_complete_valid(board), is_consistent(puzzle, board)
    return {"valid": valid, "consistent": consistent, "solved": valid and consistent,
            "blank_cells": int((board == 0).sum()),
            "conflicting_cells": int((~conflict_free_cells(board)).sum() - (board == 0).sum()),
            "givens_changed": int(((puzzle != 0) & (puzzle != board)).sum())}


def _verdict(c: dict) -> str:
    if c["solved"]:
        return "solved: a valid Sudoku that keeps every given"
    why = [f"{c[k]} {label}" for k, label in (("conflicting_cells", "cells break a rule"),
                                               ("blank_cells", "cells hold no digit"),
                                               ("givens_changed", "givens changed")) if c[k]]
    return "NOT solved: " + ", ".join(why)


def solve_main(argv: list[str]) -> int:
    p = Parser(prog="dgemma sudoku solve", description="Solve a Sudoku by block diffusion and check the answer.")
    p.add_argument("puzzle", help="81 cells ('0' or '.' for blanks; spaces, | - + ignored) or a .csv/.txt file")
    p.add_argument("--model", help="solver folder (default: the shipped dgemma/assets/sudoku)")
    p.add_argument("--max-denoising-steps", type=int, default=None, help="default: the model's (12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per puzzle")
    p.add_argument("--threads", type=int, default=1)
    _add_decoding_flags(p)
    args = p.parse_args(argv)
    attempts = _attempts(args)
    puzzles = _read_puzzles(args.puzzle)
    for label, puzzle in puzzles:
        why = _contradiction(puzzle)
        if why:
            raise InputError(f"contradictory puzzle ({label}): {why}")
    _threads(args.threads)
    from .board import count_solutions, format_board, pretty_board
    from .model import Solver

    solver = Solver(args.model, batch_size=min(64, len(puzzles)))
    t0 = time.perf_counter()
    res = solver.solve([pz for _, pz in puzzles], args.max_denoising_steps, seed=args.seed, attempts=attempts,
                       rules=_rules(args), **_sampler(args))
    secs = time.perf_counter() - t0
    cap = args.max_denoising_steps or solver.generation.max_denoising_steps
    all_solved = True
    for (label, puzzle), board, steps, tries in zip(puzzles, res.boards, res.steps, res.attempts):
        c = check_board(puzzle, board)
        all_solved &= c["solved"]
        unique = count_solutions(puzzle, 2) == 1
        if args.json:
            print(json.dumps({"puzzle": format_board(puzzle), "board": format_board(board), "steps": steps,
                              "attempts": tries, "max_denoising_steps": cap, "givens": int(np.count_nonzero(puzzle)),
                              "unique": unique, **c}))
            continue
        if len(puzzles) > 1:
            print(f"== {label}")
        print(f"puzzle ({np.count_nonzero(puzzle)} givens{'' if unique else ', several solutions'}):")
        print(pretty_board(puzzle))
        spent = f"{steps} denoising steps of at most {cap}" if tries == 1 else \
            f"{steps} denoising steps in {tries} attempts of at most {cap} steps"
        print(f"\nmodel's board ({spent}):")
        print(pretty_board(board))
        hint = "" if c["solved"] or tries > 1 else " (hard puzzle? try --attempts 16)"
        print(f"\ncheck: {_verdict(c)}{hint}\n")
    if not args.json:
        print(f"[{len(puzzles)} puzzle(s) in {secs:.2f} s]", file=sys.stderr)
    return 0 if all_solved else 1


# MARK: eval


def _load_eval(file: str, rows: str | None):
    from .data import load_puzzles

    if not Path(file).is_file():
        raise InputError(f"{file}: no such file")
    records = load_puzzles(file, rows)
    if not records:
        raise InputError(f"{file}: no puzzles selected (rows {rows!r})")
    puzzles = np.stack([r.puzzle for r in records])
    labelled = all(r.solution is not None for r in records)
    solutions = [r.solution for r in records] if labelled else None
    return puzzles, solutions


def _fmt(x, pct=True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.2f}"


def format_report(report: dict, title: str) -> str:
    """The eval table: overall, by bucket, by number of givens."""
    head = f"{'group':<14}{'n':>6}{'exact':>9}{'cells':>9}{'givens':>9}{'steps':>8}"
    lines = [title, head, "-" * len(head)]

    def row(name, m):
        lines.append(f"{name:<14}{m['n']:>6}{_fmt(m['exact']):>9}{_fmt(m['cell_accuracy']):>9}"
                     f"{_fmt(m['givens_preserved']):>9}{_fmt(m['mean_steps'], False):>8}")

    row("overall", report["overall"])
    for b, m in report["by_bucket"].items():
        if m["n"]:
            row(f"{b}", m)
    for k, m in report["by_givens"].items():
        row(f"{k} givens", m)
    return "\n".join(lines)


def _add_decoding_flags(p: Parser) -> None:
    g = p.add_argument_group("sampler overrides (default: the model's generation_config.json)")
    g.add_argument("--entropy-bound", type=float)
    g.add_argument("--t-min", type=float)
    g.add_argument("--t-max", type=float)
    p.add_argument("--attempts", type=int, default=1,
                   help="denoise a puzzle again (fresh seed) while its board is not a valid solution, up to this "
                        "many canvases; every attempt's steps are counted (default 1: the model alone)")
    p.add_argument("--rules", action="store_true",
                   help="mask each denoising step with the puzzle's rules: givens kept, and no digit that a given or "
                        "a settled cell of its row, column or box holds (default: the model alone)")
    p.add_argument("--rules-settle", type=float, default=None, metavar="P",
                   help="with --rules: a cell is settled when its best digit has probability >= P (default 0.99; "
                        "0 enforces the rules between all cells, which hurts: docs/sudoku.md)")


def _attempts(args) -> int:
    if args.attempts < 1:
        raise InputError(f"--attempts must be at least 1 (got {args.attempts})")
    return args.attempts


def _rules(args) -> float | None:
    from .rules import DEFAULT_SETTLE

    if args.rules_settle is not None and not args.rules:
        raise InputError("--rules-settle needs --rules")
    if args.rules_settle is not None and not 0 <= args.rules_settle <= 1:
        raise InputError(f"--rules-settle must be a probability in [0, 1] (got {args.rules_settle})")
    if not args.rules:
        return None
    return DEFAULT_SETTLE if args.rules_settle is None else args.rules_settle


def _sampler(args) -> dict:
    return {k: getattr(args, k) for k in ("entropy_bound", "t_min", "t_max") if getattr(args, k) is not None}


def run_diffusion(puzzles, solutions, model, steps, batch_size, seed, progress, label="solve", sampler=None,
                  attempts=1, rules=None):
    """Solve and score; returns the evaluate() dict plus timing."""
    from .metrics import evaluate
    from .model import Solver

    solver = Solver(model, batch_size=batch_size)
    t0 = time.perf_counter()
    with _progress(len(puzzles), label, progress) as bar:
        task = bar.add_task(label, total=len(puzzles))
        res = solver.solve(puzzles, steps, seed=seed, progress=lambda k: bar.advance(task, k), attempts=attempts,
                           rules=rules, **(sampler or {}))
    secs = time.perf_counter() - t0
    report = evaluate(puzzles, res.boards, solutions, steps=res.steps)
    g = solver.generation
    cap = steps or g.max_denoising_steps
    report.update(max_denoising_steps=cap, attempts=attempts, rules=rules,
                  mean_attempts=float(np.mean(res.attempts)) if res.attempts else None,
                  forwards_per_puzzle=res.forwards, seconds=round(secs, 2),
                  puzzles_per_second=round(len(puzzles) / secs, 2),
                  sampler={"entropy_bound": g.entropy_bound, "t_min": g.t_min, "t_max": g.t_max,
                           "stability_threshold": g.stability_threshold,
                           "confidence_threshold": g.confidence_threshold, **(sampler or {})})
    return report


def eval_main(argv: list[str]) -> int:
    p = Parser(prog="dgemma sudoku eval", description="Score the solver on a puzzle file (CSV or .txt).")
    p.add_argument("file", help="puzzle,solution CSV or one-puzzle-a-line .txt ('#' comments)")
    p.add_argument("--rows", default=None, help="row selection A:B (Python slice, e.g. -1000:)")
    p.add_argument("--model", help="solver folder (default: the shipped dgemma/assets/sudoku)")
    p.add_argument("--max-denoising-steps", type=int, default=None, help="default: the model's (12)")
    p.add_argument("--batch-size", type=int, default=64, help="puzzles denoised together")
    p.add_argument("--seed", type=int, default=0, help="puzzle i of the selection is seeded with SEED + i")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the full report here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    _add_decoding_flags(p)
    args = p.parse_args(argv)
    puzzles, solutions = _load_eval(args.file, args.rows)
    _threads(args.threads)
    report = run_diffusion(puzzles, solutions, args.model, args.max_denoising_steps, args.batch_size, args.seed,
                           not args.no_progress, sampler=_sampler(args), attempts=_attempts(args), rules=_rules(args))
    report.update(file=str(args.file), rows=args.rows, model=str(args.model or "dgemma/assets/sudoku"),
                  labelled=solutions is not None)
    tries = f", up to {args.attempts} attempts (mean {report['mean_attempts']:.2f})" if args.attempts > 1 else ""
    print(format_report(report, f"{args.file} (rows {args.rows or ':'}, {len(puzzles)} puzzles): max "
                                f"{report['max_denoising_steps']} denoising steps{tries}, {report['seconds']} s"))
    if args.json_out:
        _write_json(args.json_out, report)
    return 0


# MARK: bench


def run_ar(puzzles, solutions, model, batch_size, progress, attempts=1, seed=0):
    from .metrics import evaluate
    from .model import solve_ar

    t0 = time.perf_counter()
    with _progress(len(puzzles), "AR", progress) as bar:
        task = bar.add_task("AR", total=len(puzzles))
        res = solve_ar(model, puzzles, batch_size, progress=lambda k: bar.advance(task, k), attempts=attempts,
                       seed=seed)
    secs = time.perf_counter() - t0
    report = evaluate(puzzles, res.boards, solutions)
    report.update(attempts=attempts, mean_attempts=float(np.mean(res.attempts)) if res.attempts else None,
                  forwards_per_puzzle=res.forwards, seconds=round(secs, 2),
                  puzzles_per_second=round(len(puzzles) / secs, 2))
    return report


def plot_sweep(sweep: list[dict], ar: dict | None, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    steps = [r["max_denoising_steps"] for r in sweep]
    exact = [100 * r["overall"]["exact"] for r in sweep]
    tries = sweep[0].get("attempts", 1) if sweep else 1
    method = "block diffusion" + (f" (up to {tries} attempts)" if tries > 1 else "")
    ax.plot(steps, exact, "o-", color="C0", label=f"{method}: exact boards")
    ax.plot(steps, [100 * r["overall"]["cell_accuracy"] for r in sweep], "o:", color="C0", alpha=0.5, ms=3,
            label=f"{method}: blank cells right")
    for s_, e, r in zip(steps, exact, sweep):
        ax.annotate(f"{r['overall']['mean_steps']:.1f}", (s_, e), textcoords="offset points",
                    xytext=(0, -12 if e > 90 else 6), ha="center", fontsize=7, color="C0")
    if ar is not None:
        n = ar["forwards_per_puzzle"]
        ax.axhline(100 * ar["overall"]["exact"], color="C3", ls="--", label=f"AR baseline ({n:.0f} forwards): exact")
        ax.axhline(100 * ar["overall"]["cell_accuracy"], color="C3", ls=":", alpha=0.5,
                   label=f"AR baseline: blank cells right")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("max denoising steps (labels: mean steps used)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def bench_main(argv: list[str]) -> int:
    p = Parser(prog="dgemma sudoku bench", description="Block diffusion vs the AR baseline of the same size.")
    p.add_argument("file")
    p.add_argument("--rows", default=None, help="row selection A:B (Python slice)")
    p.add_argument("--model", help="diffusion solver (default: dgemma/assets/sudoku)")
    p.add_argument("--ar-model", help="AR baseline (default: dgemma/assets/sudoku_ar)")
    p.add_argument("--max-denoising-steps", default=None,
                   help="one cap or a comma list for a sweep, e.g. 1,2,4,8,12,24,48 (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", metavar="OUT")
    p.add_argument("--plot", metavar="PNG", help="accuracy vs max denoising steps, AR as a line (needs matplotlib)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    _add_decoding_flags(p)
    args = p.parse_args(argv)
    from .model import AR_RETRY_TEMPERATURE, default_ar_model_path

    puzzles, solutions = _load_eval(args.file, args.rows)
    try:
        caps = [int(x) for x in args.max_denoising_steps.split(",")] if args.max_denoising_steps else [None]
    except ValueError:
        raise InputError(f"--max-denoising-steps: expected integers, got {args.max_denoising_steps!r}") from None
    ar_path = Path(args.ar_model) if args.ar_model else default_ar_model_path()
    if not ar_path.is_dir():
        raise InputError(f"{ar_path}: no AR baseline model (train one with `dgemma sudoku train --ar`)")
    _threads(args.threads)
    sweep = [run_diffusion(puzzles, solutions, args.model, c, args.batch_size, args.seed, not args.no_progress,
                           label=f"diffusion {c or ''}".strip(), sampler=_sampler(args), attempts=_attempts(args),
                           rules=_rules(args))
             for c in caps]
    ar = run_ar(puzzles, solutions, ar_path, args.batch_size, not args.no_progress, args.attempts, args.seed)
    head = f"{'method':<24}{'exact':>9}{'cells':>9}{'givens':>9}{'forwards':>10}{'puzzles/s':>11}"
    lines = [f"{args.file} (rows {args.rows or ':'}, {len(puzzles)} puzzles)", head, "-" * len(head)]
    for r in sweep:
        o = r["overall"]
        name = f"diffusion, max {r['max_denoising_steps']}" + (f" x{args.attempts}" if args.attempts > 1 else "")
        lines.append(f"{name:<24}{_fmt(o['exact']):>9}"
                     f"{_fmt(o['cell_accuracy']):>9}{_fmt(o['givens_preserved']):>9}"
                     f"{r['forwards_per_puzzle']:>10.2f}{r['puzzles_per_second']:>11.2f}")
    o = ar["overall"]
    name = "AR baseline, greedy" if args.attempts == 1 else f"AR baseline x{args.attempts}"
    lines.append(f"{name:<24}{_fmt(o['exact']):>9}{_fmt(o['cell_accuracy']):>9}"
                 f"{_fmt(o['givens_preserved']):>9}{ar['forwards_per_puzzle']:>10.2f}{ar['puzzles_per_second']:>11.2f}")
    lines.append("forwards = model forwards per puzzle, prompt prefill included (diffusion: 1 + denoising steps)")
    if args.attempts > 1:
        lines.append(f"x{args.attempts}: up to {args.attempts} attempts until the board verifies, all counted (AR: "
                     f"greedy, then sampled at temperature {AR_RETRY_TEMPERATURE})")
    print("\n".join(lines))
    out = {"file": str(args.file), "rows": args.rows, "n": len(puzzles), "diffusion": sweep, "ar": ar,
           "model": str(args.model or "dgemma/assets/sudoku"), "ar_model": str(ar_path)}
    if args.json_out:
        _write_json(args.json_out, out)
    if args.plot:
        plot_sweep(sweep, ar, args.plot, f"{Path(args.file).name} (rows {args.rows or ':'}, {len(puzzles)} puzzles)")
    return 0


# MARK: generate


def generate_main(argv: list[str]) -> int:
    p = Parser(prog="dgemma sudoku generate",
               description="Write fresh puzzles with unique solutions (puzzle,solution CSV): validation data for "
                           "tuning, disjoint from any evaluation file.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--givens", default="30:42", help="givens range LO:HI, uniform (17-20 are very slow)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    from .board import format_board, generate_puzzle

    lo, _, hi = args.givens.partition(":")
    rng = np.random.default_rng(args.seed)
    rows = []
    for _ in range(args.n):
        puzzle, solution = generate_puzzle(int(rng.integers(int(lo), int(hi or lo) + 1)), rng)
        rows.append(f"{format_board(puzzle)},{format_board(solution)}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(rows))
    print(f"{args.out}: {args.n} puzzles, givens {lo}-{hi or lo}, seed {args.seed}")
    return 0


# MARK: entry point

COMMANDS = {
    "solve": (solve_main, "solve a puzzle (or a file of them) and check the answer"),
    "eval": (eval_main, "score the solver on a CSV or .txt puzzle file"),
    "train": (train_main, "train the solver or its AR baseline"),
    "bench": (bench_main, "block diffusion vs the autoregressive baseline"),
    "generate": (generate_main, "write fresh unique puzzles (validation data)"),
}


def _join_negative_rows(argv: list[str]) -> list[str]:
    """`--rows -1000:` would read as a flag to argparse: glue it into `--rows=-1000:`."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--rows" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"--rows={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_negative_rows(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: dgemma sudoku {" + ",".join(COMMANDS) + "} ...\n\n" + "\n".join(
            f"  {k:<10}{v[1]}" for k, v in COMMANDS.items())
        if argv and argv[0] not in ("-h", "--help"):
            print(usage, file=sys.stderr)
            print(f"dgemma sudoku: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    try:
        return COMMANDS[argv[0]][0](argv[1:]) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dgemma sudoku: error: {msg}", file=sys.stderr)
        return 2
