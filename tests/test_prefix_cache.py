"""Paged KV cache with prefix caching and a prefill token budget (docs/kv_cache.md): outputs are identical with the
prefix cache on and off, in both engine modes, for prompts that share a prefix longer than the sliding window and
ending inside a block; blocks are shared, released and evicted; admission waits for blocks, never fails mid-flight."""

import random

import pytest
import torch
from helpers import GEN_CANVAS, GEN_KNOBS, generation_models

from dgemma.engine import Engine, EngineConfig, PromptTooLongError
from dgemma.sampling_params import SamplingParams

C = GEN_CANVAS  # 8; the model: window 8, two sliding layers (a cached prefix re-encodes its last 2 x 7 tokens)
BS = 4
PREFIX = [(7 * i + 3) % 90 + 2 for i in range(30)]  # 30 tokens: 7 full blocks (28) and 2 tokens into the 8th


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return generation_models(tmp_path_factory, "prefix")[1]


@pytest.fixture(params=[True, False], ids=["exact", "fast"])
def invariant(request):
    return request.param


def engine(model, invariant, caching=True, **kw):
    cfg = dict(max_num_seqs=4, max_model_len=128, block_size=BS, enable_prefix_caching=caching,
               batch_invariant=invariant)
    cfg.update(kw)
    return Engine(model, eos_token_ids=[95], config=EngineConfig(**cfg))


def params(seed, canvases=2):
    return SamplingParams(max_new_tokens=canvases * C, seed=seed, entropy_bound=0.1, ignore_eos=True, **GEN_KNOBS)


def run_one(eng, prompt, seed):
    return eng.run([(prompt, params(seed))])[0].token_ids


TAILS = [[50, 51, 52], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69], [70]]


def test_shared_prefix_outputs_identical_to_no_cache(model, invariant):
    ref = [run_one(engine(model, invariant, caching=False), PREFIX + t, 10 + i) for i, t in enumerate(TAILS)]
    eng = engine(model, invariant)
    got = [run_one(eng, PREFIX + t, 10 + i) for i, t in enumerate(TAILS)]  # one after another: 2nd, 3rd hit
    assert got == ref
    st = eng.stats
    assert st["prefix_cache_hits"] == 2 * 28  # the 7 full prefix blocks, for the 2nd and 3rd request
    assert st["prefix_cache_queries"] == sum(len(PREFIX) + len(t) for t in TAILS)
    # re-encoded: the 14 tokens before the cached end rebuild the sliding layers; the first 14 are skipped
    assert st["prefill_tokens"] == sum(len(PREFIX) + len(t) for t in TAILS) - 2 * (28 - 14)
    assert eng.pool.num_used == 0 and eng.pool.reserved == 0  # everything released
    eng.pool.check()


def test_shared_prefix_concurrent_batch_mates(model, invariant):
    """A request admitted while its prefix's owner is still running shares the owner's blocks (refcount 2)."""
    ref = [run_one(engine(model, invariant, caching=False), PREFIX + t, 20 + i) for i, t in enumerate(TAILS)]
    eng = engine(model, invariant)
    first = eng.add_request(PREFIX + TAILS[0], params(20))
    done = {}
    while not any(s is not None and s.denoising for s in eng.slots):  # the first request's prefill is done
        eng.step()
    ids = [first] + [eng.add_request(PREFIX + t, params(20 + i)) for i, t in enumerate(TAILS) if i]
    shared = None
    while eng.has_work():
        for ev in eng.step():
            if ev.kind == "finished":
                done[ev.request_id] = ev.output.token_ids
        running = [s for s in eng.slots if s is not None]
        if len(running) == 3 and shared is None:
            shared = running[0].blocks[:7]
            assert all(s.blocks[:7] == shared for s in running)
            assert all(eng.pool.refs[b] == 3 for b in shared)
    assert shared is not None
    assert [done[i] for i in ids] == ref
    eng.pool.check()


def test_whole_prompt_cached_and_short_hits(model):
    """A prompt that is all full blocks and seen before (the hit covers it entirely), and a hit shorter than the
    re-encoded span (nothing skipped): both identical to no cache."""
    prompt = PREFIX[:28]
    short = PREFIX[:9] + [80, 81]
    ref = [run_one(engine(model, True, caching=False), p, s) for p, s in ((prompt, 1), (prompt, 2), (short, 3))]
    eng = engine(model, True)
    eng.run([(PREFIX, params(0))])
    got = [run_one(eng, p, s) for p, s in ((prompt, 1), (prompt, 2), (short, 3))]
    assert got == ref
    assert eng.stats["prefix_cache_hits"] == 28 + 28 + 8


def test_eviction_reuses_least_recently_used_blocks(model):
    """A pool of 20 blocks: after other prompts pass through, the old prefix is evicted, and outputs stay right."""
    eng = engine(model, True, num_kv_blocks=20, max_num_seqs=2)
    rng = random.Random(0)
    others = [[rng.randrange(2, 90) for _ in range(40)] for _ in range(3)]
    a = run_one(eng, PREFIX + TAILS[0], 5)
    for i, p in enumerate(others):
        run_one(eng, p, i)
    assert eng.pool.evictions > 0
    hits = eng.stats["prefix_cache_hits"]
    b = run_one(eng, PREFIX + TAILS[0], 5)
    assert a == b == run_one(engine(model, True, caching=False), PREFIX + TAILS[0], 5)
    assert eng.stats["prefix_cache_hits"] == hits  # the prefix was evicted: a miss, recomputed
    eng.pool.check()


def test_admission_waits_for_blocks_and_budget_chunks_prompts(model):
    """Three requests on a pool for two: the third waits until blocks free up; a tight prefill budget feeds prompts
    in chunks while others denoise; every request finishes as it would alone."""
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 90) for _ in range(n)] for n in (33, 8, 25)]
    alone = [run_one(engine(model, True, caching=False), p, i) for i, p in enumerate(prompts)]
    # at most 11, 4 and 9 blocks (prompt + one canvas, in blocks of 4): 22 blocks hold the first two, not all three
    eng = engine(model, True, num_kv_blocks=22, max_num_batched_tokens=6, prefill_chunk=4)
    ids = [eng.add_request(p, params(i)) for i, p in enumerate(prompts)]
    done, most = {}, 0
    seen_mixed = False
    while eng.has_work():
        prefilling = [s for s in eng.slots if s is not None and s.prefilled < len(s.prompt)]
        denoising = [s for s in eng.slots if s is not None and s.denoising]
        seen_mixed |= bool(prefilling and denoising)
        before = {s.id: s.prefilled for s in prefilling}
        for ev in eng.step():
            if ev.kind == "finished":
                done[ev.request_id] = ev.output.token_ids
        after = {s.id: s.prefilled for s in eng.slots if s is not None and s.id in before}
        assert sum(after[i] - before[i] for i in after) <= 6  # the step's prefill budget
        most = max(most, eng.num_running)
        assert eng.pool.num_used <= 22
        eng.pool.check()
    assert most == 2 and seen_mixed
    assert [done[i] for i in ids] == alone


def test_request_larger_than_the_pool_is_refused(model):
    eng = engine(model, True, num_kv_blocks=5)
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        eng.add_request(list(range(2, 30)), params(0))
    assert not eng.waiting


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(num_kv_blocks=0), dict(max_num_batched_tokens=-1),
                                 dict(kv_backend="paged"), dict(batch_invariant="yes")])
def test_engine_config_rejects_bad_kv_settings(bad):
    with pytest.raises(ValueError, match="EngineConfig"):
        EngineConfig(**bad)


def test_whole_prompt_hit_without_sliding_layers():
    """A model with full layers only re-encodes nothing on a hit: a prompt cached whole must start its canvas at
    admission (it was left denoising a stale canvas)."""
    from helpers import tiny_text_config

    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma

    text = tiny_text_config(num_hidden_layers=2, layer_types=["full_attention"] * 2)
    m = DiffusionGemma(ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": C,
                                              "text_config": text, "eos_token_id": [95]}))
    m.init_weights(generator=torch.Generator().manual_seed(0))
    m.eval()
    prompt = PREFIX[:8]
    ref = [run_one(engine(m, True, caching=False), prompt, s) for s in (1, 2)]
    eng = engine(m, True)
    assert eng.recompute == 0
    assert [run_one(eng, prompt, s) for s in (1, 2)] == ref
    assert eng.stats["prefix_cache_hits"] == 8 and eng.stats["prefill_tokens"] == 8
