"""`dgemma sudoku solve | eval | train | bench` end to end, on a tiny randomly initialised solver (no shipped model
needed): the check reports correctly, bad input exits 2 with one line, eval reads both file formats and writes its
JSON, rows are selected, per-request seeds make answers independent of the batch, and training resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dgemma import checkpoint
from dgemma.model import DiffusionGemma
from dgemma.sudoku import cli, parse_board
from dgemma.sudoku.model import Solver
from dgemma.sudoku.recipe import SudokuSource, generation_config, model_config

P1 = "670000005003040082040005136000730090304206070001090600509008000000950208000127400"
S1 = "678312945153649782942875136265731894394286571781594623529468317417953268836127459"
P2 = "030074608000050000279010400000608925028097006000000010060540109084000030301900700"
S2 = "135274698846359271279816453417638925528197346693425817762543189984761532351982764"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=32,
            moe_intermediate_size=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = DiffusionGemma(model_config(**TINY))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return checkpoint.save(model, tmp_path_factory.mktemp("m") / "tiny", generation=generation_config())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "e.csv").write_text("".join(f"{p},{s}\n" for p, s in [(P1, S1), (P2, S2)] * 3))
    (d / "e.txt").write_text(f"# two puzzles\n{P1.replace('0', '.')}\n\n{P2}\n")
    return d


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# MARK: solve


def test_solve_runs_end_to_end_and_reports_an_unsolved_board(tiny, capsys):
    rc, out, err = run(["solve", P1, "--model", str(tiny), "--max-denoising-steps", "3"], capsys)
    assert rc == 1  # a random model does not solve it, and the check says so
    assert "puzzle (34 givens)" in out and "6 7 . | . . . | . . 5" in out
    assert "denoising steps of at most 3" in out and "check: NOT solved" in out
    rc, out, _ = run(["solve", P1, "--model", str(tiny), "--json", "--seed", "3"], capsys)
    rec = json.loads(out)
    assert rc == 1 and rec["puzzle"] == P1 and rec["givens"] == 34 and rec["unique"] is True
    assert rec["max_denoising_steps"] == 12 and 1 <= rec["steps"] <= 12 and rec["solved"] is False
    assert len(rec["board"]) == 81


def test_solve_reports_a_solved_board(tiny, capsys, monkeypatch, data):
    """The check path when the model is right: stand in the exact answer for the model's."""
    real = Solver.solve

    def exact(self, puzzles, *a, **kw):
        res = real(self, puzzles, *a, **kw)
        res.boards = np.stack([parse_board(S1) if (p == parse_board(P1)).all() else parse_board(S2) for p in puzzles])
        return res

    monkeypatch.setattr(Solver, "solve", exact)
    rc, out, _ = run(["solve", P1.replace("0", "."), "--model", str(tiny)], capsys)
    assert rc == 0 and "check: solved: a valid Sudoku that keeps every given" in out
    rc, out, _ = run(["solve", str(data / "e.txt"), "--model", str(tiny), "--json"], capsys)
    recs = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and [r["solved"] for r in recs] == [True, True] and recs[1]["board"] == S2


@pytest.mark.parametrize("puzzle, message", [
    (P1[:-1], "malformed puzzle: expected 81 cells, got 80"),
    ("x" + P1[1:], "malformed puzzle: invalid characters ['x']; use digits 1-9 and '.' or '0' for blanks"),
    ("66" + P1[2:], "contradictory puzzle (puzzle): digit 6 appears twice in row 1"),
    ("6" + P1[1:9] + "6" + P1[10:], "contradictory puzzle (puzzle): digit 6 appears twice in column 1"),
    ("023456789" + "0" * 36 + "1" + "0" * 35, "contradictory puzzle (puzzle): the givens admit no solution"),
    ("missing/puzzles.txt", "missing/puzzles.txt: no such file"),
])
def test_bad_input_exits_2_with_one_line(tiny, capsys, puzzle, message):
    rc, out, err = run(["solve", puzzle, "--model", str(tiny)], capsys)
    assert rc == 2 and out == ""
    assert err.strip() == f"dgemma sudoku: error: {message}"


def test_bad_file_line_names_file_and_line(tiny, capsys, tmp_path):
    (tmp_path / "b.txt").write_text(f"{P1}\n{P1[:-3]}\n")
    rc, _, err = run(["solve", str(tmp_path / "b.txt"), "--model", str(tiny)], capsys)
    assert rc == 2 and "b.txt:2: puzzle has 78 characters, expected 81" in err and len(err.splitlines()) == 1


def test_missing_model_is_one_line(capsys, tmp_path):
    rc, _, err = run(["solve", P1, "--model", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "no such model folder" in err and len(err.splitlines()) == 1


# MARK: eval


def test_eval_csv_writes_json_and_selects_rows(tiny, data, capsys, tmp_path):
    out_json = tmp_path / "r.json"
    rc, out, _ = run(["eval", str(data / "e.csv"), "--rows", "-3:", "--model", str(tiny), "--batch-size", "2",
                      "--max-denoising-steps", "2", "--json", str(out_json), "--no-progress"], capsys)
    assert rc == 0 and "overall" in out and "34 givens" in out
    r = json.loads(out_json.read_text())
    assert {"overall", "by_bucket", "by_givens", "max_denoising_steps", "forwards_per_puzzle", "seconds"} <= set(r)
    o = r["overall"]
    assert set(o) == {"exact", "cell_accuracy", "givens_preserved", "mean_steps", "n"}
    assert o["n"] == 3 and r["labelled"] is True and r["rows"] == "-3:" and 1 <= o["mean_steps"] <= 2
    assert r["by_givens"]["34"]["n"] == 3 and r["by_bucket"]["medium"]["n"] == 3
    assert r["forwards_per_puzzle"] == pytest.approx(1 + o["mean_steps"])


def test_eval_txt_is_unlabelled(tiny, data, capsys, tmp_path):
    rc, _, _ = run(["eval", str(data / "e.txt"), "--model", str(tiny), "--json", str(tmp_path / "t.json"),
                    "--max-denoising-steps", "2", "--no-progress"], capsys)
    r = json.loads((tmp_path / "t.json").read_text())
    assert rc == 0 and r["labelled"] is False and r["overall"]["n"] == 2


def test_eval_rejects_empty_selection(tiny, data, capsys):
    rc, _, err = run(["eval", str(data / "e.csv"), "--rows", "10:", "--model", str(tiny)], capsys)
    assert rc == 2 and "no puzzles selected" in err


def test_answers_depend_on_seed_not_on_batch(tiny):
    puzzles = np.stack([parse_board(p) for p in (P1, P2, P1, P2, P1)])
    a = Solver(tiny, batch_size=2).solve(puzzles, 3, seed=5)
    b = Solver(tiny, batch_size=5).solve(puzzles, 3, seed=5)
    assert np.array_equal(a.boards, b.boards) and a.steps == b.steps
    c = Solver(tiny, batch_size=5).solve(puzzles[2:3], 3, seed=7)  # request 2 of the first call had seed 5 + 2
    assert np.array_equal(c.boards[0], a.boards[2])


def test_attempts_redenoise_invalid_boards_with_fresh_seeds(tiny, monkeypatch):
    """A board that is not a valid solution is denoised again with a fresh seed; the last board is kept and every
    attempt's steps are counted. A puzzle whose board verifies stops there."""
    from dgemma.sudoku import model as solver_module

    puzzles = np.stack([parse_board(p) for p in (P1, P2)])
    solver = Solver(tiny, batch_size=2)
    seeds = [[solver_module.attempt_seed(5 + i, j) for i in range(2)] for j in range(3)]
    assert seeds[0] == [5, 6] and len({s & 0xFFFFFFFF for row in seeds for s in row}) == 6  # CPU generators: 32 bits
    single = [[solver.solve(puzzles[i:i + 1], 3, seed=seeds[j][i]) for i in range(2)] for j in range(3)]
    single = [(np.concatenate([a.boards, b.boards]), a.steps + b.steps) for a, b in single]
    assert not np.array_equal(single[0][0], single[1][0])  # a retry is a different sample, not a replay
    res = solver.solve(puzzles, 3, seed=5, attempts=3)
    assert res.attempts == [3, 3]  # a random model never writes a valid board
    assert np.array_equal(res.boards, single[2][0])
    assert res.steps == [sum(r[1][i] for r in single) for i in range(2)]
    assert res.forwards == pytest.approx((sum(res.steps) + 6) / 2)

    first = single[0][0][1]  # pretend the model's first board for P2 verifies
    monkeypatch.setattr(solver_module, "is_solution", lambda p, b: np.array_equal(b, first))
    res = solver.solve(puzzles, 3, seed=5, attempts=3)
    assert res.attempts == [3, 1] and np.array_equal(res.boards[1], first) and res.steps[1] == single[0][1][1]
    with pytest.raises(ValueError, match="attempts"):
        solver.solve(puzzles, 3, attempts=0)


def test_ar_baseline_retries_are_sampled_and_counted(tiny):
    from dgemma.autoregressive import generate_ar
    from dgemma.sudoku import model as solver_module
    from dgemma.sudoku.tokens import decode_solution, encode_prompt

    puzzles = np.stack([parse_board(p) for p in (P1, P2)])
    model = checkpoint.load(tiny).model
    greedy = solver_module.solve_ar(model, puzzles)
    res = solver_module.solve_ar(model, puzzles, attempts=2, seed=4, batch_size=1)
    assert greedy.attempts == [1, 1] and greedy.forwards == 81
    assert res.attempts == [2, 2] and res.forwards == 162
    outs, _ = generate_ar(model, [encode_prompt(p) for p in puzzles], 81, temperature=1.0,
                          seeds=[solver_module.attempt_seed(4, 1), solver_module.attempt_seed(5, 1)])
    assert np.array_equal(res.boards, np.stack([decode_solution(o) for o in outs]))


def test_eval_and_solve_take_attempts(tiny, data, capsys, tmp_path):
    rc, out, _ = run(["eval", str(data / "e.csv"), "--rows", ":2", "--model", str(tiny), "--max-denoising-steps",
                      "2", "--attempts", "2", "--json", str(tmp_path / "r.json"), "--no-progress"], capsys)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and "up to 2 attempts (mean 2.00)" in out
    assert rep["attempts"] == 2 and rep["mean_attempts"] == 2.0 and rep["overall"]["mean_steps"] == 4.0
    assert rep["forwards_per_puzzle"] == 6.0  # two prefills + two 2-step canvases
    rc, out, _ = run(["solve", P1, "--model", str(tiny), "--max-denoising-steps", "2", "--attempts", "3"], capsys)
    assert rc == 1 and "6 denoising steps in 3 attempts of at most 2 steps" in out
    rc, _, err = run(["solve", P1, "--model", str(tiny), "--attempts", "0"], capsys)
    assert rc == 2 and "--attempts must be at least 1" in err


# MARK: train and bench


def test_train_then_resume_then_bench(tmp_path, data, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--batch-size", "2", "--hidden-size", "32", "--layers", "2",
            "--save-every", "1", "--no-progress"]
    rc, stdout, _ = run(args + ["--steps", "2"], capsys)
    assert rc == 0 and json.loads(stdout.splitlines()[-1])["step"] == 2
    rc, stdout, err = run(args + ["--steps", "3"], capsys)
    assert rc == 0 and "resumed from step 2 (4 examples)" in err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    final = checkpoint.load(out / "final")
    assert final.config.canvas_length == 81 and final.generation.max_denoising_steps == 12
    stages = json.loads((out / "run.json").read_text())
    assert stages["objective"] == "diffusion" and [s["from_step"] for s in stages["stages"]] == [0, 2]
    rc, _, err = run(args + ["--steps", "4", "--ar"], capsys)
    assert rc == 2 and "holds a diffusion run" in err

    ar = tmp_path / "ar"
    rc, _, _ = run(["train", "--out", str(ar), "--steps", "1", "--batch-size", "2", "--hidden-size", "32",
                    "--layers", "2", "--ar", "--no-progress"], capsys)
    assert rc == 0 and json.loads((ar / "run.json").read_text())["objective"] == "ar"
    rec = json.loads((ar / "metrics.jsonl").read_text())
    assert rec["loss"] == pytest.approx(rec["encoder_loss"])  # decoder weight 0

    args = ["bench", str(data / "e.csv"), "--rows", ":2", "--model", str(out / "final"), "--ar-model",
            str(ar / "final"), "--max-denoising-steps", "1,2", "--json", str(tmp_path / "b.json"), "--no-progress"]
    rc, stdout, _ = run(args, capsys)
    b = json.loads((tmp_path / "b.json").read_text())
    assert rc == 0 and "AR baseline, greedy" in stdout
    assert [r["max_denoising_steps"] for r in b["diffusion"]] == [1, 2] and b["ar"]["forwards_per_puzzle"] == 81
    assert b["diffusion"][0]["forwards_per_puzzle"] == 2 and b["n"] == 2


def test_source_is_generated_and_random_access():
    src = SudokuSource(seed=3, givens=(30, 30), chunk_size=16)
    p, r = src.example(20)
    assert len(p) == 82 and len(r) == 81 and sum(t != 3 for t in p[1:]) == 30  # 3 = blank
    assert src.example(20) == SudokuSource(seed=3, givens=(30, 30), chunk_size=16).example(20)


def test_shipped_model_solves_an_easy_board(capsys):
    """The packaged solver loads by default and solves a board with 20 blanks (a regression check on the asset)."""
    from dgemma.sudoku.model import default_model_path

    if not (default_model_path() / "config.json").is_file():
        pytest.skip("no shipped model in this checkout")
    easy = np.array(list(S1), dtype=int)
    easy[np.random.default_rng(0).permutation(81)[:20]] = 0
    rc, out, _ = run(["solve", "".join(map(str, easy)), "--seed", "0"], capsys)
    assert rc == 0 and "check: solved" in out
