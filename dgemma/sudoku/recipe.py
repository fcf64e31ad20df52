"""The Sudoku recipe: the solver's model config, its training source, and the trainer settings.

    from dgemma.sudoku.recipe import model_config, train_config, SudokuSource
    model = DiffusionGemma(model_config()); model.init_weights(...)
    Trainer(model, SudokuSource(seed=0), train_config(steps=600), "runs/sudoku").train()

One example = prompt `encode_prompt(puzzle)` (<bos> + 81 cells at positions 0..81) and response
`encode_solution(solution)`: exactly one 81-token canvas at positions 82..162, no EOS (`require_eos=False`).

Why the geometry works with 1-D RoPE only. Sudoku relations are periodic in the row-major cell index: same column
<=> index difference = 0 mod 9, same stack column = 0 mod 3, same band row-in-box = (i mod 27) ... So every layer
uses proportional RoPE over the *whole* head (`partial_rotary_factor` 1) with `factor = 3 / (2 pi)` and
`theta = 3 ** (head_dim / 2)`: the inverse frequencies are 2 pi / 3, 2 pi / 9, 2 pi / 27, 2 pi / 81, 2 pi / 243, ...
(ratio 1/3). Periods 3, 9, 27 and 81 are exactly the Sudoku periods, and since a canvas cell sits 81 positions after
its prompt cell, a canvas query sees the prompt through those frequencies exactly as it sees the canvas. The slow
frequencies beyond 81 tell prompt from canvas and act as nearly position-free channels for content matching.
Absolute row/box identity comes from attending to <bos> at position 0.

Every layer is effectively global: full layers, plus sliding layers whose window (256) exceeds the 163-token
sequence (they keep their separate V projection, which full layers lack). The MoE the architecture requires is
kept small (4 experts, top-2) beside the dense GeGLU MLP.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import FULL, SLIDING, GenerationConfig, ModelConfig
from ..train import ChunkedSource, TrainConfig, register_source
from .data import training_examples
from .tokens import CANVAS_LENGTH, EOS_ID, PAD_ID, VOCAB_SIZE, encode_prompt, encode_solution

GIVENS_RANGE = (22, 45)  # see docs/sudoku.md, "Data": evaluation spans 17-42; the canvas noise supplies the easy end


def text_config(hidden_size: int = 128, num_hidden_layers: int = 6, num_attention_heads: int = 4,
                head_dim: int = 32, intermediate_size: int = 256, num_experts: int = 4, top_k_experts: int = 2,
                moe_intermediate_size: int = 64) -> dict:
    """`text_config` of the Sudoku solver (defaults: the shipped model)."""
    layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(num_hidden_layers)]
    layer_types[-1] = FULL
    rope = {"rope_type": "proportional", "rope_theta": float(3 ** (head_dim // 2)), "partial_rotary_factor": 1.0,
            "factor": 3 / (2 * math.pi)}
    return {
        "model_type": "diffusion_gemma_text", "vocab_size": VOCAB_SIZE, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_attention_heads,
        "head_dim": head_dim, "global_head_dim": head_dim, "num_global_key_value_heads": num_attention_heads,
        "num_experts": num_experts, "top_k_experts": top_k_experts, "moe_intermediate_size": moe_intermediate_size,
        "sliding_window": 256, "layer_types": layer_types, "max_position_embeddings": 256,
        "rope_parameters": {SLIDING: dict(rope), FULL: dict(rope)}, "final_logit_softcapping": 30.0,
        "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": 2,
    }


def model_config(**text_overrides) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": CANVAS_LENGTH,
                                  "text_config": text_config(**text_overrides), "eos_token_id": EOS_ID},
                                 source="sudoku recipe")


def generation_config(max_denoising_steps: int = 12) -> GenerationConfig:
    """The solver's denoising defaults: the released sampler (entropy bound 0.1, temperature 0.8 -> 0.4,
    stable-and-confident stop) capped at 12 steps; one canvas = the whole board."""
    return GenerationConfig(max_new_tokens=CANVAS_LENGTH, max_denoising_steps=max_denoising_steps,
                            entropy_bound=0.1, t_min=0.4, t_max=0.8, stability_threshold=1,
                            confidence_threshold=0.005, pad_token_id=PAD_ID)


def train_config(steps: int, batch_size: int = 64, ar: bool = False, **overrides) -> TrainConfig:
    """Trainer settings. Diffusion: decoder loss only (the encoder's next-token loss on random puzzles is noise and
    on the solution an AR task competing for a tiny model's capacity). AR baseline (`ar=True`): the encoder's
    next-token loss on the solution only, decoder weight 0, no self-conditioning pass."""
    base = dict(steps=steps, batch_size=batch_size, lr=1e-3, warmup=min(100, max(1, steps // 20)),
                min_lr_ratio=0.1, weight_decay=0.01, grad_clip=1.0, require_eos=False, save_every=100,
                keep_checkpoints=3)
    if ar:
        base.update(decoder_loss_weight=0.0, encoder_loss_weight=1.0, encoder_loss_on_prompt=False,
                    self_cond_prob=0.0)
    else:
        base.update(decoder_loss_weight=1.0, encoder_loss_weight=0.0, self_cond_prob=0.5)
    base.update(overrides)
    return TrainConfig(**base)


# MARK: the example source


class SudokuSource(ChunkedSource):
    """Generated training puzzles (never the evaluation files): chunk c holds `chunk_size` examples from 64 fresh
    backtracking grids expanded by random Sudoku symmetries, each masked to k givens, k uniform in `givens`."""

    def __init__(self, seed: int = 0, givens: tuple[int, int] = GIVENS_RANGE, chunk_size: int = 1024):
        self.givens = tuple(givens)
        super().__init__(self._chunk, seed=seed, chunk_size=chunk_size)

    def _chunk(self, rng: np.random.Generator, n: int) -> list[tuple[list[int], list[int]]]:
        return [(encode_prompt(p), encode_solution(s))
                for p, s in training_examples(n, rng, givens_range=self.givens, pool_size=64, chunk=n)]


def _source_factory(arg: str, *, seed: int, tokenizer=None, **options) -> SudokuSource:
    """`--data sudoku:LO-HI` (givens range; empty = the recipe's) for `dgemma train`."""
    if arg:
        lo, _, hi = arg.partition("-")
        options.setdefault("givens", (int(lo), int(hi or lo)))
    return SudokuSource(seed=seed, **options)


register_source("sudoku", _source_factory)
