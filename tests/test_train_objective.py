"""The training objective: canvas layout, noise statistics, the two-pass self-conditioning loss, and the tie to
inference (the decoder's view of the encoder K/V in training equals what dgemma.kv_cache gives at generation)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_text_config

from dgemma.config import ModelConfig
from dgemma.kv_cache import DecodeSegment, EncodeSegment, KVCache
from dgemma.model import DiffusionGemma
from dgemma.train.data import collate, layout
from dgemma.train.objective import ObjectiveConfig, draw, encoder_targets, loss_parts, run

EOS, PAD = 1, 0


def tiny_model(canvas_length=8, seed=0, **text) -> DiffusionGemma:
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas_length,
                                 "text_config": tiny_text_config(**text)})
    model = DiffusionGemma(cfg)
    g = torch.Generator().manual_seed(seed)
    model.init_weights(std=0.15, generator=g)
    with torch.no_grad():  # norms and scalars away from 1, so a dropped or misplaced one shows
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for i, layer in enumerate(model.layers):
            layer.layer_scalar.fill_(1.1 + 0.05 * i)
            layer.encoder_layer_scalar.fill_(0.9 - 0.1 * i)
    return model.eval()


def random_examples(n, vocab=96, seed=0, max_prompt=14, max_response=30):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(0, max_prompt + 1, (), generator=g))
        r = int(torch.randint(1, max_response + 1, (), generator=g))
        out.append((torch.randint(3, vocab, (p,), generator=g).tolist(),
                    torch.randint(3, vocab, (r,), generator=g).tolist()))
    return out


def test_layout_chunks_response_into_canvases_filled_with_eos():
    assert layout([5, 6, 7], [8, 9, 10, 11, 12], 4, EOS) == [5, 6, 7, 8, 9, 10, 11, 12, EOS, EOS, EOS]
    # a response that fills its canvases exactly still ends with an EOS: a whole canvas of them
    assert layout([5], [8, 9, 10, 11], 4, EOS) == [5, 8, 9, 10, 11, EOS, EOS, EOS, EOS]
    assert layout([5], [8, 9, 10, 11], 4, EOS, require_eos=False) == [5, 8, 9, 10, 11]
    assert layout([], [8, 9, 10, EOS], 4, EOS, require_eos=False) == [8, 9, 10, EOS]
    assert layout([5], [], 4, EOS, require_eos=False) == [5, EOS, EOS, EOS, EOS]


def test_collate_pads_to_longest_and_counts_canvases():
    ex = [([5, 6, 7], [8, 9]), ([5], [8, 9, 10, 11, 12, 13, 14, 15, 16])]
    b = collate(ex, [10, 11], canvas_length=4, eos_id=EOS, pad_id=PAD)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, EOS, EOS, PAD, PAD, PAD, PAD, PAD, PAD],
                                    [5, 8, 9, 10, 11, 12, 13, 14, 15, 16, EOS, EOS, EOS]]
    assert b.lengths.tolist() == [7, 13] and b.prompt_lens.tolist() == [3, 1]
    assert b.n_canvases.tolist() == [1, 3] and b.indices.tolist() == [10, 11]
    with pytest.raises(ValueError, match="outside"):
        collate([([5], [99])], [0], 4, EOS, vocab_size=96)


def test_noise_rate_canvas_choice_and_determinism():
    c, v = 64, 96
    ex = random_examples(600, max_response=3 * c)
    cfg = ObjectiveConfig(canvas_length=c, vocab_size=v, seed=3)
    b = collate(ex, list(range(600)), c, EOS)
    d = draw(b, cfg)
    assert ((d.t >= cfg.eps) & (d.t < 1)).all() and abs(d.t.mean().item() - 0.5) < 0.05
    # each position corrupted independently with probability t: per-example fraction tracks t
    frac = d.corrupted.float().mean(1)
    assert (frac - d.t).abs().mean() < 0.06
    assert torch.corrcoef(torch.stack([frac, d.t]))[0, 1] > 0.97
    # corrupted tokens are uniform over the vocabulary; uncorrupted ones are the clean canvas
    assert torch.equal(d.noisy[~d.corrupted], d.clean[~d.corrupted])
    assert d.noisy[d.corrupted].unique().numel() == v
    assert abs((d.noisy[d.corrupted] != d.clean[d.corrupted]).float().mean().item() - (1 - 1 / v)) < 0.02
    # the selected canvas is a canvas of the response, chosen uniformly among the example's canvases
    assert ((d.canvas_index >= 0) & (d.canvas_index < b.n_canvases)).all()
    for i in range(len(ex)):
        p = int(d.prefix_lens[i])
        assert torch.equal(d.clean[i], b.input_ids[i, p:p + c])
    three = b.n_canvases == 3
    counts = torch.bincount(d.canvas_index[three], minlength=3).float()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.1
    assert abs(d.use_sc.float().mean().item() - 0.5) < 0.06
    # keyed on the global example index: the same example draws the same noise in any batch split
    d2 = draw(collate(ex[100:110], list(range(100, 110)), c, EOS), cfg)
    assert torch.equal(d2.noisy, d.noisy[100:110]) and torch.equal(d2.t, d.t[100:110])


def inference_logits(model, prefix, canvas, sc_embeds=None):
    cache = KVCache(model.text, num_slots=1, capacity=prefix.numel() + canvas.numel() + 1)
    if prefix.numel():
        enc = EncodeSegment(cache, prefix[None], slots=[0])
        model([enc])
        enc.finish()
    (h,) = model([DecodeSegment(cache, canvas[None], slots=[0], sc_embeds=sc_embeds)])
    return model.logits(h)[0]


@torch.no_grad()
@pytest.mark.parametrize("text", [{}, {"sliding_window": 5, "num_experts": 1, "top_k_experts": 1}])
def test_training_decoder_equals_inference_path(text):
    """Decoder logits of the training forward (one pass, encoder K/V recorded over the whole clean sequence) equal
    generation's: prefix encoded into the KV cache, then the canvas decoded against it (sliding windows shorter
    than the prefix, padded rows, later canvases, self-conditioning on)."""
    model = tiny_model(canvas_length=8, **text)
    c = 8
    ex = random_examples(5, seed=1, max_prompt=14, max_response=30)
    b = collate(ex, list(range(5)), c, EOS)
    g = torch.Generator().manual_seed(5)
    k = torch.stack([torch.randint(int(n), (), generator=g) for n in b.n_canvases])
    prefix = b.prompt_lens + k * c
    canvas = torch.randint(0, 96, (5, c), generator=g)
    sc = torch.randn(5, c, 64, generator=g)
    _, hd = run(model, b.input_ids, b.lengths, canvas, prefix, sc)
    train_logits = model.logits(hd)
    assert int(prefix.max()) > model.text.sliding_window
    for i in range(5):
        ref = inference_logits(model, b.input_ids[i, :int(prefix[i])], canvas[i], sc[i:i + 1])
        torch.testing.assert_close(train_logits[i], ref, rtol=1e-4, atol=1e-4)


def test_loss_is_flat_canvas_mean_plus_encoder_next_token():
    model = tiny_model()
    ex = random_examples(4, seed=2)
    b = collate(ex, [7, 8, 9, 10], 8, EOS)
    cfg = ObjectiveConfig(canvas_length=8, vocab_size=96, self_cond_prob=0.0, decoder_loss_weight=0.7,
                          encoder_loss_weight=0.3)
    d = draw(b, cfg)
    parts = loss_parts(model, b, cfg, d)
    he, hd = run(model, b.input_ids, b.lengths, d.noisy, d.prefix_lens)
    dec = F.cross_entropy(model.logits(hd).flatten(0, 1), d.clean.flatten())  # every position, corrupted or not
    enc_terms = [F.cross_entropy(model.logits(he[i, :int(n) - 1]), b.input_ids[i, 1:int(n)], reduction="sum")
                 for i, n in enumerate(b.lengths)]
    enc = sum(enc_terms) / int((b.lengths - 1).sum())
    torch.testing.assert_close(parts.total(cfg), 0.7 * dec + 0.3 * enc)
    assert parts.decoder_count == 32 and parts.encoder_count == int((b.lengths - 1).sum())
    resp_only = ObjectiveConfig(canvas_length=8, vocab_size=96, encoder_loss_on_prompt=False)
    assert int(encoder_targets(b, resp_only).sum()) == int((b.lengths - b.prompt_lens).sum())


def test_self_conditioning_two_pass():
    model = tiny_model()
    ex = random_examples(4, seed=3)
    b = collate(ex, [0, 1, 2, 3], 8, EOS)
    cfg = ObjectiveConfig(canvas_length=8, vocab_size=96, self_cond_prob=0.5, seed=1)
    d = draw(b, cfg)
    d.use_sc = torch.tensor([True, False, True, False])
    parts = loss_parts(model, b, cfg, d)
    # by hand: pass 1 with a zero signal, its soft embedding fed to pass 2 on the chosen rows only
    with torch.no_grad():
        _, h1 = run(model, b.input_ids, b.lengths, d.noisy, d.prefix_lens)
        soft = model.soft_embed(model.logits(h1))
    sc = soft * d.use_sc[:, None, None]
    _, hd = run(model, b.input_ids, b.lengths, d.noisy, d.prefix_lens, sc)
    expect = F.cross_entropy(model.logits(hd).flatten(0, 1), d.clean.flatten(), reduction="sum")
    torch.testing.assert_close(parts.decoder_sum, expect)
    _, h0 = run(model, b.input_ids, b.lengths, d.noisy, d.prefix_lens)
    assert not torch.allclose(model.logits(hd)[0], model.logits(h0)[0])  # the signal matters where on
    torch.testing.assert_close(model.logits(hd)[1], model.logits(h0)[1])  # and a zero signal is exactly off
    # gradients flow through pass 2 into the self-conditioning MLP
    parts.total(cfg).backward()
    assert model.self_conditioning.gate_proj.weight.grad.abs().sum() > 0


def test_a_part_with_weight_zero_is_skipped_and_the_other_is_unchanged():
    model = tiny_model()
    ex = random_examples(4, seed=4)
    b = collate(ex, [3, 4, 5, 6], 8, EOS)
    both = ObjectiveConfig(canvas_length=8, vocab_size=96, self_cond_prob=0.5, seed=2)
    d = draw(b, both)
    full = loss_parts(model, b, both, d)
    dec_only = loss_parts(model, b, ObjectiveConfig(canvas_length=8, vocab_size=96, self_cond_prob=0.5, seed=2,
                                                    encoder_loss_weight=0.0), d)
    # the encoder ran over the prefix only: the decoder saw the same K/V, so its loss is the same
    torch.testing.assert_close(dec_only.decoder_sum, full.decoder_sum, rtol=1e-5, atol=1e-5)
    assert dec_only.encoder_count == 0 and float(dec_only.encoder_sum) == 0.0
    enc_only = loss_parts(model, b, ObjectiveConfig(canvas_length=8, vocab_size=96, decoder_loss_weight=0.0), d)
    torch.testing.assert_close(enc_only.encoder_sum, full.encoder_sum, rtol=1e-5, atol=1e-5)
    assert enc_only.decoder_count == 0 and enc_only.encoder_count == full.encoder_count
    with pytest.raises(ValueError, match="both 0"):
        ObjectiveConfig(canvas_length=8, vocab_size=96, decoder_loss_weight=0.0, encoder_loss_weight=0.0)
