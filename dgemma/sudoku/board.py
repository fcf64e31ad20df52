"""Sudoku boards: parsing/formatting, an exact solver, validity checks and generators.

A board is a ``numpy.uint8`` array of 81 cells in row-major order, 0 meaning blank.

The solver is pure Python on 9-bit candidate masks: it propagates naked and hidden
singles, then branches on the cell with the fewest candidates (MRV).  Plain Python
ints beat numpy here because each search node touches only a few dozen small values.

Generators take an explicit ``numpy.random.Generator`` (or an int seed) so every
puzzle is reproducible.  Full grids come from randomized backtracking; many more are
derived cheaply by applying random elements of the Sudoku symmetry group (digit
relabelling, row/column permutations within bands/stacks, band/stack permutations,
transposition), all of which map valid grids to valid grids.
"""

from __future__ import annotations

import random

import numpy as np

Rng = np.random.Generator | int | None

_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(81)]
_POP = [bin(m).count("1") for m in range(512)]
_DIGIT = {1 << d: d + 1 for d in range(9)}  # single-bit mask -> digit
_ALL = 0x1FF
# The 27 units (rows, columns, boxes) and, per cell, the indices of its 3 units.
_UNITS = (
    [[r * 9 + c for c in range(9)] for r in range(9)]
    + [[r * 9 + c for r in range(9)] for c in range(9)]
    + [[i for i in range(81) if _BOX[i] == b] for b in range(9)]
)
_CELL_UNITS = [(_ROW[i], 9 + _COL[i], 18 + _BOX[i]) for i in range(81)]


def as_rng(rng: Rng) -> np.random.Generator:
    """Return ``rng`` if it is a Generator, else a new Generator seeded with it."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# --------------------------------------------------------------------------- I/O


def parse_board(text: str) -> np.ndarray:
    """Parse an 81-cell board; ``.`` or ``0`` are blanks, whitespace/``|``/``-``/``+`` ignored."""
    cells = [ch for ch in text if ch not in " \t\r\n|-+"]
    if len(cells) != 81:
        raise ValueError(f"expected 81 cells, got {len(cells)}")
    bad = sorted({ch for ch in cells if ch not in ".0123456789"})
    if bad:
        raise ValueError(f"invalid characters {bad!r}; use digits 1-9 and '.' or '0' for blanks")
    return np.array([0 if ch == "." else int(ch) for ch in cells], dtype=np.uint8)


def format_board(board: np.ndarray, blank: str = "0") -> str:
    """Format a board as one 81-character line."""
    return "".join(blank if v == 0 else str(int(v)) for v in np.asarray(board).ravel())


def pretty_board(board: np.ndarray) -> str:
    """Format a board as a human-readable 9x9 grid with box separators."""
    flat = format_board(board, blank=".")
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        row = flat[r * 9 : r * 9 + 9]
        lines.append(" | ".join(" ".join(row[c : c + 3]) for c in (0, 3, 6)))
    return "\n".join(lines)


# ------------------------------------------------------------------------ solver


def _propagate(grid: list[int], rows: list[int], cols: list[int], boxes: list[int], empties: list[int]):
    """Fill forced cells in place.  Returns (False, ...) on contradiction, else
    (True, remaining_empties, mrv_cell, mrv_mask) where mrv_cell is -1 if solved."""
    while True:
        empties = [i for i in empties if not grid[i]]
        if not empties:
            return True, empties, -1, 0
        # Pass 1: naked singles (placed immediately; later cells see the update).
        best, best_n, best_m, placed = -1, 10, 0, False
        for i in empties:
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            m = ~(rows[r] | cols[c] | boxes[b]) & _ALL
            n = _POP[m]
            if n == 1:
                grid[i] = _DIGIT[m]
                rows[r] |= m
                cols[c] |= m
                boxes[b] |= m
                placed = True
            elif n == 0:
                return False, empties, -1, 0
            elif n < best_n:
                best, best_n, best_m = i, n, m
        if placed:
            continue
        # Pass 2: hidden singles.  Per unit, `once` = digits possible somewhere and
        # `twice` = digits possible in >= 2 cells; once & ~twice are hidden singles.
        once = [0] * 27
        twice = [0] * 27
        masks = {}
        for i in empties:
            m = ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]]) & _ALL
            masks[i] = m
            for u in _CELL_UNITS[i]:
                twice[u] |= once[u] & m
                once[u] |= m
        used = rows + cols + boxes
        for u in range(27):
            if (once[u] | used[u]) != _ALL:
                return False, empties, -1, 0  # some digit has no place left in unit u
            hidden = once[u] & ~twice[u]
            while hidden:
                bit = hidden & -hidden
                hidden ^= bit
                for i in _UNITS[u]:
                    if not grid[i] and masks[i] & bit:
                        break
                else:
                    continue  # already placed by an earlier hidden single this pass
                r, c, b = _ROW[i], _COL[i], _BOX[i]
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    return False, empties, -1, 0  # two units demand conflicting placements
                grid[i] = _DIGIT[bit]
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                placed = True
        if not placed:
            return True, empties, best, best_m


def _search(grid, rows, cols, boxes, empties, limit: int, found: list, shuffle) -> None:
    """Depth-first search appending up to ``limit`` solutions to ``found``."""
    ok, empties, cell, mask = _propagate(grid, rows, cols, boxes, empties)
    if not ok:
        return
    if cell < 0:
        found.append(grid)
        return
    bits = [1 << d for d in range(9) if mask >> d & 1]
    if shuffle is not None:
        shuffle(bits)
    for bit in bits:
        _search(*_placed(grid, rows, cols, boxes, cell, bit), empties, limit, found, shuffle)
        if len(found) >= limit:
            return


def _placed(grid, rows, cols, boxes, cell: int, bit: int):
    """Copies of the search state with digit ``bit`` written into ``cell``."""
    g, rs, cs, bs = grid[:], rows[:], cols[:], boxes[:]
    g[cell] = _DIGIT[bit]
    rs[_ROW[cell]] |= bit
    cs[_COL[cell]] |= bit
    bs[_BOX[cell]] |= bit
    return g, rs, cs, bs


def _solve_all(puzzle, limit: int, forbid: tuple[int, int] | None = None, shuffle=None) -> list[list[int]]:
    """Return up to ``limit`` solutions as lists.  ``forbid=(cell, digit)`` excludes
    that digit from a blank cell (used for fast uniqueness checks during generation)."""
    grid = [int(v) for v in np.asarray(puzzle).ravel()]
    if len(grid) != 81 or not all(0 <= v <= 9 for v in grid):
        raise ValueError("a board must have 81 cells with values 0..9")
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(grid):
        if v:
            bit = 1 << (v - 1)
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return []  # a given repeats in a row, column or box
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    found: list[list[int]] = []
    if forbid is None:
        _search(grid, rows, cols, boxes, list(range(81)), limit, found, shuffle)
        return found
    # Branch manually on the forbidden cell so the other digits are tried.
    cell, digit = forbid
    r, c, b = _ROW[cell], _COL[cell], _BOX[cell]
    mask = ~(rows[r] | cols[c] | boxes[b]) & _ALL & ~(1 << (digit - 1))
    for d in range(9):
        if mask >> d & 1 and len(found) < limit:
            _search(*_placed(grid, rows, cols, boxes, cell, 1 << d), list(range(81)), limit, found, shuffle)
    return found


def solve(puzzle: np.ndarray) -> np.ndarray | None:
    """Return one solution of ``puzzle`` (uint8 [81]) or None if it has none."""
    found = _solve_all(puzzle, 1)
    return np.array(found[0], dtype=np.uint8) if found else None


def count_solutions(puzzle: np.ndarray, limit: int = 2) -> int:
    """Count solutions, stopping at ``limit`` (limit=2 answers 'is it unique?')."""
    return len(_solve_all(puzzle, limit))


def has_unique_solution(puzzle: np.ndarray) -> bool:
    """True iff the puzzle has exactly one solution."""
    return count_solutions(puzzle, 2) == 1


# ---------------------------------------------------------------- validity checks


def givens_conflict(puzzle: np.ndarray) -> bool:
    """True if some non-zero value repeats within a row, column or box."""
    g = np.asarray(puzzle).reshape(9, 9)
    units = [g, g.T, g.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)]
    for unit in units:
        for line in unit:
            vals = line[line > 0]
            if len(vals) != len(np.unique(vals)):
                return True
    return False


def is_contradictory(puzzle: np.ndarray) -> bool:
    """True if a given repeats in a row/column/box or the puzzle has no solution."""
    return givens_conflict(puzzle) or solve(puzzle) is None


def is_complete_valid(grid: np.ndarray) -> bool:
    """True if ``grid`` is a complete, rule-abiding Sudoku solution."""
    g = np.asarray(grid).ravel()
    return g.size == 81 and bool(np.all((g >= 1) & (g <= 9))) and not givens_conflict(g)


def is_consistent(puzzle: np.ndarray, grid: np.ndarray) -> bool:
    """True if ``grid`` keeps every given of ``puzzle``."""
    p, g = np.asarray(puzzle).ravel(), np.asarray(grid).ravel()
    return bool(np.all((p == 0) | (p == g)))


def is_solution(puzzle: np.ndarray, grid: np.ndarray) -> bool:
    """True if ``grid`` solves ``puzzle``: complete, rule-abiding, and keeping every given."""
    return is_complete_valid(grid) and is_consistent(puzzle, grid)


# -------------------------------------------------------------------- generators


def random_full_grid(rng: Rng = None) -> np.ndarray:
    """A uniformly-ish random full grid by randomized backtracking from an empty board."""
    shuffler = random.Random(int(as_rng(rng).integers(2**63)))
    found = _solve_all(np.zeros(81, np.uint8), 1, shuffle=shuffler.shuffle)
    return np.array(found[0], dtype=np.uint8)


def base_grid_pool(size: int, rng: Rng = None) -> np.ndarray:
    """``size`` independent full grids from randomized backtracking, shape [size, 81]."""
    rng = as_rng(rng)
    return np.stack([random_full_grid(rng) for _ in range(size)])


def _line_perms(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 9] permutations of rows (or columns) that keep each band together."""
    bands = rng.random((n, 3)).argsort(axis=1)
    within = rng.random((n, 3, 3)).argsort(axis=2)
    return (bands[:, :, None] * 3 + within).reshape(n, 9)


def random_symmetry(grids: np.ndarray, rng: Rng = None) -> np.ndarray:
    """Apply an independent random validity-preserving symmetry to each board.

    Works on one board [81] or a batch [n, 81], and on puzzles as well as solutions
    (blank 0 stays 0).  Vectorised: costs a few microseconds per board.
    """
    rng = as_rng(rng)
    arr = np.asarray(grids, dtype=np.uint8)
    single = arr.ndim == 1
    g = arr.reshape(-1, 9, 9)
    n = g.shape[0]
    idx = np.arange(n)[:, None, None]
    g = g[idx, _line_perms(n, rng)[:, :, None], _line_perms(n, rng)[:, None, :]]
    flip = rng.random(n) < 0.5
    g = np.where(flip[:, None, None], g.transpose(0, 2, 1), g)
    relabel = np.zeros((n, 10), dtype=np.uint8)
    relabel[:, 1:] = rng.random((n, 9)).argsort(axis=1) + 1
    g = relabel[idx, g]
    return g.reshape(81) if single else g.reshape(n, 81)


def generate_puzzle(n_givens: int, rng: Rng = None, max_attempts: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A puzzle with a unique solution and exactly ``n_givens`` givens (17..81).

    Removes clues of a random full grid in random order, keeping a removal only if
    the solution stays unique, and stops at the target.  Random removal usually gets
    stuck at a minimal puzzle of 22-27 givens (measured: ~4% of grids reach 22, ~0.3%
    reach 21), so low targets need several fresh grids (~16 ms each); after
    ``max_attempts`` grids a ValueError is raised.  Below 21 this is expected to fail
    (17-clue puzzles are extremely rare); for those, load a published collection.
    """
    if not 17 <= n_givens <= 81:
        raise ValueError(f"n_givens must be in 17..81 (no 16-clue Sudoku exists), got {n_givens}")
    rng = as_rng(rng)
    fewest = 81
    for _ in range(max_attempts):
        solution = random_full_grid(rng)
        puzzle = solution.copy()
        count = 81
        for cell in rng.permutation(81):
            if count == n_givens:
                break
            digit = int(puzzle[cell])
            puzzle[cell] = 0
            # Unique iff no solution puts a different digit in the removed cell.
            if _solve_all(puzzle, 1, forbid=(int(cell), digit)):
                puzzle[cell] = digit
            else:
                count -= 1
        if count == n_givens:
            return puzzle, solution
        fewest = min(fewest, count)
    raise ValueError(
        f"could not generate a unique puzzle with {n_givens} givens in {max_attempts} attempts "
        f"(fewest reached: {fewest}); random removal rarely goes below ~21 givens"
    )
