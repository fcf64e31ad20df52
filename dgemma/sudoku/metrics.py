"""Sudoku evaluation metrics: exact boards, cell accuracy, givens preserved, denoising steps.

``evaluate`` returns a JSON-ready dict::

    {"overall": M, "by_bucket": {"easy": M, "medium": M, "hard": M}, "by_givens": {"25": M, ...}}

where each M has keys ``exact``, ``cell_accuracy``, ``givens_preserved``,
``mean_steps`` (None when steps are not given) and ``n``.  Buckets: easy >= 40
givens, medium 30-39, hard < 30.  Metric values are None for an empty group.

Definitions (per puzzle, then averaged over puzzles except cell accuracy):

* exact: the prediction equals the known solution; for an unlabelled puzzle, it is a
  complete valid grid that keeps every given.
* cell_accuracy: pooled over the blank cells of all puzzles in the group (micro
  average).  Labelled: predicted digit == solution digit.  Unlabelled: the cell holds
  a digit 1-9 that no other cell of its row, column or box repeats.
* givens_preserved: every given appears unchanged in the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .board import is_consistent, is_solution

BUCKETS = ("easy", "medium", "hard")


def bucket_of(n_givens: int) -> str:
    """Difficulty bucket by number of givens."""
    return "easy" if n_givens >= 40 else "medium" if n_givens >= 30 else "hard"


def conflict_free_cells(grid: np.ndarray) -> np.ndarray:
    """bool [81]: cell holds 1-9 and its digit is unique in its row, column and box."""
    g = np.asarray(grid, dtype=np.int64).reshape(9, 9)
    onehot = np.eye(10, dtype=np.int64)[g]  # [9, 9, 10]
    rows = onehot.sum(axis=1, keepdims=True)  # [9, 1, 10]
    cols = onehot.sum(axis=0, keepdims=True)  # [1, 9, 10]
    boxes = onehot.reshape(3, 3, 3, 3, 10).sum(axis=(1, 3))  # [3, 3, 10] per box
    boxes = boxes.repeat(3, axis=0).repeat(3, axis=1)  # back to [9, 9, 10]
    own = onehot.astype(bool)

    def count(t: np.ndarray) -> np.ndarray:  # how many cells in the unit share my digit
        return np.broadcast_to(t, onehot.shape)[own].reshape(9, 9)

    ok = (g > 0) & (count(rows) == 1) & (count(cols) == 1) & (count(boxes) == 1)
    return ok.ravel()


def score_puzzle(puzzle: np.ndarray, prediction: np.ndarray, solution: np.ndarray | None = None) -> dict:
    """Per-puzzle scores: exact (bool), correct/blank cell counts, givens_preserved (bool)."""
    p = np.asarray(puzzle).ravel()
    pred = np.asarray(prediction).ravel()
    blanks = p == 0
    if solution is not None:
        sol = np.asarray(solution).ravel()
        exact = bool(np.array_equal(pred, sol))
        correct = int(np.sum(pred[blanks] == sol[blanks]))
    else:
        exact = is_solution(p, pred)
        correct = int(np.sum(conflict_free_cells(pred)[blanks]))
    return {
        "exact": exact,
        "correct_cells": correct,
        "blank_cells": int(blanks.sum()),
        "givens_preserved": is_consistent(p, pred),
    }


def _summarise(scores: list[dict], steps: list[float] | None) -> dict:
    n = len(scores)
    if n == 0:
        return {"exact": None, "cell_accuracy": None, "givens_preserved": None, "mean_steps": None, "n": 0}
    blanks = sum(s["blank_cells"] for s in scores)
    return {
        "exact": sum(s["exact"] for s in scores) / n,
        "cell_accuracy": sum(s["correct_cells"] for s in scores) / blanks if blanks else 1.0,
        "givens_preserved": sum(s["givens_preserved"] for s in scores) / n,
        "mean_steps": float(np.mean(steps)) if steps else None,
        "n": n,
    }


def evaluate(
    puzzles: Sequence[np.ndarray] | np.ndarray,
    predictions: Sequence[np.ndarray] | np.ndarray,
    solutions: Sequence[np.ndarray | None] | None = None,
    steps: Sequence[float] | None = None,
) -> dict:
    """Score predictions overall, by difficulty bucket and by number of givens."""
    n = len(puzzles)
    if len(predictions) != n:
        raise ValueError(f"got {n} puzzles but {len(predictions)} predictions")
    if solutions is not None and len(solutions) != n:
        raise ValueError(f"got {n} puzzles but {len(solutions)} solutions")
    if steps is not None and len(steps) != n:
        raise ValueError(f"got {n} puzzles but {len(steps)} step counts")
    scores, givens = [], []
    for i in range(n):
        sol = None if solutions is None else solutions[i]
        scores.append(score_puzzle(puzzles[i], predictions[i], sol))
        givens.append(int(np.count_nonzero(np.asarray(puzzles[i]))))
    step_list = None if steps is None else [float(s) for s in steps]

    def group(indices: list[int]) -> dict:
        sub_steps = None if step_list is None else [step_list[i] for i in indices]
        return _summarise([scores[i] for i in indices], sub_steps)

    by_bucket: dict[str, list[int]] = {b: [] for b in BUCKETS}
    by_givens: dict[int, list[int]] = {}
    for i, k in enumerate(givens):
        by_bucket[bucket_of(k)].append(i)
        by_givens.setdefault(k, []).append(i)
    return {
        "overall": group(list(range(n))),
        "by_bucket": {b: group(idx) for b, idx in by_bucket.items()},
        "by_givens": {str(k): group(by_givens[k]) for k in sorted(by_givens)},
    }
