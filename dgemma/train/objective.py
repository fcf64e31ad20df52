"""The block-diffusion training objective (spec section 2, decision 5: the JAX/NeMo recipe).

Per example: one `t ~ U(eps, 1)`; one of the response's canvases selected uniformly; each of its tokens replaced,
with probability t, by a token uniform over the whole vocabulary. The decoder denoises that canvas while attending
to the clean prompt and earlier canvases (the encoder's K/V) and to itself bidirectionally. Loss = flat mean
cross-entropy over *all* canvas positions (no 1/t weight) + the encoder's next-token cross-entropy on the clean
sequence. Self-conditioning: with probability `self_cond_prob` per example the decoder also gets the soft embedding
of a first, gradient-free pass's logits; otherwise a zero signal (the technical report's version).

One model forward computes the encoder and the decoder together: `EncoderSegment` runs first in the segment list
and records each layer's K/V (with gradients), which `DecoderSegment` reads at the same layer. The decoder's view
of the prefix is exactly what inference sees (`dgemma.kv_cache`): every prefix key on full layers, the last
`sliding_window - 1` on sliding layers, so training and generation agree (tests/test_train_objective.py).

All randomness is keyed on (seed, global example index), so a batch's noise does not depend on how examples are
split over ranks or micro-batches, nor on anything a resumed run would have to restore.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TextConfig
from ..model import DiffusionGemma, attention
from .data import Batch


@dataclass(frozen=True)
class ObjectiveConfig:
    canvas_length: int
    vocab_size: int
    eps: float = 1e-3  # t ~ U(eps, 1): never a fully clean canvas
    self_cond_prob: float = 0.5
    decoder_loss_weight: float = 1.0
    encoder_loss_weight: float = 1.0
    encoder_loss_on_prompt: bool = True  # False: the encoder's next-token loss covers the response only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canvas_length <= 0 or self.vocab_size <= 1:
            raise ValueError(f"canvas_length and vocab_size must be positive, got {self.canvas_length}, "
                             f"{self.vocab_size}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if not 0.0 <= self.self_cond_prob <= 1.0:
            raise ValueError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        if self.decoder_loss_weight < 0 or self.encoder_loss_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.decoder_loss_weight == 0 and self.encoder_loss_weight == 0:
            raise ValueError("decoder_loss_weight and encoder_loss_weight are both 0: nothing to train")


class EncoderSegment:
    """Causal rows over the clean sequence [B, S] (right padding), recording every layer's K/V for the decoder."""

    causal = True
    sc_embeds = None

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, text: TextConfig):
        b, s = input_ids.shape
        dev = input_ids.device
        self.input_ids, self.text = input_ids, text
        pos = torch.arange(s, device=dev)
        self.positions = pos.expand(b, s)
        causal = (pos[None, :, None] >= pos[None, None, :]) & (pos < lengths.to(dev)[:, None])[:, None, :]
        # The same windows as kv_cache.EncodeSegment: a query sees keys less than `sliding_window` positions back.
        self.masks = {False: causal, True: causal & ((pos[:, None] - pos[None, :]) < text.sliding_window)}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q, k, v):
        self.k[layer], self.v[layer] = k, v
        return attention(q, k, v, self.masks[self.text.is_sliding(layer)])


class DecoderSegment:
    """Bidirectional canvases [B, C] at positions `prefix_lens + arange(C)`, reading the encoder's K/V of the
    prefix (full layers: every key before `prefix_lens`; sliding layers: the last `sliding_window - 1` of them)."""

    causal = False

    def __init__(self, encoder: EncoderSegment, canvas: torch.Tensor, prefix_lens: torch.Tensor,
                 sc_embeds: torch.Tensor | None = None):
        b, c = canvas.shape
        dev = canvas.device
        text = encoder.text
        self.encoder, self.input_ids, self.sc_embeds, self.text = encoder, canvas, sc_embeds, text
        prefix = prefix_lens.to(dev)
        self.positions = prefix[:, None] + torch.arange(c, device=dev)
        self.p = int(prefix.max()) if b else 0
        kpos = torch.arange(self.p, device=dev)
        full = kpos[None] < prefix[:, None]
        sliding = full & (kpos[None] >= prefix[:, None] - (text.sliding_window - 1))
        own = torch.ones(b, c, dtype=torch.bool, device=dev)
        self.masks = {s: torch.cat([m, own], 1)[:, None, :].expand(b, c, self.p + c)
                      for s, m in ((False, full), (True, sliding))}

    def attend(self, layer: int, q, k, v):
        if self.p:
            k = torch.cat([self.encoder.k[layer][:, :self.p], k], 1)
            v = torch.cat([self.encoder.v[layer][:, :self.p], v], 1)
        return attention(q, k, v, self.masks[self.text.is_sliding(layer)])


def example_seed(seed: int, index: int) -> int:
    """A 63-bit seed for one example, decorrelated from its neighbours' (SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, index, 0x5EED]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class Draw:
    """The objective's random choices for a batch: all [B] or [B, C]."""

    t: torch.Tensor  # noise level per example
    canvas_index: torch.Tensor  # selected canvas per example
    prefix_lens: torch.Tensor  # tokens before the selected canvas
    clean: torch.Tensor  # the selected canvas, clean (the targets)
    noisy: torch.Tensor  # the decoder's input
    corrupted: torch.Tensor  # which positions were resampled
    use_sc: torch.Tensor  # self-conditioning on (two-pass) per example


def draw(batch: Batch, cfg: ObjectiveConfig) -> Draw:
    c, n = cfg.canvas_length, batch.size
    t = torch.empty(n)
    k = torch.empty(n, dtype=torch.long)
    corrupted = torch.empty(n, c, dtype=torch.bool)
    noise = torch.empty(n, c, dtype=torch.long)
    use_sc = torch.empty(n, dtype=torch.bool)
    for i, idx in enumerate(batch.indices.tolist()):
        g = torch.Generator().manual_seed(example_seed(cfg.seed, idx))
        t[i] = cfg.eps + (1.0 - cfg.eps) * torch.rand((), generator=g)
        k[i] = torch.randint(int(batch.n_canvases[i]), (), generator=g)
        corrupted[i] = torch.rand(c, generator=g) < t[i]
        noise[i] = torch.randint(cfg.vocab_size, (c,), generator=g)
        use_sc[i] = torch.rand((), generator=g) < cfg.self_cond_prob
    ids = batch.input_ids.cpu()
    prefix = batch.prompt_lens.cpu() + k * c
    clean = torch.gather(ids, 1, prefix[:, None] + torch.arange(c))
    dev = batch.input_ids.device
    return Draw(t.to(dev), k.to(dev), prefix.to(dev), clean.to(dev), torch.where(corrupted, noise, clean).to(dev),
                corrupted.to(dev), use_sc.to(dev))


def run(model: DiffusionGemma, input_ids: torch.Tensor, lengths: torch.Tensor, canvas: torch.Tensor,
        prefix_lens: torch.Tensor, sc_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of encoder (clean sequence) and decoder (canvas): final hidden states of both."""
    enc = EncoderSegment(input_ids, lengths, model.text)
    dec = DecoderSegment(enc, canvas, prefix_lens, sc_embeds)
    he, hd = model([enc, dec])
    return he, hd


@dataclass
class LossParts:
    """Loss *sums* and counts, so the trainer can normalise over the whole global batch (all micro-batches and
    ranks): averaging per-rank means would weight a rank's tokens by its share of the encoder tokens."""

    decoder_sum: torch.Tensor
    decoder_count: int
    encoder_sum: torch.Tensor
    encoder_count: int

    def total(self, cfg: ObjectiveConfig, decoder_norm: float | None = None, encoder_norm: float | None = None):
        dn = decoder_norm or max(self.decoder_count, 1)
        en = encoder_norm or max(self.encoder_count, 1)
        return cfg.decoder_loss_weight * self.decoder_sum / dn + cfg.encoder_loss_weight * self.encoder_sum / en


def encoder_targets(batch: Batch, cfg: ObjectiveConfig) -> torch.Tensor:
    """[B, S-1] bool: which next-token predictions the encoder loss counts."""
    j = torch.arange(batch.input_ids.shape[1] - 1, device=batch.input_ids.device)
    valid = j[None] < (batch.lengths - 1)[:, None]
    if not cfg.encoder_loss_on_prompt:
        valid &= j[None] >= (batch.prompt_lens - 1)[:, None]
    return valid


def loss_parts(model: DiffusionGemma, batch: Batch, cfg: ObjectiveConfig, d: Draw | None = None,
               lockstep: bool = False) -> LossParts:
    """The loss sums of one (micro-)batch. A part with weight 0 is not computed at all (its sum is 0, its count
    0): with `encoder_loss_weight == 0` the encoder runs over the prefix only (what the decoder reads), with
    `decoder_loss_weight == 0` there is no decoder pass. `lockstep` (FSDP: every rank must run the same forwards)
    runs the self-conditioning pass even when no row of this batch is self-conditioned, and discards it."""
    zero = batch.input_ids.new_zeros((), dtype=torch.float32)
    if cfg.decoder_loss_weight == 0:  # the autoregressive objective: the encoder alone
        he = model([EncoderSegment(batch.input_ids, batch.lengths, model.text)])[0]
        enc_sum, enc_count = _encoder_sum(model, he, batch, cfg)
        return LossParts(zero, 0, enc_sum, enc_count)
    d = d or draw(batch, cfg)
    sc = None
    any_sc = bool(d.use_sc.any())
    if cfg.self_cond_prob > 0 and (any_sc or lockstep):
        rows = d.use_sc.nonzero().squeeze(1) if any_sc else d.use_sc.new_zeros(1, dtype=torch.long)
        # Pass 1 (no gradient, zero signal) on the self-conditioned rows only; its encoder needs only the prefix.
        width = max(1, int(d.prefix_lens[rows].max()))
        with torch.no_grad():
            _, h1 = run(model, batch.input_ids[rows, :width], batch.lengths[rows].clamp(max=width), d.noisy[rows],
                        d.prefix_lens[rows])
            soft = model.soft_embed(model.logits(h1))
        # A zero signal makes the self-conditioning MLP output exactly zero, so other rows are unaffected.
        if any_sc:
            sc = soft.new_zeros(batch.size, *soft.shape[1:])
            sc[rows] = soft
    if cfg.encoder_loss_weight == 0:  # the decoder reads the prefix only: the response needs no encoder pass
        width = max(1, int(d.prefix_lens.max()))
        _, hd = run(model, batch.input_ids[:, :width], batch.lengths.clamp(max=width), d.noisy, d.prefix_lens, sc)
        enc_sum, enc_count = zero, 0
    else:
        he, hd = run(model, batch.input_ids, batch.lengths, d.noisy, d.prefix_lens, sc)
        enc_sum, enc_count = _encoder_sum(model, he, batch, cfg)
    dec_sum = F.cross_entropy(model.logits(hd).flatten(0, 1), d.clean.flatten(), reduction="sum")
    return LossParts(dec_sum, d.clean.numel(), enc_sum, enc_count)


def _encoder_sum(model: DiffusionGemma, he: torch.Tensor, batch: Batch, cfg: ObjectiveConfig):
    valid = encoder_targets(batch, cfg)
    # Only the counted positions go through the LM head: padding never costs a [*, vocab] row.
    enc_logits = model.logits(he[:, :-1][valid])
    return F.cross_entropy(enc_logits, batch.input_ids[:, 1:][valid], reduction="sum"), int(valid.sum())


def loss(model: DiffusionGemma, batch: Batch, cfg: ObjectiveConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Convenience: the batch-mean objective and its parts, for use outside the trainer."""
    p = loss_parts(model, batch, cfg)
    parts = {"decoder_loss": p.decoder_sum / max(p.decoder_count, 1),
             "encoder_loss": p.encoder_sum / max(p.encoder_count, 1)}
    weights = {"decoder_loss": cfg.decoder_loss_weight, "encoder_loss": cfg.encoder_loss_weight}
    return p.total(cfg), {k: float(v) for k, v in parts.items() if weights[k] > 0}
