"""The fast denoising step (batch invariance off): one host sync per step, fixed shapes within a canvas, a
whole-graph `torch.compile` with no graph break, and the counter-based draws. (Its parity with transformers, in
logits and in generated tokens, is in test_model_parity.py and test_generate_parity.py.)"""

import pytest
import torch
from helpers import GEN_CANVAS, GEN_KNOBS, GEN_STEPS, generation_models

from dgemma.draws import CounterDraws, CounterStream, StepDraws, draw_key, seed_keys
from dgemma.engine import Engine, EngineConfig
from dgemma.sampling_params import SamplingParams

pytest.importorskip("transformers")

C, STEPS, KNOBS = GEN_CANVAS, GEN_STEPS, GEN_KNOBS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return generation_models(tmp_path_factory, "fast")


def engine(model, **kw):
    return Engine(model, eos_token_ids=[95], config=EngineConfig(max_num_seqs=4, max_model_len=256,
                                                                 batch_invariant=False, **kw))


def params(seeds, canvases):
    return [SamplingParams(max_new_tokens=canvases * C, seed=s, entropy_bound=0.1, **KNOBS) for s in seeds]


PROMPTS = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [40, 41, 42, 43, 44, 45]]


def test_one_host_sync_per_denoising_step_and_fixed_shapes(models, monkeypatch):
    """Every step of a canvas calls the step function with the same shapes, and reads back exactly one tensor."""
    _, model = models
    eng = engine(model)
    calls, syncs = [], []
    step = eng._fast_step

    def recording(*args):
        calls.append(args)
        return step(*args)

    eng._fast_step = recording
    for p, sp in zip(PROMPTS, params([4, 5, 6], 2)):
        eng.add_request(p, sp)
    eng.step()  # prefill
    tolist, item = torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append("tolist") or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: syncs.append("item") or item(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: syncs.append("bool") or bool(item(t)))
    eng.step()
    monkeypatch.undo()
    assert syncs == ["tolist"]
    while eng.has_work() and len(calls) < 4:
        eng.step()
    assert len(calls) >= 3 and len(set(calls[:3])) == 1  # no commit yet: the same (B, key lengths, filter hints)


def test_fast_step_compiles_as_one_graph(models):
    """`torch.compile(fullgraph=True)` traces the whole step (decoder, head, sampler, state update) without a graph
    break, functionalises its in-place state updates (aot_eager), and gives the same tokens as the eager step."""
    _, model = models
    seeds = [7, 8]
    want = [o.token_ids for o in engine(model).run(list(zip(PROMPTS[:2], params(seeds, 2))))]
    eng = engine(model, compile=True)
    torch._dynamo.reset()
    eng._compiled = torch.compile(eng._fast_step, fullgraph=True, backend="aot_eager", dynamic=False)
    got = [o.token_ids for o in eng.run(list(zip(PROMPTS[:2], params(seeds, 2))))]
    assert got == want


def test_counter_draws_are_uniform_keyed_and_replayable():
    keys = seed_keys(torch.tensor([0, 1, 2**32, 2**62 + 5]))
    assert len(set(keys.tolist())) == 4  # seeds that differ only above bit 32 still differ
    counters = torch.zeros(4, dtype=torch.long)
    u = CounterDraws(keys, counters).uniforms(20_000)
    assert u.min() >= 0 and u.max() < 1
    for row in u:  # chi-square over 20 bins, 19 degrees of freedom: 60 is far beyond the 99.99th percentile
        hist = torch.histc(row, bins=20, min=0, max=1)
        assert ((hist - 1000) ** 2 / 1000).sum() < 60
    assert abs(torch.corrcoef(u)[0, 1:]).max() < 0.05
    tokens = CounterDraws(keys, counters).renoise(8192, 1000)
    assert tokens.min() >= 0 and tokens.max() < 1000 and tokens.unique().numel() > 950
    # Call k of a CounterDraws equals draw number k of the stateful stream, row by row, whatever rows are served.
    stream = CounterStream([0, 1, 2**32, 2**62 + 5])
    d = CounterDraws(keys, counters)
    first, second = d.initial_canvas(16, 50), d.uniforms(16)
    assert torch.equal(stream.initial_canvas(16, 50), first)
    assert torch.equal(stream.select([2]).uniforms(16), second[2:3])
    assert torch.equal(stream.select([0, 1, 3]).uniforms(16), second[[0, 1, 3]])
    # The engine's step draws (keys of draws 2 and 3 computed on the host, in Python ints) are the stream's next two.
    seeds = [0, 1, 2**32, 2**62 + 5]
    host_keys = torch.tensor([[draw_key(seed_keys(s), 2), draw_key(seed_keys(s), 3)] for s in seeds])
    u2, n2 = StepDraws(host_keys).step_draws(16, 50)
    assert torch.equal(u2, stream.uniforms(16)) and torch.equal(n2, stream.renoise(16, 50))


def test_precomputed_temperature_is_the_reference_schedule():
    """RowParams.temperature (4 kernels from per-request parts) gives `temperature` (HF's rounding) bit for bit."""
    from dgemma.sampler import RowParams, temperature
    from dgemma.sampling_params import DenoiseSettings

    settings = [DenoiseSettings(max_new_tokens=8, max_denoising_steps=n, entropy_bound=0.1, t_min=lo, t_max=hi,
                                stability_threshold=1, confidence_threshold=0.01)
                for n, lo, hi in ((48, 0.4, 0.8), (7, 0.1, 1.3), (1, 0.0, 0.3), (13, 0.33, 0.77))]
    p = RowParams.from_settings(settings)
    for left in range(1, 49):
        n = torch.minimum(torch.full((4,), left, dtype=torch.int32), p.max_steps)
        assert torch.equal(p.temperature(n), temperature(n, p.max_steps, p.t_min, p.t_max))


def test_fast_mode_traces_every_step(models):
    """With a trace, the read-back carries the accepted mask and mean entropy too, row by row."""
    _, model = models
    eng = engine(model)
    out = eng.run([(PROMPTS[1], SamplingParams(max_new_tokens=2 * C, seed=9, trace=True, ignore_eos=True,
                                               entropy_bound=0.1, **KNOBS)),
                   (PROMPTS[0], params([4], 1)[0])])
    traced, plain = out
    assert len(traced.trace) == traced.decoder_forwards and not plain.trace
    assert [t.step for t in traced.trace[:traced.steps_per_canvas[0]]] == list(range(1, traced.steps_per_canvas[0] + 1))
    assert all(len(t.accepted) == C and any(t.accepted) and t.mean_entropy >= 0 for t in traced.trace)
    last_of_first = traced.trace[traced.steps_per_canvas[0] - 1]
    assert last_of_first.argmax == traced.token_ids[:C]
    alone = engine(model).run([(PROMPTS[1], SamplingParams(max_new_tokens=2 * C, seed=9, ignore_eos=True,
                                                           entropy_bound=0.1, **KNOBS))])[0]
    assert alone.token_ids == traced.token_ids  # tracing changes nothing


def test_fused_projections_follow_weight_updates_and_leave_training_alone(models):
    """The fast path's fused q/k/v, gate/up and per-head norm weights track in-place weight updates, and training
    (autograd on) never takes the fused path, so gradients reach every checkpoint parameter."""
    from dgemma.kv_cache import EncodeSegment, KVCache

    _, model = models
    model.fuse_projections()
    attn = model.layers[0].self_attn
    prompt = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        kv = KVCache(model.text, 1, 64)
        hidden = model([EncodeSegment(kv, prompt, [0])])[0]
        attn.q_norm.weight.mul_(1.5)  # e.g. an optimizer step
        model.fuse_projections()
        kv = KVCache(model.text, 1, 64)
        moved = model([EncodeSegment(kv, prompt, [0])])[0]
        from dgemma import batch_invariant
        with batch_invariant.mode(True):
            kv = KVCache(model.text, 1, 64)
            exact = model([EncodeSegment(kv, prompt, [0])])[0]
        attn.q_norm.weight.div_(1.5)
        model.fuse_projections()
    assert not torch.equal(hidden, moved)
    torch.testing.assert_close(moved, exact, rtol=1e-4, atol=1e-5)
    trainable = [p for p in model.parameters() if not p.requires_grad]
    for p in trainable:
        p.requires_grad_(True)
    try:
        kv = KVCache(model.text, 1, 64)
        model([EncodeSegment(kv, prompt, [0])])[0].sum().backward()
        grads = [attn.q_proj.weight.grad, attn.k_proj.weight.grad, model.layers[0].mlp.gate_proj.weight.grad]
    finally:
        model.zero_grad(set_to_none=True)
        for p in trainable:
            p.requires_grad_(False)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
