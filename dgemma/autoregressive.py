"""Autoregressive decoding with the encoder's next-token head: the honest baseline for diffusion.

The same weights run causally (encoder mode) with the KV cache; each forward appends one token per row. Greedy by
default, or sampled with a temperature from per-row generators. Used by the generation benchmark and by the
Sudoku AR baseline, so that diffusion is always compared against the same architecture on the same engine.
"""

from __future__ import annotations

import torch

from .kv_cache import EncodeSegment, KVCache
from .model import DiffusionGemma


@torch.no_grad()
def generate_ar(model: DiffusionGemma, prompts: list[list[int]], max_new_tokens: int, eos_ids=(),
                temperature: float = 0.0, seeds: list[int] | None = None,
                cache: KVCache | None = None, constraints: list | None = None) -> tuple[list[list[int]], int]:
    """Decode up to `max_new_tokens` per prompt; returns (outputs, number of forwards).

    `constraints`: per prompt a `dgemma.constraint.CanvasConstraint` or None. Each next token's logits are masked by
    it as a canvas of one position (for an llguidance `Constraint`: the tokens allowed after the output so far,
    EOS only where it is complete), then the token is committed to it: the usual constrained AR decode. Give the
    constraint's EOS in `eos_ids` so that a row stops where its constraint is complete."""
    b = len(prompts)
    capacity = max(map(len, prompts)) + max_new_tokens
    if cache is None or cache.num_slots < b or cache.capacity < capacity:
        cache = KVCache(model.text, b, capacity, dtype=model.dtype, device=model.device)
    for s in range(b):
        cache.reset(s)
    gens = [torch.Generator(device=model.device).manual_seed(s) for s in (seeds or range(b))]
    width = max(map(len, prompts))
    ids = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    seg = EncodeSegment(cache, ids.to(model.device), list(range(b)), lengths.tolist())
    (hidden,) = model([seg])
    seg.finish()
    last = hidden[torch.arange(b), lengths - 1]  # [B, H] each row's last prompt position
    outputs: list[list[int]] = [[] for _ in range(b)]
    live = list(range(b))
    forwards = 1
    eos = set(eos_ids)
    while True:
        logits = model.logits(last)  # [len(live), V]
        if constraints is not None:
            for j, r in enumerate(live):
                if constraints[r] is not None:
                    constraints[r].mask(logits[j:j + 1])
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = [int(torch.multinomial(probs[j], 1, generator=gens[r])) for j, r in enumerate(live)]
        else:
            nxt = logits.argmax(-1).tolist()
        still = []
        for j, r in enumerate(live):
            outputs[r].append(nxt[j])
            if constraints is not None and constraints[r] is not None:
                constraints[r].commit([nxt[j]])
            if nxt[j] not in eos and len(outputs[r]) < max_new_tokens:
                still.append((r, nxt[j]))
        if not still:
            return outputs, forwards
        live = [r for r, _ in still]
        step = torch.tensor([[t] for _, t in still], device=model.device)
        seg = EncodeSegment(cache, step, live)
        (hidden,) = model([seg])
        seg.finish()
        forwards += 1
        last = hidden[:, 0]
