"""The Sudoku solver: load a checkpoint, solve batches of puzzles by block diffusion or with the AR baseline.

    solver = Solver()                                   # the shipped model, dgemma/assets/sudoku
    result = solver.solve(puzzles, max_denoising_steps=12, seed=0)
    result.boards, result.steps                         # uint8 [n, 81], decoder forwards per puzzle
    solver.solve(puzzles, attempts=16)                  # hard puzzles: re-denoise invalid boards, keep a valid one
    solver.solve(puzzles, rules=0.99)                   # each step, ban digits that conflict with the givens or with
                                                        # the cells settled at probability >= 0.99 (rules.py)

Diffusion runs through `dgemma.engine.Engine`: one request per puzzle (prompt `encode_prompt(puzzle)`, one 81-token
canvas, the checkpoint's DiffusionGemma sampler), request i seeded with `seed + i`, so a puzzle's answer depends
on its seed only, never on its batch mates or the batch size. The AR baseline (`solve_ar`) runs the same
architecture causally with `dgemma.autoregressive.generate_ar`, greedy, one cell per forward.

Boards are returned exactly as decoded: without `rules`, givens are neither pinned nor repaired, so the metrics see
what the model wrote (non-digit tokens decode to 0, a blank). With `rules` (`dgemma.sudoku.rules.SudokuRules`, a
constraint plug-in of the engine) every step's logits are masked: givens are kept, and no digit conflicts with a
given or with a settled cell.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..autoregressive import generate_ar
from ..engine import Engine, EngineConfig
from ..sampling_params import SamplingParams
from .board import is_solution
from .rules import SudokuRules
from .tokens import CANVAS_LENGTH, PROMPT_LENGTH, decode_solution, encode_prompt

Progress = Callable[[int], None]  # called with the number of puzzles just finished


def default_model_path() -> Path:
    """The diffusion solver shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "sudoku"


def default_ar_model_path() -> Path:
    """The autoregressive baseline shipped beside it (same architecture, size, data and budget)."""
    return Path(__file__).resolve().parent.parent / "assets" / "sudoku_ar"


def load(path: str | Path | None = None, device: str = "cpu") -> checkpoint.Checkpoint:
    """A Sudoku checkpoint (default: the shipped solver), checked to fit the task's canvas and vocabulary."""
    path = Path(path) if path is not None else default_model_path()
    if not path.is_dir():
        raise checkpoint.CheckpointError(f"{path}: no such model folder")
    ck = checkpoint.load(path, dtype=torch.float32, device=device)
    if ck.config.canvas_length != CANVAS_LENGTH:
        raise checkpoint.CheckpointError(f"{path}: canvas_length is {ck.config.canvas_length}; a Sudoku solver "
                                         f"needs {CANVAS_LENGTH} (one canvas per board)")
    if ck.config.text.vocab_size < 13:
        raise checkpoint.CheckpointError(f"{path}: vocabulary of {ck.config.text.vocab_size} tokens cannot hold "
                                         "the Sudoku tokens (ids 0..12)")
    return ck


@dataclass
class SolveResult:
    boards: np.ndarray  # uint8 [n, 81], 0 where the model wrote no digit
    steps: list[int]  # decoder forwards (denoising steps) per puzzle, summed over its attempts
    forwards: float  # model forwards per puzzle, prompt prefills included (one per attempt)
    attempts: list[int] = field(default_factory=list)  # canvases denoised per puzzle (1 unless `attempts` > 1)


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of retry `attempt` (0 = the first try, seeded `seed` itself) of a request seeded `seed`. The odd
    multiplier changes the low 32 bits, the only ones a CPU `torch.Generator` uses, for every attempt < 2**32."""
    return (seed + attempt * 0x9E3779B97F4A7C15) % 2**63


AR_RETRY_TEMPERATURE = 1.0  # the AR baseline's retries sample its own distribution (its first attempt is greedy)


def retry_until_solved(puzzles, attempts: int, run_round: Callable, progress: Progress | None) -> tuple:
    """The attempts loop shared by both solvers. `run_round(todo, j, finished)` produces attempt j for the puzzle
    indices `todo` and calls `finished(i, board, forwards)` for each; a puzzle whose board fails `is_solution` goes
    to the next round while attempts remain. Returns (boards [n, 81], forwards per puzzle, attempts per puzzle)."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1 (got {attempts})")
    n = len(puzzles)
    boards = np.zeros((n, 81), np.uint8)
    forwards, tries = [0] * n, [0] * n
    todo = list(range(n))
    for j in range(attempts):
        left = []

        def finished(i: int, board: np.ndarray, cost: int) -> None:
            boards[i] = board
            forwards[i] += cost
            tries[i] += 1
            if j + 1 < attempts and not is_solution(puzzles[i], board):
                left.append(i)
            elif progress is not None:
                progress(1)

        run_round(todo, j, finished)
        todo = sorted(left)
        if not todo:
            break
    return boards, forwards, tries


class Solver:
    """A loaded diffusion solver and an engine sized for `batch_size` puzzles at a time."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 64, device: str = "cpu",
                 batch_invariant: bool = True):
        self.checkpoint = load(path, device)
        self.model, self.generation = self.checkpoint.model, self.checkpoint.generation
        self.engine = Engine(
            self.model, eos_token_ids=(), pad_token_id=self.generation.pad_token_id, defaults=self.generation,
            config=EngineConfig(max_num_seqs=batch_size, max_model_len=PROMPT_LENGTH + CANVAS_LENGTH,
                                prefill_chunk=PROMPT_LENGTH, logits_budget_bytes=64 * 2**20,
                                batch_invariant=batch_invariant))

    def solve(self, puzzles: Sequence[np.ndarray] | np.ndarray, max_denoising_steps: int | None = None,
              seed: int = 0, progress: Progress | None = None, attempts: int = 1, rules: float | None = None,
              **sampler) -> SolveResult:
        """Denoise one canvas per puzzle; request i is seeded with `seed + i`. `sampler`: SamplingParams fields
        overriding the checkpoint's (entropy_bound, t_min, t_max, ...).

        `attempts` > 1: a puzzle whose board is not a valid solution (`is_solution`) is denoised again from a fresh
        random canvas, seeded `attempt_seed(seed + i, j)` for attempt j, until one is valid or the attempts
        are spent (then the last board is kept). Sudoku verifies itself, so extra samples cost compute only: the
        steps and forwards of every attempt are counted.

        `rules` (a probability, `SudokuRules`' settle threshold): mask each step's logits with the puzzle's rules:
        givens kept, and no digit that a given or a settled cell (best digit's probability >= `rules`) of its row,
        column or box holds; None: the model alone."""
        steps: list[int] = [0] * len(puzzles)

        def run_round(todo, j, finished):
            def done(i, out):
                steps[i] += out.decoder_forwards
                finished(i, decode_solution(out.token_ids), out.decoder_forwards + 1)  # + 1: the prompt prefill
            self._denoise(todo, puzzles, [attempt_seed(seed + i, j) for i in todo], max_denoising_steps, sampler, done,
                          rules)

        boards, forwards, tries = retry_until_solved(puzzles, attempts, run_round, progress)
        return SolveResult(boards, steps, float(np.mean(forwards)) if forwards else 0.0, tries)

    def _denoise(self, which: list[int], puzzles, seeds: list[int], max_denoising_steps: int | None, sampler: dict,
                 finished: Callable[[int, object], None], rules: float | None = None) -> None:
        """One canvas for each puzzle index in `which`, seeded with `seeds`; `finished(i, output)` as each ends."""
        index = {}
        for i, seed in zip(which, seeds):
            params = SamplingParams(max_new_tokens=CANVAS_LENGTH, max_denoising_steps=max_denoising_steps,
                                    seed=seed, ignore_eos=True, **sampler)
            constraint = SudokuRules(puzzles[i], rules) if rules is not None else None
            index[self.engine.add_request(encode_prompt(puzzles[i]), params, constraint=constraint)] = i
        while self.engine.has_work():
            for ev in self.engine.step():
                if ev.kind == "finished":
                    finished(index[ev.request_id], ev.output)


def solve_ar(model, puzzles: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64,
             progress: Progress | None = None, attempts: int = 1, seed: int = 0,
             temperature: float = AR_RETRY_TEMPERATURE) -> SolveResult:
    """The AR baseline: greedy next-token decoding with the encoder, cell by cell (81 forwards per board).

    `attempts` > 1 gives it the diffusion solver's budget of verified retries: a board that is not a valid
    solution is decoded again, sampled at `temperature` (attempt j of puzzle i seeded `attempt_seed(seed + i, j)`),
    until one verifies or the attempts are spent; every attempt's forwards are counted."""
    if isinstance(model, (str, Path)):
        model = load(model).model

    def run_round(todo, j, finished):
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            outs, fw = generate_ar(model, [encode_prompt(puzzles[i]) for i in idx], CANVAS_LENGTH,
                                   temperature=0.0 if j == 0 else temperature,
                                   seeds=[attempt_seed(seed + i, j) for i in idx])
            for i, o in zip(idx, outs):
                finished(i, decode_solution(o), fw)

    boards, forwards, tries = retry_until_solved(puzzles, attempts, run_round, progress)
    return SolveResult(boards, [0] * len(puzzles), float(np.mean(forwards)) if forwards else 0.0, tries)
