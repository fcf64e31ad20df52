"""The Sudoku solver: load a checkpoint, solve batches of puzzles by block diffusion or with the AR baseline.

    solver = Solver()                                   # the shipped model, dgemma/assets/sudoku
    result = solver.solve(puzzles, max_denoising_steps=12, seed=0)
    result.boards, result.steps                         # uint8 [n, 81], decoder forwards per puzzle

Diffusion runs through `dgemma.engine.Engine`: one request per puzzle (prompt `encode_prompt(puzzle)`, one 81-token
canvas, the checkpoint's DiffusionGemma sampler), request i seeded with `seed + i`, so a puzzle's answer depends
on its seed only, never on its batch mates or the batch size. The AR baseline (`solve_ar`) runs the same
architecture causally with `dgemma.autoregressive.generate_ar`, greedy, one cell per forward.

Boards are returned exactly as decoded: givens are neither pinned nor repaired, so the metrics see what the model
wrote (non-digit tokens decode to 0, a blank).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..autoregressive import generate_ar
from ..engine import Engine, EngineConfig
from ..sampling_params import SamplingParams
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
    steps: list[int]  # decoder forwards (denoising steps) per puzzle
    forwards: float  # model forwards per puzzle, prompt prefill included


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
              seed: int = 0, progress: Progress | None = None, **sampler) -> SolveResult:
        """Denoise one canvas per puzzle; request i is seeded with `seed + i`. `sampler`: SamplingParams fields
        overriding the checkpoint's (entropy_bound, t_min, t_max, ...)."""
        ids = []
        for i, p in enumerate(puzzles):
            params = SamplingParams(max_new_tokens=CANVAS_LENGTH, max_denoising_steps=max_denoising_steps,
                                    seed=seed + i, ignore_eos=True, **sampler)
            ids.append(self.engine.add_request(encode_prompt(p), params))
        done = {}
        while self.engine.has_work():
            for ev in self.engine.step():
                if ev.kind == "finished":
                    done[ev.request_id] = ev.output
                    if progress is not None:
                        progress(1)
        outs = [done[i] for i in ids]
        boards = np.stack([decode_solution(o.token_ids) for o in outs]) if outs else np.zeros((0, 81), np.uint8)
        steps = [o.decoder_forwards for o in outs]
        return SolveResult(boards, steps, 1.0 + float(np.mean(steps)) if steps else 0.0)


def solve_ar(model, puzzles: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64,
             progress: Progress | None = None) -> SolveResult:
    """The AR baseline: greedy next-token decoding with the encoder, cell by cell (81 forwards per batch)."""
    if isinstance(model, (str, Path)):
        model = load(model).model
    boards, forwards = [], []
    for start in range(0, len(puzzles), batch_size):
        chunk = puzzles[start:start + batch_size]
        outs, n = generate_ar(model, [encode_prompt(p) for p in chunk], CANVAS_LENGTH)
        boards += [decode_solution(o) for o in outs]
        forwards += [n] * len(chunk)
        if progress is not None:
            progress(len(chunk))
    arr = np.stack(boards) if boards else np.zeros((0, 81), np.uint8)
    return SolveResult(arr, [0] * len(boards), float(np.mean(forwards)) if forwards else 0.0)
