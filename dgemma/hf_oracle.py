"""Feeding the oracle (transformers' DiffusionGemma `generate`) the same random draws as dgemma.

dgemma draws from one `torch.Generator` per request (`dgemma.sampler.PerRequestDraws`); transformers draws with
`torch.randint` / `torch.multinomial` on the global generator for the whole batch. `replay_draws` swaps those two
functions inside transformers' generation module only, serving each row from its own dgemma stream (multinomial by
inverse CDF on transformers' own probabilities, so a numeric difference on its side still shows). With it, both
implementations produce the same tokens, which the parity tests and the generation benchmark check.

Needs transformers (a test extra); importing this module does not.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch


class _TorchProxy:
    """Stands in for `torch` inside HF's generation module: overrides a few functions, forwards the rest."""

    def __init__(self, **overrides):
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def replay_draws(draws, rows: int, C: int):
    """Makes HF's generate consume `draws`: its randint (initial canvas and renoise; both draw the same way) and
    multinomial are served from each row's own stream. Rows HF has already frozen draw nothing, as in dgemma's
    engine (HF discards their draws anyway). Yields a record of what HF did, per canvas."""
    rec = SimpleNamespace(canvases=[], frozen=torch.zeros(rows, dtype=torch.bool), last=None, calls=[])

    def live():
        return (~rec.frozen).nonzero().flatten().tolist()

    def fake_randint(low, high, size, device=None, **kw):
        assert low == 0 and tuple(size) == (rows, C) and not kw
        if rec.last != "multinomial":  # a randint not right after a multinomial starts a canvas
            rec.frozen[:] = False
            rec.canvases.append(SimpleNamespace(inputs=[], sc=[], accepted=[], stop=[], drafts=[]))
        out = torch.zeros(size, dtype=torch.int64)
        out[live()] = draws.select(live()).renoise(C, high)
        rec.last = "randint"
        rec.calls.append("randint")
        return out

    def fake_multinomial(probs, num_samples, **kw):
        assert num_samples == 1 and not kw
        probs = probs.view(rows, C, -1)
        out = torch.zeros(rows, C, dtype=torch.int64)
        out[live()] = draws.select(live()).categorical(probs[live()])
        rec.last = "multinomial"
        rec.calls.append("multinomial")
        return out.view(-1, 1)

    from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_gen

    stop_call = hf_gen.StableAndConfidentStoppingCriteria.__call__
    accept = hf_gen.EntropyBoundSampler.accept_canvas

    def recording_stop(self, argmax_canvas, logits, **kw):
        res = stop_call(self, argmax_canvas, logits, **kw)
        rec.canvases[-1].stop.append(res.clone())
        rec.frozen |= res
        return res

    def recording_accept(self, *args):
        out = accept(self, *args)
        rec.canvases[-1].accepted.append(self.accepted_token_mask.clone())
        return out

    saved = hf_gen.torch
    hf_gen.torch = _TorchProxy(randint=fake_randint, multinomial=fake_multinomial)
    hf_gen.StableAndConfidentStoppingCriteria.__call__ = recording_stop
    hf_gen.EntropyBoundSampler.accept_canvas = recording_accept
    try:
        yield rec
    finally:
        hf_gen.torch = saved
        hf_gen.StableAndConfidentStoppingCriteria.__call__ = stop_call
        hf_gen.EntropyBoundSampler.accept_canvas = accept


