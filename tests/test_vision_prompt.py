"""Images inside a prompt, against transformers 5.23: the encoder KV of a prompt with two images (soft tokens at the
image-token rows, bidirectional attention within each image), the decoder logits that read it, and whole
generations with the same replayed random draws. Also the prefill chunking around images."""

import pytest
import torch
from helpers import hf_replay
from vision_helpers import BOI, EOI, IMAGE, hf_processor, make_hf_vlm, picture

from dgemma import checkpoint
from dgemma import image_processing as ip
from dgemma.engine import Engine, EngineConfig
from dgemma.kv_cache import DecodeSegment, EncodeSegment, KVCache
from dgemma.sampler import PerRequestDraws
from dgemma.sampling_params import SamplingParams
from dgemma.vision_prompt import PromptImages, attach, chunk_end

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_gen  # noqa: E402

C = 8
PROC = ip.ImageProcessorConfig(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70)
CONFIGS = {  # sliding windows far shorter than an image: the image block must reach past the window
    "window8": dict(use_bidirectional_attention="vision"),
    "window5-full-first": dict(sliding_window=5, use_bidirectional_attention="vision",
                               layer_types=["full_attention", "sliding_attention", "sliding_attention",
                                            "full_attention"]),
    "causal-images": dict(use_bidirectional_attention=None),  # transformers' default: images attend causally
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = make_hf_vlm(canvas_length=C, seed=3, sc_gain=0.1, **CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, checkpoint.load(path).model


def two_image_prompt(seed=0):
    """Text, an image, text, a second image, text: token ids with one placeholder per image, then expanded."""
    images = [picture(24, 60, seed=seed), picture(40, 30, seed=seed + 1)]
    processed = [ip.preprocess(im, PROC) for im in images]
    ids = [2, 17, 33, IMAGE, 9, 41, 60, 7, IMAGE, 11, 12, 13]
    ids = ip.expand_image_tokens(ids, [p.num_soft_tokens for p in processed], IMAGE, BOI, EOI)
    return ids, images, processed


def hf_inputs(images, ids):
    ref = hf_processor()(images, return_tensors="pt")
    ids_t = torch.tensor([ids])
    return ids_t, ref["pixel_values"], ref["image_position_ids"], (ids_t == IMAGE).long()


def hf_prefill(hf, ids, images):
    ids_t, pv, pos, mm = hf_inputs(images, ids)
    cache = DynamicCache(config=hf.config.text_config)
    enc = hf.model.encoder
    mask = enc.create_masks_for_generate(config=hf.config, inputs_embeds=torch.empty(1, len(ids), 0),
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.bool),
                                         past_key_values=cache, position_ids=torch.arange(len(ids))[None],
                                         mm_token_type_ids=mm)
    enc(input_ids=ids_t, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=mm, attention_mask=mask,
        past_key_values=cache, position_ids=torch.arange(len(ids))[None], use_cache=True)
    return cache


def our_prefill(model, ids, processed, chunk=None):
    kv = KVCache(model.text, num_slots=2, capacity=len(ids) + 2 * C)
    images = PromptImages.build(ids, processed, IMAGE)
    start = 0
    while start < len(ids):
        end = chunk_end(images, start, chunk or len(ids), len(ids))
        seg = EncodeSegment(kv, torch.tensor([ids[start:end]]), slots=[1])
        attach(seg, model, [(images, start)])
        model([seg])
        seg.finish()
        start = end
    return kv


@torch.no_grad()
def test_two_image_prompt_encoder_kv_matches(pair):
    hf, model = pair
    ids, images, processed = two_image_prompt()
    assert sum(t == IMAGE for t in ids) == sum(p.num_soft_tokens for p in processed) > 2 * hf.config.text_config.sliding_window
    ref = hf_prefill(hf, ids, images)
    kv = our_prefill(model, ids, processed)
    for layer in range(model.text.num_hidden_layers):
        rk, rv = ref.layers[layer].keys[0].transpose(0, 1), ref.layers[layer].values[0].transpose(0, 1)
        n = rk.shape[0]
        assert rel_err(kv.slot_kv(layer, 1)[0][:n], rk) <= 1e-5, layer
        assert rel_err(kv.slot_kv(layer, 1)[1][:n], rv) <= 1e-5, layer


@torch.no_grad()
def test_images_change_the_cache_and_blocks_matter(pair):
    """Guards against a test that passes vacuously: without the soft tokens, or without the bidirectional
    blocks, the cache differs from the oracle's."""
    hf, model = pair
    ids, images, processed = two_image_prompt()
    ref = hf_prefill(hf, ids, images)
    last = model.text.num_hidden_layers - 1
    rk = ref.layers[last].keys[0].transpose(0, 1)
    n = rk.shape[0]
    kv = KVCache(model.text, num_slots=1, capacity=len(ids))
    seg = EncodeSegment(kv, torch.tensor([ids]), slots=[0])
    attach(seg, model, [(PromptImages.build(ids, processed, IMAGE), 0)])
    assert (seg.image_blocks is not None) == model.vision.cfg.bidirectional_images
    seg.image_blocks = None  # soft tokens in place, but causal attention only
    model([seg])
    assert (rel_err(kv.slot_kv(last, 0)[0][:n], rk) > 1e-3) == model.vision.cfg.bidirectional_images
    kv = KVCache(model.text, num_slots=1, capacity=len(ids))
    model([EncodeSegment(kv, torch.tensor([ids]), slots=[0])])  # no images at all
    assert rel_err(kv.slot_kv(last, 0)[0][:n], rk) > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("chunk", [10, 40])
def test_chunked_prefill_never_cuts_an_image(pair, chunk):
    hf, model = pair
    ids, images, processed = two_image_prompt(seed=4)
    pi = PromptImages.build(ids, processed, IMAGE)
    start, ends = 0, []
    while start < len(ids):
        start = chunk_end(pi, start, chunk, len(ids))
        ends.append(start)
    for e in ends[:-1]:  # no image spans a chunk boundary
        assert not (int(pi.blocks[e - 1]) >= 0 and int(pi.blocks[e - 1]) == int(pi.blocks[e]))
    ref = hf_prefill(hf, ids, images)
    kv = our_prefill(model, ids, processed, chunk=chunk)
    for layer in range(model.text.num_hidden_layers):
        rk = ref.layers[layer].keys[0].transpose(0, 1)
        assert rel_err(kv.slot_kv(layer, 1)[0][:rk.shape[0]], rk) <= 1e-5, layer


@torch.no_grad()
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_decoder_logits_after_an_image_prompt_match(pair, self_conditioning):
    hf, model = pair
    ids, images, processed = two_image_prompt(seed=2)
    g = torch.Generator().manual_seed(5)
    v = model.text.vocab_size
    canvas = torch.randint(0, v, (1, C), generator=g)
    sc_logits = torch.randn(1, C, v, generator=g) * 3 if self_conditioning else None
    cache = hf_prefill(hf, ids, images)
    ref = hf(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=sc_logits).logits
    kv = our_prefill(model, ids, processed)
    sc = model.soft_embed(sc_logits) if self_conditioning else None
    got = model.logits(model([DecodeSegment(kv, canvas, slots=[1], sc_embeds=sc)])[0])
    assert rel_err(got, ref) <= 1e-4


def oracle_draws(seeds, invariant: bool):
    """The draws to replay into transformers: the exact engine's per-request streams, or the fast engine's
    counter-based ones (dgemma.draws.CounterStream)."""
    from dgemma.draws import CounterStream

    return PerRequestDraws.from_seeds(seeds) if invariant else CounterStream(seeds)


KNOBS = dict(max_denoising_steps=10, t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.05)


@pytest.mark.parametrize("invariant", [True, False], ids=["exact", "fast"])
def test_generation_with_two_images_equals_transformers(monkeypatch, pair, invariant):
    hf, model = pair
    ids, images, processed = two_image_prompt(seed=6)
    engine = Engine(model, eos_token_ids=[95], config=EngineConfig(max_num_seqs=3, max_model_len=512,
                                                                   prefill_chunk=50, batch_invariant=invariant))
    text_only = engine.add_request([5, 17, 33, 2, 9], SamplingParams(max_new_tokens=2 * C, seed=1, **KNOBS))
    rid = engine.add_request(ids, SamplingParams(max_new_tokens=3 * C, seed=11, entropy_bound=0.1, **KNOBS),
                             images=PromptImages.build(ids, processed, IMAGE))
    done = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.kind == "finished":
                done[ev.request_id] = ev.output
    ours = done[rid]
    assert text_only in done
    ids_t, pv, pos, mm = hf_inputs(images, ids)
    with hf_replay(monkeypatch, oracle_draws([11], invariant), 1, C):
        out = hf.generate(ids_t, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=mm,
                          max_new_tokens=3 * C, eos_token_id=95, pad_token_id=0,
                          sampler_config=hf_gen.EntropyBoundSamplerConfig(entropy_bound=0.1), **KNOBS)
    row = out.sequences[0, len(ids):].tolist()
    assert ours.token_ids == row[:len(ours.token_ids)]
    assert len(ours.token_ids) == 3 * C or ours.token_ids[-1] == 95
    # and the images mattered: the same prompt without pixels generates something else
    plain = Engine(model, eos_token_ids=[95], config=EngineConfig(max_num_seqs=1, max_model_len=512))
    blind = plain.run([(ids, SamplingParams(max_new_tokens=3 * C, seed=11, entropy_bound=0.1, **KNOBS))])[0]
    assert blind.token_ids != ours.token_ids


def test_text_only_model_refuses_images(tmp_path):
    from helpers import make_tiny_checkpoint

    model = checkpoint.load(make_tiny_checkpoint(tmp_path)).model
    ids, _, processed = two_image_prompt()
    engine = Engine(model, config=EngineConfig(max_num_seqs=1, max_model_len=512))
    with pytest.raises(ValueError, match="no vision tower"):
        engine.add_request([t % 50 for t in ids], images=PromptImages.build(ids, processed, IMAGE))


def test_prompt_and_images_must_agree():
    ids, _, processed = two_image_prompt()
    with pytest.raises(ValueError, match="do not match"):
        PromptImages.build(ids, processed[:1], IMAGE)
    with pytest.raises(ValueError, match="placeholder"):
        ip.expand_image_tokens([1, IMAGE, 2], [3, 4], IMAGE, BOI, EOI)


def test_images_built_for_another_prompt_are_refused(pair):
    _, model = pair
    ids, _, processed = two_image_prompt()
    images = PromptImages.build(ids, processed, IMAGE)
    engine = Engine(model, config=EngineConfig(max_num_seqs=1, max_model_len=512))
    with pytest.raises(ValueError, match="another prompt"):
        engine.add_request(ids[:-3], images=images)
    with pytest.raises(ValueError, match="must sit on image tokens"):
        engine.add_request([5 if t == IMAGE else t for t in ids], images=images)
