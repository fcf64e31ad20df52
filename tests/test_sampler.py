"""Tests for dgemma.sampler and dgemma.sampling_params, including bit-exact parity with HF transformers 5.23.

The parity tests drive HF's real `DiffusionGemmaForBlockDiffusion.generate` on a tiny random model whose decoder
forward is replaced by `FakeDecoder` (a deterministic function of row, canvas and self-conditioning signal), and
make HF consume dgemma's random draws by swapping `torch.randint` / `torch.multinomial` in HF's generation module
only (`hf_replay`). A simple loop over `dgemma.sampler.step` plays the engine. Both sides must produce the same
canvases, accepted masks, argmax drafts, stop steps and committed sequences, exactly.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dgemma.sampler import (
    DEFAULT_CHUNK_ELEMS,
    PerRequestDraws,
    RowParams,
    accept_by_entropy,
    entropy,
    inverse_cdf_sample,
    mask_top_k_top_p,
    self_conditioning_embeddings,
    slab_positions,
    start_canvas,
    step,
    temperature,
)
from dgemma.sampling_params import RELEASED_DEFAULTS, DenoiseSettings, SamplingParams

hf_gen = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")
from helpers import hf_replay  # noqa: E402

V, C, HIDDEN, PROMPT_LEN = 97, 16, 16, 3


# MARK: fixtures and helpers


@pytest.fixture(scope="module")
def hf_model():
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    text = dict(
        vocab_size=V, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, global_head_dim=8, num_global_key_value_heads=1, sliding_window=16,
        layer_types=["full_attention"], num_experts=2, top_k_experts=1, moe_intermediate_size=8,
        max_position_embeddings=512,
    )  # fmt: skip
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=None, canvas_length=C)
    return DiffusionGemmaForBlockDiffusion(cfg).eval()


def settings(**kw) -> DenoiseSettings:
    base = dict(max_new_tokens=C, max_denoising_steps=12, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                stability_threshold=1, confidence_threshold=0.005)  # fmt: skip
    return DenoiseSettings(**{**base, **kw})


class FakeDecoder:
    """Soft-capped logits per (row, canvas index) that sharpen as the canvas and the self-conditioning signal agree
    with a hidden target, so rows converge at different steps. Row-wise: batch mates never influence a row."""

    def __init__(self, rows: int, canvases: int, seed: int, emb_dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(canvases, rows, C, V, generator=g) * 1.5
        self.target = torch.randint(2, V, (canvases, rows, C), generator=g)
        self.embedding = torch.randn(V, HIDDEN, generator=g).to(emb_dtype)
        self.scale = HIDDEN**0.5

    def __call__(self, rows: torch.Tensor, canvas_idx: int, canvas: torch.Tensor, sc_embeds) -> torch.Tensor:
        tgt = self.target[canvas_idx, rows]
        agree = (canvas == tgt).float().mean(-1, keepdim=True)
        sc_term = 0.0
        if sc_embeds is not None:
            w = self.embedding[tgt].float()
            sc_term = (sc_embeds.float() * w).sum(-1) / (w * w).sum(-1) / self.scale
        strength = 3.0 + 10.0 * agree + 6.0 * sc_term
        logits = self.base[canvas_idx, rows] + strength[..., None] * F.one_hot(tgt, V) + 0.7 * F.one_hot(canvas, V)
        return 30.0 * torch.tanh(logits / 30.0)


def run_hf(monkeypatch, model, fake: FakeDecoder, seeds, s: DenoiseSettings, canvases: int, processors=None):
    rows = len(seeds)
    draws = PerRequestDraws.from_seeds(seeds)
    emb, scale = fake.embedding, fake.scale
    with hf_replay(monkeypatch, draws, rows, C) as rec:

        def forward(decoder_input_ids, self_conditioning_logits=None, decoder_position_ids=None, **kw):
            canvas_idx = int(decoder_position_ids[0, 0] - PROMPT_LEN) // C
            sc = None
            if self_conditioning_logits is not None:
                # HF DiffusionGemmaDecoderModel.forward, verbatim arithmetic (see test_sc_signal_matches_hf_decoder)
                probs = self_conditioning_logits.softmax(dim=-1, dtype=torch.float32).to(emb.dtype)
                sc = torch.matmul(probs, emb) * torch.tensor(scale).to(emb.dtype)
            rec.canvases[-1].inputs.append(decoder_input_ids.clone())
            return SimpleNamespace(logits=fake(torch.arange(rows), canvas_idx, decoder_input_ids, sc))

        class Streamer:
            def put(self, value):
                pass

            def put_draft(self, value):
                rec.canvases[-1].drafts.append(value.clone())

            def end(self):
                pass

        model.forward = forward  # generate() calls self.forward for the decoder; the real encoder still runs
        try:
            out = model.generate(
                torch.arange(5, 5 + PROMPT_LEN).repeat(rows, 1), streamer=Streamer(), logits_processor=processors,
                max_new_tokens=canvases * C, max_denoising_steps=s.max_denoising_steps, t_min=s.t_min, t_max=s.t_max,
                sampler_config=hf_gen.EntropyBoundSamplerConfig(entropy_bound=float(s.entropy_bound)),
                stability_threshold=s.stability_threshold, confidence_threshold=float(s.confidence_threshold),
            )  # fmt: skip
        finally:
            del model.forward
    return out.sequences[:, PROMPT_LEN:], rec


def run_dgemma(fake: FakeDecoder, seeds, per_row: list[DenoiseSettings], canvases: int, chunk_elems=1 << 20):
    """A minimal engine: live rows only, finished rows frozen (dropped), argmax committed. Returns commits [B, K*C]
    and, per canvas and row, the list of per-step records."""
    rows = len(seeds)
    draws = PerRequestDraws.from_seeds(seeds)
    params = RowParams.from_settings(per_row)
    commits, trace = [], []
    for k in range(canvases):
        canvas, prev, run = start_canvas(draws, C, V)
        sc = torch.zeros(rows, C, HIDDEN, dtype=fake.embedding.dtype)
        n = params.max_steps.clone()
        steps = [[] for _ in range(rows)]
        live = torch.arange(rows)
        first = True
        while live.numel():
            logits = fake(live, k, canvas[live], None if first else sc[live])
            res = step(logits, n[live], params.select(live), prev[live], run[live], draws.select(live.tolist()),
                       embedding=fake.embedding, embed_scale=fake.scale, chunk_elems=chunk_elems)  # fmt: skip
            for i, r in enumerate(live.tolist()):
                rec = SimpleNamespace(input=canvas[r].clone(), argmax=res.argmax[i], accepted=res.accepted[i],
                                      converged=bool(res.converged[i]))  # fmt: skip
                steps[r].append(rec)
            canvas[live], prev[live], run[live], sc[live] = res.canvas, res.argmax, res.stable_run, res.sc_embeds
            n[live] -= 1
            live = live[~res.done]
            first = False
        commits.append(prev.clone())
        trace.append(steps)
    return torch.cat(commits, dim=-1), trace


def assert_same_trajectory(hf_seq, rec, ours, trace):
    assert torch.equal(hf_seq, ours)
    assert len(rec.canvases) == len(trace)
    for hf_c, steps in zip(rec.canvases, trace):
        assert len(hf_c.inputs) == max(len(s) for s in steps)
        for b, row_steps in enumerate(steps):
            for t, st in enumerate(row_steps):
                assert torch.equal(hf_c.inputs[t][b], st.input), (b, t)
                assert torch.equal(hf_c.accepted[t][b], st.accepted), (b, t)
                assert torch.equal(hf_c.drafts[t][b], st.argmax), (b, t)
                assert bool(hf_c.stop[t][b]) == st.converged, (b, t)


# MARK: parity with HF generate


@pytest.mark.parametrize(
    "stability, confidence, max_steps, fake_seed",
    [(0, 0.05, 12, 0), (1, 0.05, 12, 1), (2, 0.05, 12, 2), (1, 0.005, 5, 7)],  # the last: a row hits the step cap
)
def test_hf_parity_batch_with_frozen_rows(monkeypatch, hf_model, stability, confidence, max_steps, fake_seed):
    seeds = [11, 22, 33]
    s = settings(stability_threshold=stability, confidence_threshold=confidence, max_denoising_steps=max_steps)
    fake = FakeDecoder(rows=3, canvases=1, seed=fake_seed)
    hf_seq, rec = run_hf(monkeypatch, hf_model, fake, seeds, s, canvases=1)
    ours, trace = run_dgemma(fake, seeds, [s] * 3, canvases=1)
    assert_same_trajectory(hf_seq, rec, ours, trace)
    steps = [len(x) for x in trace[0]]
    assert min(steps) >= stability + 1  # stability k needs k + 1 steps (history starts at -1)
    converged = [x[-1].converged for x in trace[0]]
    if max_steps == 12:
        assert all(converged) and min(steps) < max(steps)  # rows froze at different steps
    else:
        assert min(steps) < max(steps) == max_steps and not all(converged)


def test_hf_parity_two_canvases_bf16_self_conditioning(monkeypatch, hf_model):
    model = copy.deepcopy(hf_model).to(torch.bfloat16)  # HF then casts the SC logits to bf16, as in the release
    fake = FakeDecoder(rows=1, canvases=2, seed=5, emb_dtype=torch.bfloat16)
    s = settings(confidence_threshold=0.02)
    hf_seq, rec = run_hf(monkeypatch, model, fake, [7], s, canvases=2)
    ours, trace = run_dgemma(fake, [7], [s], canvases=2)
    assert_same_trajectory(hf_seq, rec, ours, trace)
    # per canvas: one initial randint, then one multinomial + one randint per step
    expected = sum((["randint"] + ["multinomial", "randint"] * len(c[0]) for c in trace), [])
    assert rec.calls == expected


def test_hf_parity_top_k_as_logits_processor(monkeypatch, hf_model):
    from transformers import LogitsProcessorList, TopKLogitsWarper

    fake = FakeDecoder(rows=2, canvases=1, seed=9)
    s = settings(top_k=5, confidence_threshold=0.05)
    procs = LogitsProcessorList([TopKLogitsWarper(5)])  # HF runs user processors before the temperature
    hf_seq, rec = run_hf(monkeypatch, hf_model, fake, [3, 4], s, canvases=1, processors=procs)
    ours, trace = run_dgemma(fake, [3, 4], [s] * 2, canvases=1)
    assert_same_trajectory(hf_seq, rec, ours, trace)


def test_sc_signal_matches_hf_decoder(hf_model):
    """Our compact signal equals what HF's real decoder feeds its self-conditioning block, in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        model = hf_model if dtype == torch.float32 else copy.deepcopy(hf_model).to(dtype)
        z = torch.randn(2, C, V, generator=torch.Generator().manual_seed(1)) * 4
        seen = []
        hook = model.model.decoder.self_conditioning.register_forward_pre_hook(lambda m, a: seen.append(a[1]))
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]] * 2), decoder_input_ids=torch.zeros(2, C, dtype=torch.long),
                  self_conditioning_logits=z.to(dtype))  # fmt: skip
        hook.remove()
        emb = model.model.decoder.embed_tokens
        ours = self_conditioning_embeddings(z, emb.weight, emb.scalar_embed_scale)
        assert ours.dtype == dtype and torch.equal(ours, seen[0])


# MARK: pieces of the step against HF's own classes


def test_temperature_schedule_matches_hf():
    for t_min, t_max, n_max in [(0.4, 0.8, 48), (0.1, 0.7, 13), (0.33, 0.97, 5)]:
        proc = hf_gen.LinearTemperatureScheduleLogitsProcessor(t_min, t_max, n_max)
        n = torch.arange(n_max, 0, -1, dtype=torch.int32)
        ours = temperature(n, torch.full_like(n, n_max), torch.full((n_max,), t_min, dtype=torch.float64),
                           torch.full((n_max,), t_max, dtype=torch.float64))  # fmt: skip
        theirs = torch.stack([proc(None, torch.ones(()), cur_step=k) for k in n]).reciprocal()
        assert torch.equal(torch.ones(()) / ours, torch.ones(()) / theirs)
    t = temperature(torch.tensor([48, 1]), torch.tensor([48, 48]), torch.tensor([0.4] * 2), torch.tensor([0.8] * 2))
    assert t[0].item() == pytest.approx(0.8) and t[1].item() == pytest.approx(0.4 + 0.4 / 48)


def test_entropy_and_acceptance_match_hf():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, C, V, generator=g) * torch.rand(4, C, 1, generator=g) * 12
    z[0, :3, 10:] = float("-inf")  # masked tokens contribute nothing
    h = entropy(z.clone())
    assert torch.equal(h, torch.distributions.Categorical(logits=z).entropy())
    sampler = hf_gen.EntropyBoundSampler(hf_gen.EntropyBoundSamplerConfig(0.1), C, V, 1)
    canvas = torch.zeros(4, C, dtype=torch.long)
    sampler.accept_canvas(canvas, canvas, z, 1)
    assert torch.equal(accept_by_entropy(h, torch.full((4,), 0.1)), sampler.accepted_token_mask)


def test_entropy_bound_acceptance_hand_made():
    h = torch.tensor([[0.5, 0.01, 0.2, 0.05, 0.03], [5.0, 7.0, 9.0, 6.0, 8.0], [0.0625, 0.0625, 0.5, 1.0, 0.0]])
    got = accept_by_entropy(h, torch.tensor([0.1, 0.1, 0.125]))
    # row 0: sorted .01 .03 .05 .2 .5, sums before: 0 .01 .04 .09 .29 -> all but the 0.5 accepted
    assert got[0].tolist() == [False, True, True, True, True]
    # row 1: every entropy is huge, the lowest one is still accepted
    assert got[1].tolist() == [True, False, False, False, False]
    # row 2: sums before 0, 0, .0625, .125 (== bound: accepted, the test is <=), .625
    assert got[2].tolist() == [True, True, True, False, True]


def test_top_k_top_p_match_hf_warpers():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, V, generator=g) * 3
    x[0, 1] = x[0, 2] = x[0].max() + 1  # a tie at the k-th value is kept
    ks, ps = [2, 0, 5, 1, 0, 40], [1.0, 0.9, 0.5, 1.0, 1.0, 0.7]
    got = mask_top_k_top_p(x, torch.tensor(ks), torch.tensor(ps, dtype=torch.float64), max(ks), True)
    for r, (k, p) in enumerate(zip(ks, ps)):
        want = x[r : r + 1]
        if k:
            want = TopKLogitsWarper(k)(None, want)
        if p < 1:
            want = TopPLogitsWarper(p)(None, want)
        assert torch.equal(got[r : r + 1], want), r
    assert torch.isfinite(got[0]).sum() == 2 and torch.isfinite(got[4]).all()


def test_top_k_masks_before_temperature_and_entropy():
    logits = torch.randn(2, C, V, generator=torch.Generator().manual_seed(5)) * 3
    s = [settings(top_k=1, stability_threshold=0), settings(top_k=4, stability_threshold=0)]
    draws = PerRequestDraws.from_seeds([1, 2])
    _, prev, run = start_canvas(draws, C, V)
    res = step(logits, torch.tensor([12, 12]), RowParams.from_settings(s), prev, run, draws)
    # top_k=1: the filtered distribution is one-hot, so entropy is 0, every sample is the argmax and all accepted
    assert res.mean_entropy[0] == 0 and res.accepted[0].all() and torch.equal(res.canvas[0], res.argmax[0])
    assert bool(res.converged[0]) and not bool(res.converged[1])
    # top_k=4: every accepted sample lies in the row's top 4 raw logits
    top4 = logits[1].topk(4, dim=-1).indices
    assert (top4 == res.canvas[1][:, None]).any(-1)[res.accepted[1]].all()
    assert torch.equal(res.argmax, logits.argmax(-1))


# MARK: stop rule


@pytest.mark.parametrize("stability", [0, 1, 2])
def test_stop_rule_matches_hf(stability):
    """Peaked logits whose argmax follows A A B B B; HF's criteria and ours agree at every step."""
    a, b = torch.randint(0, V, (2, 1, C), generator=torch.Generator().manual_seed(6))
    targets = [a, a, b, b, b]
    crit = hf_gen.StableAndConfidentStoppingCriteria(stability, 0.005)
    s = settings(stability_threshold=stability, max_denoising_steps=5)
    params = RowParams.from_settings([s])
    draws = PerRequestDraws.from_seeds([0])
    _, prev, run = start_canvas(draws, C, V)
    ours, theirs = [], []
    for i, tgt in enumerate(targets):
        logits = 25.0 * F.one_hot(tgt, V).float()
        res = step(logits, torch.tensor([5 - i], dtype=torch.int32), params, prev, run, draws)
        prev, run = res.argmax, res.stable_run
        z = logits / temperature(torch.tensor([5 - i]), torch.tensor([5]), params.t_min, params.t_max)
        theirs.append(bool(crit(z.argmax(-1), z)))
        ours.append(bool(res.converged))
    assert ours == theirs
    expected = {0: [True] * 5, 1: [False, True, False, True, True], 2: [False, False, False, False, True]}
    assert ours == expected[stability]
    assert bool(res.done)  # n == 1 always ends the canvas


def test_not_confident_runs_to_the_step_cap():
    logits = torch.zeros(1, C, V)  # uniform: entropy log(V), never confident
    s = settings(stability_threshold=0, max_denoising_steps=3)
    draws = PerRequestDraws.from_seeds([0])
    _, prev, run = start_canvas(draws, C, V)
    done = []
    for n in (3, 2, 1):
        res = step(logits, torch.tensor([n]), RowParams.from_settings([s]), prev, run, draws)
        prev, run = res.argmax, res.stable_run
        assert not bool(res.converged)
        done.append(bool(res.done))
    assert done == [False, False, True]


# MARK: chunking, batching, draws


def _batch(seeds, per_row, logits, chunk_elems, emb):
    draws = PerRequestDraws.from_seeds(seeds)
    _, prev, run = start_canvas(draws, C, V)
    n = torch.tensor([7] * len(seeds), dtype=torch.int32)
    return step(logits, n, RowParams.from_settings(per_row), prev, run, draws, embedding=emb, embed_scale=4.0,
                chunk_elems=chunk_elems)  # fmt: skip


DISCRETE = ("canvas", "argmax", "accepted", "stable_run", "converged", "done", "mean_entropy")


@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked(emb_dtype):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, C, V, generator=g) * 4
    emb = torch.randn(V, HIDDEN, generator=g).to(emb_dtype)
    per_row = [settings(), settings(top_k=7), settings(top_p=0.8, top_k=20)]
    whole = _batch([1, 2, 3], per_row, logits, 1 << 30, emb)
    # 1, 4 and 4 positions per slab (a row split in equal parts), one row, two rows (last slab holds one)
    for chunk in (V, 4 * V, 5 * V, C * V, 2 * C * V):
        part = _batch([1, 2, 3], per_row, logits, chunk, emb)
        for name in DISCRETE:
            assert torch.equal(getattr(whole, name), getattr(part, name)), (chunk, name)
        # the self-conditioning GEMM rounds differently for different slab shapes: equal to the last ulp only
        tol = 1e-6 if emb_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(part.sc_embeds, whole.sc_embeds, rtol=tol, atol=tol)


@pytest.mark.parametrize("emb_dtype", [torch.float32, torch.bfloat16])
def test_cpu_sub_slabs_change_nothing(emb_dtype, monkeypatch):
    """The per-position passes run on cache-sized sub-slabs on the CPU: every result, the self-conditioning
    signal included (its GEMM keeps the slab's shape), is bit-identical to whole-slab passes."""
    import dgemma.sampler as sampler_module

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, C, V, generator=g) * 4
    emb = torch.randn(V, HIDDEN, generator=g).to(emb_dtype)
    # the second row accepts every position, so its canvas is the sample at every position
    per_row = [settings(top_k=5, top_p=0.9), settings(entropy_bound=1e9)]
    monkeypatch.setattr(sampler_module, "CPU_SUB_SLAB_ELEMS", 1 << 40)
    whole = _batch([4, 5], per_row, logits, C * V, emb)
    for positions in (1, 3, 4):  # 3 does not divide the canvas: a short last sub-slab
        monkeypatch.setattr(sampler_module, "CPU_SUB_SLAB_ELEMS", positions * V)
        part = _batch([4, 5], per_row, logits, C * V, emb)
        for name in DISCRETE + ("sc_embeds",):
            assert torch.equal(getattr(whole, name), getattr(part, name)), (positions, name)


def test_cpu_sub_slabs_are_exact_with_threads_and_a_large_vocabulary(monkeypatch):
    """With several threads, a CPU reduction over a large dim with ONE output takes a two-pass path that rounds
    differently; sub-slabs hold at least 2 positions so that every reduction splits as the whole slab's does."""
    import dgemma.sampler as sampler_module

    vocab, c = 262_144, 4
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(2, c, vocab, generator=g) * 4
    emb = torch.randn(vocab, 8, generator=g)
    per_row = [DenoiseSettings(max_new_tokens=c, max_denoising_steps=12, entropy_bound=1e9, t_min=0.4, t_max=0.8,
                               stability_threshold=1, confidence_threshold=0.005)] * 2

    def run(sub_elems):
        monkeypatch.setattr(sampler_module, "CPU_SUB_SLAB_ELEMS", sub_elems)
        draws = PerRequestDraws.from_seeds([1, 2])
        _, prev, runs = start_canvas(draws, c, vocab)
        return step(logits.clone(), torch.tensor([7, 7], dtype=torch.int32), RowParams.from_settings(per_row), prev,
                    runs, draws, embedding=emb, embed_scale=4.0, chunk_elems=c * vocab)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole, part = run(1 << 40), run(1)  # the whole slab; the smallest sub-slab allowed (2 positions)
    finally:
        torch.set_num_threads(threads)
    for name in DISCRETE + ("sc_embeds",):
        assert torch.equal(getattr(whole, name), getattr(part, name)), name


def test_first_argmax_is_torch_argmax():
    from dgemma.sampler import first_argmax

    g = torch.Generator().manual_seed(11)
    z = torch.randn(9, 4096, generator=g)
    z[0, 100] = z[0, 3000] = 50.0  # a tie across blocks: the first wins
    z[1, 70] = z[1, 66] = 50.0  # a tie inside one block
    z[2, 7] = z[2, 3000] = float("nan")  # NaN counts as the maximum, the first one wins
    z[3, 2] = float("inf")
    z[4] = float("-inf")
    z[5] = 0.0  # all equal
    z[6, -1] = 50.0  # the very last index
    assert torch.equal(first_argmax(z), z.argmax(-1))
    odd = torch.randn(3, 97, generator=g)  # not a multiple of the block: plain argmax
    assert torch.equal(first_argmax(odd), odd.argmax(-1))


def test_slab_positions():
    assert slab_positions(256, 262144, DEFAULT_CHUNK_ELEMS) == 256  # the default is one released-size canvas row
    assert slab_positions(16, 97, 3 * 16 * 97 + 5) == 48
    assert slab_positions(16, 97, 5 * 97) == 4 and slab_positions(16, 97, 1) == 1


def test_rows_are_batch_independent():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, C, V, generator=g) * 4
    emb = torch.randn(V, HIDDEN, generator=g)
    per_row = [settings(), settings(top_p=0.9, entropy_bound=0.5), settings(t_min=0.1, t_max=1.0)]
    one_row = C * V  # one row per slab: nothing, not even GEMM rounding, depends on batch mates
    batch = _batch([10, 20, 30], per_row, logits, one_row, emb)
    for r, seed in enumerate([10, 20, 30]):
        alone = _batch([seed], [per_row[r]], logits[r : r + 1].clone(), one_row, emb)
        for name in (*DISCRETE, "sc_embeds"):
            assert torch.equal(getattr(batch, name)[r], getattr(alone, name)[0]), (r, name)
    # a different batch mate seed changes nothing for row 0
    other = _batch([10, 99, 98], per_row, logits, one_row, emb)
    assert torch.equal(other.canvas[0], batch.canvas[0]) and not torch.equal(other.canvas[1], batch.canvas[1])


def test_draw_streams_are_per_request():
    both = PerRequestDraws.from_seeds([1, 2])
    two = PerRequestDraws.from_seeds([2])
    assert torch.equal(both.select([1]).uniforms(C)[0], two.uniforms(C)[0])
    assert torch.equal(both.renoise(C, V)[1], two.renoise(C, V)[0])
    assert both.select([]).renoise(C, V).shape == (0, C)


def test_inverse_cdf_sampling_distribution():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    idx = inverse_cdf_sample(probs, u)
    freq = torch.bincount(idx, minlength=5).float() / 20000
    assert freq[0] == 0 and freq[2] == 0
    assert torch.allclose(freq, probs[0], atol=0.015)
    edge = inverse_cdf_sample(torch.tensor([[0.25, 0.75, 0.0], [0.25, 0.75, 0.0]]), torch.tensor([0.0, 1 - 2**-24]))
    assert edge.tolist() == [0, 1]


# MARK: SamplingParams


def test_sampling_params_resolution_order():
    defaults = SimpleNamespace(max_denoising_steps=32, entropy_bound=None, t_min=0.3)
    got = SamplingParams(t_min=0.2, top_k=-1, stop="###").resolve(defaults)
    assert got.t_min == 0.2 and got.max_denoising_steps == 32 and got.entropy_bound == RELEASED_DEFAULTS.entropy_bound
    assert got.top_k == 0 and got.t_max == 0.8 and got.max_new_tokens == 256
    assert SamplingParams(stop="###").stop == ("###",) and SamplingParams(stop_token_ids=[5]).stop_token_ids == (5,)
    assert SamplingParams().resolve() == RELEASED_DEFAULTS


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=0), dict(max_denoising_steps=True), dict(entropy_bound=0), dict(t_min=-0.1),
        dict(t_min=0.8, t_max=0.8), dict(stability_threshold=-1), dict(confidence_threshold=-1e-3),
        dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-1), dict(stop=[""]),
        dict(stop_token_ids=[-3]), dict(ignore_eos=1),
    ],
)  # fmt: skip
def test_sampling_params_rejects(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def test_resolved_pair_is_checked():
    with pytest.raises(ValueError, match="t_max must be > t_min"):
        SamplingParams(t_min=0.9).resolve()  # the checkpoint's t_max 0.8 is below the request's t_min
