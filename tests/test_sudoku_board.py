"""Tests for dgemma.sudoku.board: parsing, solver, validity checks and generators."""

from __future__ import annotations

import numpy as np
import pytest

from dgemma.sudoku.board import (
    base_grid_pool,
    count_solutions,
    format_board,
    generate_puzzle,
    givens_conflict,
    has_unique_solution,
    is_complete_valid,
    is_consistent,
    is_contradictory,
    parse_board,
    pretty_board,
    random_full_grid,
    random_symmetry,
    solve,
)

# First two rows of satnet_10k.csv and a 17-given puzzle from rrn_test_18k.csv,
# embedded so the tests do not depend on the data files.
KNOWN = [
    (
        "670000005003040082040005136000730090304206070001090600509008000000950208000127400",
        "678312945153649782942875136265731894394286571781594623529468317417953268836127459",
    ),
    (
        "030074608000050000279010400000608925028097006000000010060540109084000030301900700",
        "135274698846359271279816453417638925528197346693425817762543189984761532351982764",
    ),
    (
        "085200000000300010007000000620000040900070000000050000200000500000403000000000800",
        "185267493492385617367941258621839745953674182874152369246798531518423976739516824",
    ),
]
# "AI Escargot", a notoriously hard puzzle that needs real backtracking.
ESCARGOT = "1....7.9..3..2...8..96..5....53..9...1..8...26....4...3......1..4......7..7...3.."


def test_parse_and_format_roundtrip():
    p = parse_board(KNOWN[0][0])
    assert p.dtype == np.uint8 and p.shape == (81,)
    assert format_board(p) == KNOWN[0][0]
    assert parse_board(format_board(p, blank=".")).tolist() == p.tolist()
    assert parse_board(pretty_board(p)).tolist() == p.tolist()  # separators are ignored
    assert pretty_board(p).splitlines()[0] == "6 7 . | . . . | . . 5"


@pytest.mark.parametrize("text, message", [("1" * 80, "81 cells"), ("x" + "0" * 80, "invalid characters")])
def test_parse_rejects_bad_boards(text, message):
    with pytest.raises(ValueError, match=message):
        parse_board(text)


@pytest.mark.parametrize("puzzle, solution", KNOWN, ids=["satnet0", "satnet1", "rrn17"])
def test_solver_solves_known_puzzles_uniquely(puzzle, solution):
    p = parse_board(puzzle)
    assert format_board(solve(p)) == solution
    assert count_solutions(p) == 1
    assert has_unique_solution(p)
    assert not is_contradictory(p)


def test_solver_handles_hard_puzzle():
    sol = solve(parse_board(ESCARGOT))
    assert sol is not None and is_complete_valid(sol) and is_consistent(parse_board(ESCARGOT), sol)
    assert count_solutions(parse_board(ESCARGOT)) == 1


def test_count_solutions_stops_at_limit():
    empty = np.zeros(81, np.uint8)
    assert count_solutions(empty, limit=2) == 2
    assert count_solutions(empty, limit=5) == 5
    assert not has_unique_solution(empty)
    # Removing one given from a 17-clue puzzle (minimal) makes it ambiguous.
    p = parse_board(KNOWN[2][0])
    p[np.flatnonzero(p)[0]] = 0
    assert count_solutions(p) == 2


def test_contradictions_detected():
    # A given repeated in a row.
    dup_row = parse_board(KNOWN[0][0])
    dup_row[1] = 6  # row 0 already holds a 6 at cell 0
    assert givens_conflict(dup_row) and is_contradictory(dup_row) and solve(dup_row) is None
    # Repeat within a column and within a box.
    col = np.zeros(81, np.uint8)
    col[[0, 80 - 8]] = 4  # cells (0,0) and (8,0)
    assert givens_conflict(col)
    box = np.zeros(81, np.uint8)
    box[[0, 10]] = 7  # cells (0,0) and (1,1)
    assert givens_conflict(box)
    # No repeated given, but no solution: cell 0 can hold no digit.
    stuck = np.zeros(81, np.uint8)
    stuck[1:9] = [2, 3, 4, 5, 6, 7, 8, 9]  # row 0 holds 2..9 ...
    stuck[9 * 4] = 1  # ... and column 0 holds a 1
    assert not givens_conflict(stuck)
    assert is_contradictory(stuck) and count_solutions(stuck) == 0


def test_validity_checks():
    sol = parse_board(KNOWN[0][1])
    assert is_complete_valid(sol)
    swapped = sol.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # breaks the columns
    assert not is_complete_valid(swapped)
    assert not is_complete_valid(parse_board(KNOWN[0][0]))  # has blanks
    assert is_consistent(parse_board(KNOWN[0][0]), sol)
    assert not is_consistent(parse_board(KNOWN[1][0]), sol)


def test_random_full_grid_is_valid_and_reproducible():
    a, b = random_full_grid(123), random_full_grid(123)
    assert is_complete_valid(a) and np.array_equal(a, b)
    assert not np.array_equal(a, random_full_grid(124))
    pool = base_grid_pool(3, np.random.default_rng(0))
    assert pool.shape == (3, 81) and all(is_complete_valid(g) for g in pool)


def test_symmetry_preserves_validity_and_uniqueness():
    rng = np.random.default_rng(7)
    grids = random_symmetry(np.stack([parse_board(s) for _, s in KNOWN] * 100), rng)
    assert grids.shape == (300, 81) and all(is_complete_valid(g) for g in grids)
    assert len({g.tobytes() for g in grids}) == 300  # transforms are actually random
    # The same seed gives the same transform, which must map a puzzle and its
    # solution to a (still unique) puzzle and its solution.
    puzzle, solution = (parse_board(s) for s in KNOWN[2])
    tp = random_symmetry(puzzle, np.random.default_rng(3))
    ts = random_symmetry(solution, np.random.default_rng(3))
    assert tp.shape == (81,) and np.count_nonzero(tp) == 17
    assert np.array_equal(solve(tp), ts) and has_unique_solution(tp)


@pytest.mark.parametrize("givens", [25, 40, 60])
def test_generate_puzzle_unique_with_requested_givens(givens):
    puzzle, solution = generate_puzzle(givens, np.random.default_rng(givens))
    assert np.count_nonzero(puzzle) == givens
    assert is_complete_valid(solution) and is_consistent(puzzle, solution)
    assert count_solutions(puzzle) == 1 and np.array_equal(solve(puzzle), solution)
    again, _ = generate_puzzle(givens, np.random.default_rng(givens))
    assert np.array_equal(puzzle, again)  # reproducible from the seed


def test_generate_puzzle_errors():
    with pytest.raises(ValueError, match="17..81"):
        generate_puzzle(16, 0)
    with pytest.raises(ValueError, match="could not generate a unique puzzle with 17 givens in 2 attempts"):
        generate_puzzle(17, 0, max_attempts=2)
