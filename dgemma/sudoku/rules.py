"""Sudoku rules as a constraint plug-in: each denoising step bans the digits that conflict with the givens or with
the cells the model has settled.

`SudokuRules(puzzle)` implements `dgemma.constraint.CanvasConstraint` (mask / commit / is_complete), the interface
the engine calls for a constrained row; no llguidance is involved. At every denoising step, on the row's logits
[81, V] before the sampler (docs/sudoku.md, "Rules as a constraint"):

1. only digits are allowed anywhere (pad, EOS, BOS, '.', newline, mask: never);
2. a given's cell allows its given digit only, and a blank cell never a digit that a given of its row, column or
   box holds;
3. the cell's confidence is the probability of its best digit under (2), at temperature 1. The **settled** cells,
   confidence >= `settle` (default 0.99), are swept from the most confident down (ties by position): each allows
   the digits that no given and no earlier-swept settled cell of its row, column or box holds and takes the best
   of them (its masked argmax), which the later cells then avoid;
4. every other blank cell allows the digits that no given and no settled cell of its peers holds; unsettled cells
   do not ban digits in each other;
5. a cell left with no digit (a dead end) falls back to (2).

So no committed digit breaks a given, and, apart from dead ends, no digit repeats a settled cell's digit in its
row, column or box; the committed canvas is the masked argmax. Why only settled cells: the full sweep (`settle=0`,
every cell bans its digit in its peers) forces a board out of the first steps' guesses, and on the RRN subset it
halved the exact rate (docs/sudoku.md); cells the model is sure of are the "accepted" ones worth enforcing.

The mask depends on the row's own logits only and draws no random numbers, so a request stays independent of its
batch mates and reproducible from its seed. Cost per step: one [81, 9] softmax, a Python loop over the settled
cells with bit masks, one masked fill.

`commit` records the committed board; `is_complete` says whether it solves the puzzle (one canvas holds it all).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..constraint import MASKED
from .board import is_solution
from .tokens import CANVAS_LENGTH, DIGIT_OFFSET

DEFAULT_SETTLE = 0.99
_DIGITS = slice(1 + DIGIT_OFFSET, 10 + DIGIT_OFFSET)  # token ids of the digits 1..9
_ROW = [i // 9 for i in range(81)]
_COL = [i % 9 for i in range(81)]
_BOX = [3 * (i // 27) + (i % 9) // 3 for i in range(81)]
_ALL = (1 << 9) - 1  # bit d-1 set: digit d
_BIT = torch.tensor([1 << k for k in range(9)], dtype=torch.int64)


def _bits(masks: list[int]) -> Tensor:
    """[n] digit bit masks -> [n, 9] bool."""
    return (torch.tensor(masks, dtype=torch.int64)[:, None] & _BIT) != 0


class SudokuRules:
    """The rules of one puzzle as a canvas constraint (module doc). One instance per request: it holds state."""

    def __init__(self, puzzle, settle: float = DEFAULT_SETTLE):
        cells = np.asarray(puzzle).ravel()
        if cells.size != CANVAS_LENGTH or cells.min() < 0 or cells.max() > 9:
            raise ValueError("a Sudoku puzzle must have 81 cells with values 0..9")
        if not 0.0 <= settle <= 1.0:
            raise ValueError(f"settle must be a probability in [0, 1] (got {settle})")
        self.puzzle = cells.astype(np.uint8)
        self.settle = float(settle)
        self.board: list[int] | None = None  # the committed board (0 = blank), None before the commit
        self.dead_ends: list[int] = []  # the last mask's cells that had no digit left (diagnostics, tests)
        givens = [int(v) for v in cells]
        row, col, box = [0] * 9, [0] * 9, [0] * 9
        for i, d in enumerate(givens):
            if d:
                bit = 1 << (d - 1)
                if (row[_ROW[i]] | col[_COL[i]] | box[_BOX[i]]) & bit:
                    raise ValueError(f"contradictory puzzle: digit {d} repeats in the row, column or box of cell {i}")
                row[_ROW[i]] |= bit
                col[_COL[i]] |= bit
                box[_BOX[i]] |= bit
        self._units = (row, col, box)  # the digits the givens hold, per row, column and box
        self._blanks = [i for i, d in enumerate(givens) if not d]
        # the digits the givens allow per cell (a given's cell: its digit only)
        self._given_masks = [1 << (d - 1) if d else _ALL & ~(row[_ROW[i]] | col[_COL[i]] | box[_BOX[i]])
                             for i, d in enumerate(givens)]
        self._given_allow = _bits(self._given_masks)  # [81, 9]

    def mask(self, logits: Tensor) -> list[int]:
        """Masks one canvas row of logits [81, V] in place; returns its argmax, the canvas to commit (module doc)."""
        if logits.dim() != 2 or logits.shape[0] != CANVAS_LENGTH or logits.shape[1] < _DIGITS.stop:
            raise ValueError(f"SudokuRules.mask needs logits [81, >= {_DIGITS.stop}], got {list(logits.shape)}")
        digits = logits[:, _DIGITS].float().cpu().masked_fill(~self._given_allow, MASKED)  # [81, 9]
        conf = torch.softmax(digits, -1).amax(-1).tolist()
        settled = sorted((i for i in self._blanks if conf[i] >= self.settle), key=lambda i: (-conf[i], i))
        values = digits.tolist() if settled else None
        row, col, box = (list(u) for u in self._units)
        allowed = list(self._given_masks)
        dead = []
        for i in settled:  # most confident first: each settled cell's digit is banned in its later peers
            r, c, b = _ROW[i], _COL[i], _BOX[i]
            free = allowed[i] & ~(row[r] | col[c] | box[b])
            if not free:
                dead.append(i)
                continue
            allowed[i] = free
            v = values[i]
            k = max((k for k in range(9) if free >> k & 1), key=lambda k: (v[k], -k))  # first maximum
            row[r] |= 1 << k
            col[c] |= 1 << k
            box[b] |= 1 << k
        done = set(settled)
        for i in self._blanks:  # the rest: the givens' and the settled cells' digits are banned
            if i not in done:
                free = allowed[i] & ~(row[_ROW[i]] | col[_COL[i]] | box[_BOX[i]])
                if free:
                    allowed[i] = free
                else:
                    dead.append(i)
        self.dead_ends = sorted(dead)
        keep = torch.zeros(logits.shape, dtype=torch.bool)
        keep[:, _DIGITS] = _bits(allowed)
        logits.masked_fill_(~keep.to(logits.device), MASKED)
        return logits.argmax(-1).tolist()

    def commit(self, tokens: list[int]) -> None:
        """Records the committed canvas (digits; anything else is a blank cell)."""
        self.board = [t - DIGIT_OFFSET if 1 + DIGIT_OFFSET <= t <= 9 + DIGIT_OFFSET else 0
                      for t in list(tokens)[:CANVAS_LENGTH]]

    def is_complete(self) -> bool:
        """The committed board solves the puzzle: full, no digit repeated in a unit, every given kept."""
        return self.board is not None and len(self.board) == CANVAS_LENGTH and is_solution(self.puzzle,
                                                                                          np.array(self.board))
