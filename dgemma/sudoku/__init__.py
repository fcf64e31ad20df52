"""Sudoku task for dgemma: boards, solver, generators, data files, tokens and metrics.

The model sees ``<bos>`` + the 81 puzzle cells as its prompt and denoises an
81-token canvas holding the solution (see :mod:`dgemma.sudoku.tokens`).  Everything
here is pure Python + numpy; randomness always comes from an explicit
``numpy.random.Generator`` (or seed) so data and puzzles are reproducible.
"""

from .board import (
    as_rng,
    base_grid_pool,
    count_solutions,
    format_board,
    generate_puzzle,
    givens_conflict,
    has_unique_solution,
    is_complete_valid,
    is_consistent,
    is_contradictory,
    is_solution,
    parse_board,
    pretty_board,
    random_full_grid,
    random_symmetry,
    solve,
)
from .data import SudokuRecord, load_puzzles, parse_row_selector, training_batch, training_examples
from .metrics import bucket_of, conflict_free_cells, evaluate, score_puzzle
from .tokens import (
    BLANK_ID,
    BOS_ID,
    CANVAS_LENGTH,
    EOS_ID,
    MASK_ID,
    NEWLINE_ID,
    PAD_ID,
    PROMPT_LENGTH,
    VOCAB_SIZE,
    decode_solution,
    encode_prompt,
    encode_prompts,
    encode_solution,
    encode_solutions,
    token_string,
)

__all__ = [
    "BLANK_ID", "BOS_ID", "CANVAS_LENGTH", "EOS_ID", "MASK_ID", "NEWLINE_ID", "PAD_ID",
    "PROMPT_LENGTH", "VOCAB_SIZE", "SudokuRecord", "as_rng", "base_grid_pool", "bucket_of",
    "conflict_free_cells", "count_solutions", "decode_solution", "encode_prompt",
    "encode_prompts", "encode_solution", "encode_solutions", "evaluate", "format_board",
    "generate_puzzle", "givens_conflict", "has_unique_solution", "is_complete_valid",
    "is_consistent", "is_contradictory", "is_solution", "load_puzzles", "parse_board", "parse_row_selector",
    "pretty_board", "random_full_grid", "random_symmetry", "score_puzzle", "solve",
    "token_string", "training_batch", "training_examples",
]
