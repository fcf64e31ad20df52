"""Tests for dgemma.sudoku data files, training examples, tokens and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dgemma.sudoku import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    decode_solution,
    encode_prompt,
    encode_prompts,
    encode_solution,
    encode_solutions,
    evaluate,
    is_complete_valid,
    is_consistent,
    load_puzzles,
    parse_board,
    parse_row_selector,
    training_examples,
)

P1 = "670000005003040082040005136000730090304206070001090600509008000000950208000127400"
S1 = "678312945153649782942875136265731894394286571781594623529468317417953268836127459"
P2 = "030074608000050000279010400000608925028097006000000010060540109084000030301900700"
S2 = "135274698846359271279816453417638925528197346693425817762543189984761532351982764"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------- files


def test_load_csv(tmp_path):
    path = write(tmp_path, "e.csv", f"{P1},{S1}\n\n{P2},{S2}\n{P2}\n")
    recs = load_puzzles(path)
    assert len(recs) == 3
    puzzle, solution = recs[0]
    assert puzzle.dtype == np.uint8 and puzzle.shape == (81,)
    assert puzzle.tolist() == parse_board(P1).tolist() and solution.tolist() == parse_board(S1).tolist()
    assert recs[2].solution is None  # missing solution column


def test_load_csv_skips_header(tmp_path):
    recs = load_puzzles(write(tmp_path, "k.csv", f"quizzes,solutions\n{P1},{S1}\n"))
    assert len(recs) == 1


def test_load_txt_with_comments_and_dots(tmp_path):
    dotted = P2.replace("0", ".")
    path = write(tmp_path, "e.txt", f"# a comment\n{P1}\n\n   \n# another\n{dotted}\n")
    recs = load_puzzles(path)
    assert [r.solution for r in recs] == [None, None]
    assert recs[1].puzzle.tolist() == parse_board(P2).tolist()


def test_row_selector(tmp_path):
    lines = [P1.replace("6", str(d), 1) for d in range(1, 10)]  # 9 distinct rows
    path = write(tmp_path, "r.txt", "# header comment\n" + "\n".join(lines) + "\n")
    firsts = lambda recs: [int(r.puzzle[0]) for r in recs]  # noqa: E731
    assert firsts(load_puzzles(path, "-2:")) == [8, 9]
    assert firsts(load_puzzles(path, "1:3")) == [2, 3]
    assert firsts(load_puzzles(path, ":2")) == [1, 2]
    assert firsts(load_puzzles(path, "::4")) == [1, 5, 9]
    assert len(load_puzzles(path, "-1000:")) == 9
    assert parse_row_selector(None) == slice(None)
    for bad in ["5", "a:b", "1:2:0", "1:2:3:4"]:
        with pytest.raises(ValueError, match="row selector"):
            parse_row_selector(bad)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("a.csv", f"{P1},{S1}\n{P1[:-1]},{S1}\n", r"a\.csv:2: puzzle has 80 characters"),
        ("b.csv", f"{P1},{S1}\n\n{P1},{S1[:-1]}x\n", r"b\.csv:3: solution contains invalid characters \['x'\]"),
        ("c.csv", f"{P1},{S1.replace('6', '0', 1)}\n", r"c\.csv:1: solution contains invalid"),
        ("d.csv", f"{P1},{S2}\n", r"d\.csv:1: solution disagrees with the puzzle"),
        ("e.csv", f"{P1},{S1},extra\n", r"e\.csv:1: expected 'puzzle,solution', got 3"),
        ("f.txt", f"# c\n{P1}\n{P1},{S1}\n", r"f\.txt:3: comma found"),
        ("g.txt", f"{P1[:40]}?{P1[41:]}\n", r"g\.txt:1: puzzle contains invalid characters \['\?'\]"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        load_puzzles(write(tmp_path, name, text))


def test_malformed_rows_outside_selection_are_not_parsed(tmp_path):
    path = write(tmp_path, "s.txt", f"bad line\n{P1}\n")
    assert len(load_puzzles(path, "-1:")) == 1


# ---------------------------------------------------------------------- training


def test_training_examples_valid_and_reproducible():
    rng = np.random.default_rng(0)
    examples = list(training_examples(2000, rng, givens_range=(17, 60), pool_size=8, chunk=512))
    assert len(examples) == 2000
    givens = np.array([np.count_nonzero(p) for p, _ in examples])
    assert givens.min() >= 17 and givens.max() <= 60 and len(set(givens.tolist())) > 30
    for puzzle, solution in examples[:300]:
        assert puzzle.dtype == np.uint8 and is_complete_valid(solution) and is_consistent(puzzle, solution)
    again = list(training_examples(5, np.random.default_rng(0), pool_size=8, chunk=512))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(again, examples))


def test_training_examples_fixed_givens():
    # (Throughput is a benchmark's business, not a test's: wall-clock asserts fail on a busy machine.)
    it = training_examples(None, np.random.default_rng(1), givens_range=(30, 30))
    batch = [next(it) for _ in range(2000)]
    assert all(np.count_nonzero(p) == 30 for p, _ in batch)
    assert all(is_complete_valid(s) and is_consistent(p, s) for p, s in batch[:100])


# ------------------------------------------------------------------------ tokens


def test_tokens_roundtrip():
    p, s = parse_board(P1), parse_board(S1)
    prompt = encode_prompt(p)
    assert len(prompt) == 82 and prompt[0] == BOS_ID
    assert prompt[1:4] == [6 + 3, 7 + 3, 3]  # "67." -> digits at d+3, blank '.' = 3
    canvas = encode_solution(s)
    assert len(canvas) == 81 and all(4 <= t <= 12 for t in canvas)
    assert max(prompt + canvas) < VOCAB_SIZE and len({PAD_ID, EOS_ID, BOS_ID}) == 3
    assert np.array_equal(decode_solution(canvas), s)
    assert np.array_equal(encode_prompts(np.stack([p, p]))[1], prompt)
    assert np.array_equal(encode_solutions(s[None])[0], canvas)
    # Non-digit tokens decode to 0; short sequences are padded with blanks.
    noisy = canvas[:10] + [EOS_ID, PAD_ID, 3, 14]
    decoded = decode_solution(noisy)
    assert decoded[:10].tolist() == s[:10].tolist() and decoded[10:].sum() == 0
    with pytest.raises(ValueError):
        encode_solution(p)


# ----------------------------------------------------------------------- metrics


def test_metrics_labelled():
    p1, s1, p2, s2 = (parse_board(x) for x in (P1, S1, P2, S2))
    p3 = s1.copy()
    p3[:60] = 0  # 21 givens: the "hard" bucket
    wrong = s2.copy()
    blanks = np.flatnonzero(p2 == 0)
    wrong[blanks[:5]] = (wrong[blanks[:5]] % 9) + 1  # 5 wrong blank cells
    wrong[np.flatnonzero(p2)[0]] = 0  # and a given lost
    r = evaluate([p1, p2, p3], [s1, wrong, s1], [s1, s2, s1], steps=[4, 8, 12])
    json.dumps(r)  # JSON-ready
    o = r["overall"]
    assert set(o) == {"exact", "cell_accuracy", "givens_preserved", "mean_steps", "n"}
    assert o["n"] == 3 and o["exact"] == pytest.approx(2 / 3) and o["givens_preserved"] == pytest.approx(2 / 3)
    assert o["mean_steps"] == 8.0
    n_blank = 47 + 47 + 60  # P1 and P2 have 34 givens each
    assert o["cell_accuracy"] == pytest.approx((n_blank - 5) / n_blank)
    assert r["by_givens"]["34"]["n"] == 2 and r["by_givens"]["34"]["exact"] == 0.5
    assert r["by_givens"]["21"] == {"exact": 1.0, "cell_accuracy": 1.0, "givens_preserved": 1.0, "mean_steps": 12.0, "n": 1}
    assert r["by_bucket"]["medium"]["mean_steps"] == 6.0
    assert r["by_bucket"]["hard"]["n"] == 1
    assert r["by_bucket"]["easy"] == {"exact": None, "cell_accuracy": None, "givens_preserved": None, "mean_steps": None, "n": 0}


def test_metrics_unlabelled_and_buckets():
    s1 = parse_board(S1)
    easy = s1.copy()
    easy[:35] = 0  # 46 givens
    hard = s1.copy()
    hard[:60] = 0  # 21 givens
    bad = s1.copy()
    bad[0], bad[1] = bad[1], bad[0]  # swap two cells in row 0: columns now conflict
    r = evaluate([easy, hard], [s1, bad], solutions=None)
    assert r["by_bucket"]["easy"]["exact"] == 1.0 and r["by_bucket"]["hard"]["exact"] == 0.0
    assert r["by_bucket"]["hard"]["cell_accuracy"] == pytest.approx(56 / 60)  # 4 conflicting cells
    assert r["overall"]["givens_preserved"] == 1.0 and r["overall"]["mean_steps"] is None
    # A prediction with a blank cell is not exact and that cell is not counted correct.
    holey = s1.copy()
    holey[0] = 0
    r = evaluate([easy], [holey])
    assert r["overall"]["exact"] == 0.0 and r["overall"]["cell_accuracy"] == pytest.approx(34 / 35)
