"""The Sudoku rules constraint (dgemma/sudoku/rules.py): the mask never lets a digit conflict with a given or a
settled cell, solved boards pass through unchanged, it plugs into the engine like the llguidance constraint, and
the solver and CLI take it as an option."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dgemma import checkpoint
from dgemma.constraint import MASKED, CanvasConstraint
from dgemma.engine import Engine, EngineConfig
from dgemma.model import DiffusionGemma
from dgemma.sampling_params import SamplingParams
from dgemma.sudoku import cli, parse_board
from dgemma.sudoku.model import Solver
from dgemma.sudoku.recipe import generation_config, model_config
from dgemma.sudoku.rules import SudokuRules
from dgemma.sudoku.tokens import CANVAS_LENGTH, DIGIT_OFFSET, VOCAB_SIZE, encode_prompt

P1 = "670000005003040082040005136000730090304206070001090600509008000000950208000127400"
S1 = "678312945153649782942875136265731894394286571781594623529468317417953268836127459"
P17 = "000000010400000000020000000000050407008000300001090000300400200050100000000806000"  # 17 givens
PUZZLES = [parse_board(P1), parse_board(P17), np.zeros(81, np.uint8)]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, intermediate_size=32,
            moe_intermediate_size=16)


def units(i: int) -> list[list[int]]:
    r, c = divmod(i, 9)
    b0 = 27 * (r // 3) + 3 * (c // 3)
    return [[9 * r + k for k in range(9)], [9 * k + c for k in range(9)],
            [b0 + 9 * a + b for a in range(3) for b in range(3)]]


def peers(i: int) -> set[int]:
    return {j for u in units(i) for j in u} - {i}


def digits_of(tokens) -> list[int]:
    return [t - DIGIT_OFFSET if 1 + DIGIT_OFFSET <= t <= 9 + DIGIT_OFFSET else 0 for t in tokens]


def peaked(board: str, noise: float, seed: int) -> torch.Tensor:
    """Logits [81, V] peaked at `board`'s digits (+ Gaussian noise)."""
    g = torch.Generator().manual_seed(seed)
    logits = noise * torch.randn(CANVAS_LENGTH, VOCAB_SIZE, generator=g)
    for i, ch in enumerate(board):
        logits[i, int(ch) + DIGIT_OFFSET] += 12.0
    return logits


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("puzzle", range(len(PUZZLES)))
def test_full_sweep_never_commits_a_conflicting_digit(puzzle, seed):
    """settle=0: every cell bans its digit in its peers; on random logits the committed canvas keeps the givens and,
    outside dead ends, repeats no digit in a row, column or box; the mask allows digits only."""
    pz = PUZZLES[puzzle]
    rules = SudokuRules(pz, settle=0.0)
    logits = 3 * torch.randn(CANVAS_LENGTH, VOCAB_SIZE, generator=torch.Generator().manual_seed(seed))
    out = rules.mask(logits)
    board = digits_of(out)
    assert out == logits.argmax(-1).tolist() and all(board)  # the canvas is the masked argmax, all digits
    assert (logits[:, :1 + DIGIT_OFFSET] == MASKED).all() and (logits[:, 10 + DIGIT_OFFSET:] == MASKED).all()
    assert all(board[i] == pz[i] for i in range(81) if pz[i])
    dead = set(rules.dead_ends)
    assert len(dead) < 81 - int(np.count_nonzero(pz))  # the check below is not vacuous
    for i in range(81):
        if i not in dead:
            assert all(board[j] != board[i] for j in peers(i) if j not in dead), (i, board)


@pytest.mark.parametrize("seed", range(6))
def test_settled_cells_ban_their_digit_in_peers(seed):
    """Default settle: no cell (but a dead end) holds a digit that a given or a settled peer holds, and the settled
    cells are those the model is sure of."""
    pz = parse_board(P1)
    g = torch.Generator().manual_seed(seed)
    logits = peaked(S1, 1.0, seed)
    unsure = torch.rand(81, generator=g) < 0.5
    logits[unsure] = 3 * torch.randn(int(unsure.sum()), VOCAB_SIZE, generator=g)  # half the cells unsure
    digits = logits[:, 1 + DIGIT_OFFSET:10 + DIGIT_OFFSET].clone()
    for i in range(81):  # confidence among the digits the givens allow
        for j in peers(i):
            if pz[j]:
                digits[i, pz[j] - 1] = MASKED
    conf = torch.softmax(digits, -1).amax(-1)
    rules = SudokuRules(pz)
    board = digits_of(rules.mask(logits.clone()))
    settled = {i for i in range(81) if not pz[i] and conf[i] >= 0.99}
    assert settled and len(settled) < 81 - 34
    fixed = settled | {i for i in range(81) if pz[i]}
    for i in range(81):
        if i not in rules.dead_ends:
            assert all(board[j] != board[i] for j in peers(i) & fixed if j not in rules.dead_ends)
        assert not pz[i] or board[i] == pz[i]


@pytest.mark.parametrize("settle", [0.0, 0.99])
@pytest.mark.parametrize("seed", range(4))
def test_a_solved_board_stays_valid_and_completes(settle, seed):
    rules = SudokuRules(parse_board(P1), settle=settle)
    out = rules.mask(peaked(S1, 2.0, seed))
    assert "".join(map(str, digits_of(out))) == S1 and rules.dead_ends == []
    assert not rules.is_complete()
    rules.commit(out)
    assert rules.is_complete()
    wrong = list(out)
    wrong[1], wrong[2] = wrong[2], wrong[1]  # a given changed
    rules.commit(wrong)
    assert not rules.is_complete()


def test_interface_and_bad_input():
    assert isinstance(SudokuRules(PUZZLES[0]), CanvasConstraint)
    with pytest.raises(ValueError, match="contradictory"):
        SudokuRules(parse_board("11" + "0" * 79))
    with pytest.raises(ValueError, match="settle"):
        SudokuRules(PUZZLES[0], settle=1.5)
    with pytest.raises(ValueError, match=r"logits \[81"):
        SudokuRules(PUZZLES[0]).mask(torch.zeros(80, VOCAB_SIZE))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = DiffusionGemma(model_config(**TINY))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return checkpoint.save(model, tmp_path_factory.mktemp("m") / "tiny", generation=generation_config())


def test_engine_masks_every_step_with_the_plug_in(tiny):
    """A random model under settle=0 rules: every step's argmax keeps the givens and writes only digits; the
    committed canvas is the last step's swept argmax. Without rules the same model changes givens."""
    ck = checkpoint.load(tiny, dtype=torch.float32)
    eng = Engine(ck.model, defaults=ck.generation, config=EngineConfig(max_num_seqs=2, max_model_len=163))
    pz = parse_board(P1)
    params = SamplingParams(max_new_tokens=81, seed=5, ignore_eos=True, trace=True)
    ruled = eng.add_request(encode_prompt(pz), params, constraint=SudokuRules(pz, settle=0.0))
    free = eng.add_request(encode_prompt(pz), params)
    outs = {}
    while eng.has_work():
        for ev in eng.step():
            if ev.kind == "finished":
                outs[ev.request_id] = ev.output
    for t in outs[ruled].trace:
        board = digits_of(t.argmax)
        assert all(board) and all(board[i] == pz[i] for i in range(81) if pz[i])
    assert outs[ruled].token_ids == outs[ruled].trace[-1].argmax
    assert any(digits_of(outs[free].token_ids)[i] != pz[i] for i in range(81) if pz[i])
    with pytest.raises(ValueError, match="not both"):
        eng.add_request([1, 2], SamplingParams(regex="a+"), constraint=SudokuRules(pz))


def test_solver_and_cli_take_rules(tiny, capsys):
    solver = Solver(tiny, batch_size=2)
    pz = [parse_board(P1), parse_board(P17)]
    res = solver.solve(pz, max_denoising_steps=4, rules=0.0)
    for p, b in zip(pz, res.boards):
        assert (b > 0).all() and ((p == 0) | (p == b)).all()
    assert cli.main(["solve", P1, "--model", str(tiny), "--rules", "--json", "--max-denoising-steps", "3"]) == 1
    rec = json.loads(capsys.readouterr().out)
    assert rec["givens_changed"] == 0 and rec["blank_cells"] == 0
    assert cli.main(["solve", P1, "--model", str(tiny), "--rules-settle", "0.5"]) == 2
    assert "--rules-settle needs --rules" in capsys.readouterr().err


def test_shipped_model_with_rules_solves_an_easy_board():
    res = Solver(batch_size=1).solve([parse_board(P1)], rules=0.99)
    assert "".join(map(str, res.boards[0])) == S1
