"""Tokenisation for the Sudoku task: a tiny fixed vocabulary, independent of any text tokenizer.

Ids::

    0 <pad>   1 <eos>   2 <bos>   3 .  (blank cell in the prompt)
    4..12 the digits 1..9   13 \\n (row separator, for display / future layouts)
    14 <mask> (in-vocabulary mask token for models that need one)   15 reserved

The prompt is ``<bos>`` followed by the 81 cells (blank -> ``.``); the model's
canvas holds the 81 solution cells as digit tokens (``CANVAS_LENGTH = 81``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID, EOS_ID, BOS_ID, BLANK_ID = 0, 1, 2, 3
DIGIT_OFFSET = 3  # token id of digit d is d + 3, so digits 1..9 -> ids 4..12
NEWLINE_ID = 13
MASK_ID = 14
VOCAB_SIZE = 16  # fixed; ids 15.. are reserved so the embedding shape never changes
CANVAS_LENGTH = 81
PROMPT_LENGTH = 82  # <bos> + 81 cells

ID_TO_TOKEN = ["<pad>", "<eos>", "<bos>", "."] + [str(d) for d in range(1, 10)] + ["\n", "<mask>", "<unused>"]


def _board(board: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(board).ravel()
    if arr.size != 81 or arr.min() < 0 or arr.max() > 9:
        raise ValueError("a Sudoku board must have 81 cells with values 0..9")
    return arr.astype(np.int64)


def encode_prompt(puzzle: Sequence[int] | np.ndarray) -> list[int]:
    """``<bos>`` + 81 cell tokens (blank -> ``.``, digit d -> d + 3)."""
    cells = _board(puzzle)
    return [BOS_ID] + np.where(cells == 0, BLANK_ID, cells + DIGIT_OFFSET).tolist()


def encode_solution(solution: Sequence[int] | np.ndarray) -> list[int]:
    """81 digit tokens; the solution must be complete (no blanks)."""
    cells = _board(solution)
    if (cells == 0).any():
        raise ValueError("a solution must not contain blank cells")
    return (cells + DIGIT_OFFSET).tolist()


def decode_solution(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Canvas tokens -> uint8 [81]; non-digit tokens become 0.

    Only the first 81 tokens are used and a shorter sequence is padded with 0, so an
    early ``<eos>`` simply leaves the remaining cells blank.
    """
    ids = np.asarray(token_ids, dtype=np.int64).ravel()[:CANVAS_LENGTH]
    digits = np.where((ids >= 1 + DIGIT_OFFSET) & (ids <= 9 + DIGIT_OFFSET), ids - DIGIT_OFFSET, 0)
    out = np.zeros(CANVAS_LENGTH, dtype=np.uint8)
    out[: digits.size] = digits
    return out


def encode_prompts(puzzles: np.ndarray) -> np.ndarray:
    """Batched :func:`encode_prompt`: uint8 [n, 81] -> int64 [n, 82]."""
    cells = np.asarray(puzzles, dtype=np.int64).reshape(-1, 81)
    body = np.where(cells == 0, BLANK_ID, cells + DIGIT_OFFSET)
    return np.concatenate([np.full((cells.shape[0], 1), BOS_ID, dtype=np.int64), body], axis=1)


def encode_solutions(solutions: np.ndarray) -> np.ndarray:
    """Batched :func:`encode_solution`: uint8 [n, 81] -> int64 [n, 81]."""
    return np.asarray(solutions, dtype=np.int64).reshape(-1, 81) + DIGIT_OFFSET


def token_string(token_ids: Sequence[int] | np.ndarray) -> str:
    """Human-readable rendering of token ids (for logs and debugging)."""
    return "".join(ID_TO_TOKEN[i] if 0 <= i < len(ID_TO_TOKEN) else f"<{i}>" for i in np.asarray(token_ids).ravel().tolist())
