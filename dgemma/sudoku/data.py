"""Sudoku data: evaluation-file readers and a fast training-example generator.

Evaluation files come in two formats, chosen by suffix (``.csv`` / ``.txt``) or, for
other suffixes, by whether the first data line contains a comma:

* CSV: ``puzzle,solution`` per line, 81 characters each, ``0`` (or ``.``) for blank,
  no header (a first line without digits, e.g. ``quizzes,solutions``, is skipped).
  The solution column may be missing or empty, giving ``solution=None``.
* TXT: one 81-character puzzle per line, ``.`` or ``0`` for blank; lines starting
  with ``#`` are comments.

Blank lines are skipped in both.  A row selector ``"A:B"`` (Python slice semantics,
e.g. ``"-1000:"``) picks data rows before they are parsed, so only selected rows are
validated.  Errors are ``ValueError("<file>:<line>: <problem>")``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .board import Rng, as_rng, base_grid_pool, random_full_grid, random_symmetry


class SudokuRecord(NamedTuple):
    """One evaluation example: uint8 [81] arrays with 0 for blank."""

    puzzle: np.ndarray
    solution: np.ndarray | None


# ------------------------------------------------------------------ evaluation files


def parse_row_selector(spec: str | slice | None) -> slice:
    """Turn ``"A:B"`` / ``"A:B:C"`` (any part optional, negatives allowed) into a slice."""
    if spec is None:
        return slice(None)
    if isinstance(spec, slice):
        return spec
    parts = spec.strip().split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"row selector must look like 'A:B' (Python slice), got {spec!r}")
    try:
        bounds = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"row selector must contain integers, got {spec!r}") from None
    if len(bounds) == 3 and bounds[2] == 0:
        raise ValueError(f"row selector step cannot be zero: {spec!r}")
    return slice(*bounds)


def _cells(text: str, what: str, allow_blank: bool) -> np.ndarray:
    """Validate and convert an 81-character board string; raises ValueError(problem)."""
    if len(text) != 81:
        raise ValueError(f"{what} has {len(text)} characters, expected 81")
    allowed = ".0123456789" if allow_blank else "123456789"
    bad = sorted({ch for ch in text if ch not in allowed})
    if bad:
        hint = "digits 0-9 or '.'" if allow_blank else "digits 1-9 (no blanks)"
        raise ValueError(f"{what} contains invalid characters {bad!r}; expected {hint}")
    raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.where(raw == ord("."), 0, raw - ord("0")).astype(np.uint8)


def _parse_csv_line(line: str) -> SudokuRecord:
    fields = [f.strip() for f in line.split(",")]
    if len(fields) > 2:
        raise ValueError(f"expected 'puzzle,solution', got {len(fields)} comma-separated fields")
    puzzle = _cells(fields[0], "puzzle", allow_blank=True)
    if len(fields) == 1 or not fields[1]:
        return SudokuRecord(puzzle, None)
    solution = _cells(fields[1], "solution", allow_blank=False)
    clash = np.flatnonzero((puzzle != 0) & (puzzle != solution))
    if clash.size:
        raise ValueError(f"solution disagrees with the puzzle's given at cell {int(clash[0])}")
    return SudokuRecord(puzzle, solution)


def _parse_txt_line(line: str) -> SudokuRecord:
    if "," in line:
        raise ValueError("comma found in a .txt puzzle line (CSV content? use a .csv file)")
    return SudokuRecord(_cells(line, "puzzle", allow_blank=True), None)


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) for every non-blank, non-comment line."""
    with path.open(encoding="utf-8") as f:
        rows = [(n, ln.strip()) for n, ln in enumerate(f, 1)]
    return [(n, ln) for n, ln in rows if ln and not ln.startswith("#")]


def load_puzzles(path: str | Path, rows: str | slice | None = None, fmt: str | None = None) -> list[SudokuRecord]:
    """Read an evaluation file (format ``"csv"``/``"txt"``, default from suffix/content)."""
    path = Path(path)
    lines = _data_lines(path)
    if fmt is None:
        suffix = path.suffix.lower()
        fmt = {".csv": "csv", ".txt": "txt"}.get(suffix) or ("csv" if lines and "," in lines[0][1] else "txt")
    if fmt not in ("csv", "txt"):
        raise ValueError(f"unknown sudoku file format {fmt!r}; expected 'csv' or 'txt'")
    if fmt == "csv" and lines and not any(ch.isdigit() for ch in lines[0][1]):
        lines = lines[1:]  # header such as 'quizzes,solutions'
    parse = _parse_csv_line if fmt == "csv" else _parse_txt_line
    records = []
    for lineno, text in lines[parse_row_selector(rows)]:
        try:
            records.append(parse(text))
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
    return records


# ------------------------------------------------------------------ training data


def training_batch(
    grids: np.ndarray, rng: np.random.Generator, givens_range: tuple[int, int] = (17, 60)
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetry-augment ``grids`` [n,81] and mask them to puzzles.

    Each puzzle keeps k random cells, k uniform in ``givens_range`` (inclusive).
    Returns (puzzles, solutions), both uint8 [n, 81].
    """
    lo, hi = givens_range
    if not 0 <= lo <= hi <= 81:
        raise ValueError(f"givens_range must satisfy 0 <= lo <= hi <= 81, got {givens_range}")
    solutions = random_symmetry(grids, rng)
    n = solutions.shape[0]
    k = rng.integers(lo, hi + 1, size=n)
    # Rank cells by a random key; the k lowest-ranked cells stay as givens.
    order = rng.random((n, 81)).argsort(axis=1)
    keep = np.empty((n, 81), dtype=bool)
    np.put_along_axis(keep, order, np.arange(81)[None, :] < k[:, None], axis=1)
    return np.where(keep, solutions, 0).astype(np.uint8), solutions


def training_examples(
    n: int | None,
    rng: Rng = None,
    givens_range: tuple[int, int] = (17, 60),
    pool_size: int = 64,
    chunk: int = 1024,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``n`` (puzzle, solution) pairs of uint8 [81] arrays (``n=None``: forever).

    Design choice: for training, throughput beats uniqueness, so puzzles are NOT
    checked for a unique solution.  A pool of ``pool_size`` backtracking grids is
    expanded by random symmetries (~1.2e12 variants per grid) and masked down to a
    uniformly drawn number of givens.  Low-givens puzzles may thus have several
    solutions; the stored solution is still a valid completion, so the loss stays
    consistent (just noisier on those cells).  One pool grid is replaced by a fresh
    one per ``chunk`` so long runs keep seeing new essentially-different grids.
    """
    rng = as_rng(rng)
    pool = base_grid_pool(pool_size, rng)
    produced = 0
    while n is None or produced < n:
        # Always draw whole chunks so the stream for a seed does not depend on n.
        pool[rng.integers(pool_size)] = random_full_grid(rng)
        puzzles, solutions = training_batch(pool[rng.integers(pool_size, size=chunk)], rng, givens_range)
        for i in range(chunk if n is None else min(chunk, n - produced)):
            yield puzzles[i], solutions[i]
        produced += chunk
