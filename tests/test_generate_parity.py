"""End-to-end generation parity: dgemma's engine and transformers' `generate` produce the same tokens.

Both run the same tiny random checkpoint and consume the same random draws (transformers' `randint` /
`multinomial` are served from dgemma's per-request streams, see `helpers.hf_replay`). Covers several canvases, an
EOS inside a canvas, and a batch of prompts of different lengths (left-padded on the transformers side), in both
engine modes: exact (batch-invariant, one torch.Generator per request) and fast (the fixed-shape step: fused
projections, K/V read in place, grouped-GEMM experts, counter-based draws, replayed with `draws.CounterStream`).
"""

import pytest
import torch
from helpers import GEN_CANVAS, GEN_KNOBS, GEN_STEPS, generation_models, hf_replay

from dgemma.draws import CounterStream
from dgemma.engine import Engine, EngineConfig
from dgemma.sampler import PerRequestDraws
from dgemma.sampling_params import SamplingParams

pytest.importorskip("transformers")
from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_gen  # noqa: E402

C, STEPS, KNOBS = GEN_CANVAS, GEN_STEPS, GEN_KNOBS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return generation_models(tmp_path_factory, "gen")


def run_hf(monkeypatch, hf, prompts, seeds, canvases, eos, invariant=True):
    rows, width = len(prompts), max(map(len, prompts))
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as transformers expects for batched generation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    draws = PerRequestDraws.from_seeds(seeds) if invariant else CounterStream(seeds)
    with hf_replay(monkeypatch, draws, rows, C):
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=canvases * C, eos_token_id=eos, pad_token_id=0,
                          sampler_config=hf_gen.EntropyBoundSamplerConfig(entropy_bound=0.1), **KNOBS)
    return out.sequences[:, width:]


@pytest.fixture(params=[True, False], ids=["exact", "fast"])
def invariant(request):
    """Both engine modes: batch-invariant (exact, the CPU default) and fast (grouped-GEMM experts, plain matmuls)."""
    return request.param


# KV layouts every case runs under: small blocks with the prefix cache on and a tight prefill budget (prompts arrive
# in chunks while batch mates denoise), and one block per 64 positions with the prefix cache off.
KV_LAYOUTS = {"blocks4-prefix-budget5": dict(block_size=4, enable_prefix_caching=True, max_num_batched_tokens=5,
                                             prefill_chunk=4),
              "blocks64-no-prefix": dict(block_size=64, enable_prefix_caching=False)}
_kv = {}


@pytest.fixture(autouse=True, params=list(KV_LAYOUTS))
def kv_layout(request):
    _kv.clear()
    _kv.update(KV_LAYOUTS[request.param])
    return request.param


def run_dgemma(model, prompts, seeds, canvases, eos, invariant=True):
    config = EngineConfig(max_num_seqs=4, max_model_len=256, batch_invariant=invariant, **_kv)
    engine = Engine(model, eos_token_ids=[eos], config=config)
    params = [SamplingParams(max_new_tokens=canvases * C, seed=s, entropy_bound=0.1, **KNOBS) for s in seeds]
    return engine.run(list(zip(prompts, params)))


def assert_same(hf_rows, ours, eos):
    for row, out in zip(hf_rows.tolist(), ours):
        assert out.token_ids == row[:len(out.token_ids)]
        rest = row[len(out.token_ids):]
        if out.finish_reason == "stop":
            assert out.token_ids[-1] == eos and all(t == 0 for t in rest)
        else:
            assert out.finish_reason == "length" and not rest


def test_three_canvases_batch_of_one(monkeypatch, models, invariant):
    hf, model = models
    prompt = [[5, 17, 33, 2, 9, 41, 60, 7, 11, 12, 13]]
    ours = run_dgemma(model, prompt, [11], canvases=3, eos=95, invariant=invariant)
    assert_same(run_hf(monkeypatch, hf, prompt, [11], 3, eos=95, invariant=invariant), ours, 95)
    assert ours[0].steps_per_canvas and max(ours[0].steps_per_canvas) <= STEPS


def test_eos_inside_a_canvas_ends_the_request(monkeypatch, models, invariant):
    hf, model = models
    prompt = [[5, 17, 33, 2, 9, 41]]
    free = run_dgemma(model, prompt, [3], canvases=3, eos=95, invariant=invariant)[0]
    # A token of the second canvas that has not occurred before becomes the EOS: the request must end there.
    pos = next(i for i in range(C + 1, 2 * C) if free.token_ids[i] not in free.token_ids[:i])
    eos = free.token_ids[pos]
    ours = run_dgemma(model, prompt, [3], canvases=3, eos=eos, invariant=invariant)
    assert ours[0].finish_reason == "stop" and len(ours[0].token_ids) == pos + 1
    assert_same(run_hf(monkeypatch, hf, prompt, [3], 3, eos=eos, invariant=invariant), ours, eos)


def test_batch_of_different_prompt_lengths(monkeypatch, models, invariant):
    hf, model = models
    prompts = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41, 42, 43, 44, 45]]
    seeds = [1, 2, 3]
    ours = run_dgemma(model, prompts, seeds, canvases=2, eos=95, invariant=invariant)
    assert_same(run_hf(monkeypatch, hf, prompts, seeds, 2, eos=95, invariant=invariant), ours, 95)
    alone = run_dgemma(model, prompts[1:2], seeds[1:2], canvases=2, eos=95, invariant=invariant)[0]
    assert alone.token_ids == ours[1].token_ids  # batch mates change nothing
