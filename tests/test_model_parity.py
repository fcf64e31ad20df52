"""Parity of the model with the oracle (transformers 5.23 DiffusionGemmaForBlockDiffusion) on tiny random weights.

Checks the encoder's KV for a prefill and for a canvas commit, and decoder logits with and without
self-conditioning, over several configurations (MoE sizes, K=V full layers, sliding windows shorter than the
prompt, canvases of 8 to 64, distinct encoder and decoder layer scalars).
"""

import pytest
import torch
from helpers import make_hf_model

from dgemma import checkpoint
from dgemma.kv_cache import DecodeSegment, EncodeSegment, KVCache

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

CONFIGS = {
    "moe4-window8-canvas8": dict(canvas_length=8),
    "single-expert-canvas16": dict(canvas_length=16, num_experts=1, top_k_experts=1),
    "moe8-window16-canvas64": dict(canvas_length=64, num_experts=8, top_k_experts=3, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                "full_attention"]),
    "gqa-full-heads2-canvas32": dict(canvas_length=32, num_global_key_value_heads=2, global_head_dim=48,
                                     sliding_window=5),
}
PROMPT_LEN = 13


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = make_hf_model(**CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, checkpoint.load(path).model


def hf_kv(cache, layer):
    return cache.layers[layer].keys[0].transpose(0, 1), cache.layers[layer].values[0].transpose(0, 1)


@torch.no_grad()
def test_prefill_and_commit_kv_match(pair):
    hf, model = pair
    g = torch.Generator().manual_seed(1)
    v, c = model.text.vocab_size, model.config.canvas_length
    prompt = torch.randint(0, v, (1, PROMPT_LEN), generator=g)
    canvas = torch.randint(0, v, (1, c), generator=g)
    ref = DynamicCache(config=hf.config.text_config)
    kv = KVCache(model.text, num_slots=3, capacity=PROMPT_LEN + 2 * c)
    for step, ids in (("prefill", prompt), ("commit", canvas)):
        hf.model.encoder(input_ids=ids, past_key_values=ref, use_cache=True)
        seg = EncodeSegment(kv, ids, slots=[2])
        model([seg])
        seg.finish()
        for layer in range(model.text.num_hidden_layers):
            rk, rv = hf_kv(ref, layer)
            n = rk.shape[0]
            assert kv.k[layer].shape[1] >= n
            assert rel_err(kv.k[layer][2, :n], rk) <= 1e-5, (step, layer)
            assert rel_err(kv.v[layer][2, :n], rv) <= 1e-5, (step, layer)
    assert int(kv.lengths[2]) == PROMPT_LEN + c


@torch.no_grad()
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_decoder_logits_match(pair, self_conditioning):
    hf, model = pair
    g = torch.Generator().manual_seed(2)
    v, c = model.text.vocab_size, model.config.canvas_length
    prompt = torch.randint(0, v, (1, PROMPT_LEN), generator=g)
    canvas = torch.randint(0, v, (1, c), generator=g)
    sc_logits = torch.randn(1, c, v, generator=g) * 3 if self_conditioning else None
    ref_cache = DynamicCache(config=hf.config.text_config)
    hf.model.encoder(input_ids=prompt, past_key_values=ref_cache, use_cache=True)
    ref = hf(decoder_input_ids=canvas, past_key_values=ref_cache, self_conditioning_logits=sc_logits).logits
    kv = KVCache(model.text, num_slots=1, capacity=PROMPT_LEN + c)
    seg = EncodeSegment(kv, prompt, slots=[0])
    model([seg])
    seg.finish()
    sc = model.soft_embed(sc_logits) if self_conditioning else None
    (hidden,) = model([DecodeSegment(kv, canvas, slots=[0], sc_embeds=sc)])
    assert rel_err(model.logits(hidden), ref) <= 1e-4


@torch.no_grad()
def test_batched_rows_of_different_lengths_match_single_reference(pair):
    """Three prompts of different lengths prefilled and denoised in shared forwards equal the oracle row by row."""
    hf, model = pair
    g = torch.Generator().manual_seed(3)
    v, c = model.text.vocab_size, model.config.canvas_length
    lengths = [5, PROMPT_LEN, 9]
    prompts = [torch.randint(0, v, (n,), generator=g) for n in lengths]
    canvases = torch.randint(0, v, (3, c), generator=g)
    kv = KVCache(model.text, num_slots=4, capacity=32 + c)
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    slots = [3, 0, 1]
    enc = EncodeSegment(kv, padded, slots=slots, n_new=lengths)
    # An unrelated canvas denoised in the same forward as the prefill must not disturb it.
    kv2 = KVCache(model.text, num_slots=1, capacity=8)
    model([enc, DecodeSegment(kv2, canvases[:1], slots=[0])])
    enc.finish()
    (hidden,) = model([DecodeSegment(kv, canvases, slots=slots)])
    mine = model.logits(hidden)
    for i, p in enumerate(prompts):
        ref_cache = DynamicCache(config=hf.config.text_config)
        hf.model.encoder(input_ids=p[None], past_key_values=ref_cache, use_cache=True)
        ref = hf(decoder_input_ids=canvases[i:i + 1], past_key_values=ref_cache).logits
        assert rel_err(mine[i:i + 1], ref) <= 1e-4, i


def _hf_logits(hf, prompt, canvas):
    cache = DynamicCache(config=hf.config.text_config)
    hf.model.encoder(input_ids=prompt, past_key_values=cache, use_cache=True)
    return hf(decoder_input_ids=canvas, past_key_values=cache).logits


@torch.no_grad()
def test_bf16_logits_within_bf16_noise_of_reference(tmp_path):
    """bf16 cannot match bit for bit; dgemma-bf16 must sit within the oracle's own bf16-vs-fp32 noise."""
    hf = make_hf_model(canvas_length=8)
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 96, (1, 11), generator=g)
    canvas = torch.randint(0, 96, (1, 8), generator=g)
    ref32 = _hf_logits(hf, prompt, canvas)
    hf = hf.to(torch.bfloat16)
    ref16 = _hf_logits(hf, prompt, canvas)
    hf.save_pretrained(tmp_path)
    model = checkpoint.load(tmp_path).model
    assert model.dtype == torch.bfloat16
    kv = KVCache(model.text, 1, 32, dtype=torch.bfloat16)
    seg = EncodeSegment(kv, prompt, [0])
    model([seg])
    seg.finish()
    (hidden,) = model([DecodeSegment(kv, canvas, [0])])
    mine = model.logits(hidden)
    assert rel_err(mine, ref16) <= max(1.5 * rel_err(ref16, ref32), 1e-2)
    assert (mine.argmax(-1) == ref16.argmax(-1)).float().mean() >= 0.9
