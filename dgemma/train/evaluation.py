"""Validation loss: the training objective, without gradients, on a fixed held-out set.

The set is examples `0 .. n-1` of a validation source. Their noise, canvas choice and self-conditioning are keyed on
(seed, index) like training's, so every evaluation sees the very same noisy inputs and the curve measures the model,
not the draw. Both parts are reported (`val_decoder_loss`: denoising cross-entropy per canvas position;
`val_encoder_loss`: next-token cross-entropy per counted token) and `val_loss`, their weighted sum as in training.
Sums and counts are accumulated, then divided once: any batching, and any split over data-parallel ranks (rank r
takes examples r, r + world, ...), gives the same figure. Under FSDP (`lockstep`) every rank runs as many batches
as the busiest one (a rank out of examples repeats its first batch and drops the result) and the objective's
forwards do not depend on the draw, since each forward is a collective.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..model import DiffusionGemma
from .data import ExampleSource, collate
from .objective import ObjectiveConfig, loss_parts


def evaluate(model: DiffusionGemma, source: ExampleSource, n_examples: int, objective: ObjectiveConfig, *,
             batch_size: int, eos_id: int, pad_id: int, require_eos: bool = True, autocast: bool = False,
             rank: int = 0, world: int = 1, lockstep: bool = False) -> dict[str, float | None]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # decoder sum, count, encoder sum, count
    mine = list(range(rank, n_examples, world))
    busiest = len(range(0, n_examples, world)) if lockstep else len(mine)
    try:
        with torch.no_grad():
            for start in range(0, busiest, batch_size):
                idx = mine[start:start + batch_size]
                spare = not idx  # lockstep: this rank has run out of examples; it runs one and drops it
                idx = idx or mine[:1] or [0]
                batch = collate([source.example(i) for i in idx], idx, objective.canvas_length, eos_id, pad_id,
                                objective.vocab_size, require_eos).to(device)
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with ctx:
                    p = loss_parts(model, batch, objective, lockstep=lockstep)
                if not spare:
                    sums += torch.tensor([float(p.decoder_sum), p.decoder_count, float(p.encoder_sum),
                                          p.encoder_count], dtype=torch.float64, device=device)
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    dec = float(sums[0] / sums[1]) if sums[1] > 0 else None
    enc = float(sums[2] / sums[3]) if sums[3] > 0 else None
    total = (objective.decoder_loss_weight * (dec or 0.0)) + (objective.encoder_loss_weight * (enc or 0.0))
    return {"val_loss": total, "val_decoder_loss": dec, "val_encoder_loss": enc}
