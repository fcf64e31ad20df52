"""The engine and the LLM API: batching, batch independence, stopping, limits, traces and streaming."""

import pytest
import torch
from helpers import make_tiny_checkpoint

from dgemma.engine import EngineConfig, PromptTooLongError
from dgemma.llm import LLM
from dgemma.sampling_params import SamplingParams

C = 16


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), canvas_length=C), max_model_len=512)


def P(**kw):
    kw.setdefault("max_denoising_steps", 6)
    return SamplingParams(**kw)


def test_outputs_do_not_depend_on_batch_mates(llm):
    prompts = ["To be, or not", "The slings and arrows of outrageous fortune", "No more", "Devoutly"]
    params = [P(max_new_tokens=40, seed=1), P(max_new_tokens=20, seed=2, t_min=0.2),
              P(max_new_tokens=33, seed=3, max_denoising_steps=3), P(max_new_tokens=16, seed=4, top_k=5)]
    batched = llm.generate(prompts, params)
    for p, sp, out in zip(prompts, params, batched):
        alone = llm.generate(p, sp)[0]
        assert alone.token_ids == out.token_ids and alone.text == out.text
        assert alone.steps_per_canvas == out.steps_per_canvas


def test_max_new_tokens_spans_canvases_and_is_exact(llm):
    out = llm.generate("To be", P(max_new_tokens=2 * C + 5, seed=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 2 * C + 5 and out.finish_reason == "length"
    assert len(out.canvases) == 3 and [c.tokens for c in out.canvases] == [C, C, 5]
    assert out.decoder_forwards == sum(out.steps_per_canvas) <= 3 * 6
    assert out.tokens_per_forward == pytest.approx(len(out.token_ids) / out.decoder_forwards)


def test_same_seed_same_output_different_seed_differs(llm):
    a = llm.generate("To be", P(max_new_tokens=C, seed=7, ignore_eos=True))[0]
    b = llm.generate("To be", P(max_new_tokens=C, seed=7, ignore_eos=True))[0]
    c = llm.generate("To be", P(max_new_tokens=C, seed=8, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stop_token_ends_request_inside_a_canvas(llm):
    free = llm.generate("To be", P(max_new_tokens=3 * C, seed=5, ignore_eos=True))[0]
    pos = next(i for i in range(C + 2, 2 * C) if free.token_ids[i] not in free.token_ids[:i])
    out = llm.generate("To be", P(max_new_tokens=3 * C, seed=5, ignore_eos=True,
                                  stop_token_ids=[free.token_ids[pos]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:pos + 1]


def test_stop_string_truncates_text(llm):
    free = llm.generate("To be", P(max_new_tokens=3 * C, seed=5, ignore_eos=True))[0]
    text = free.text
    needle = text[len(text) // 2: len(text) // 2 + 3]
    if not needle.strip() or text.find(needle) < len(text) // 2:
        needle = text[len(text) // 2:len(text) // 2 + 5]
    start = text.find(needle)
    out = llm.generate("To be", P(max_new_tokens=3 * C, seed=5, ignore_eos=True, stop=[needle]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:start] and needle not in out.text
    assert len(out.token_ids) <= len(free.token_ids) and out.token_ids == free.token_ids[:len(out.token_ids)]


def test_trace_records_every_step(llm):
    out = llm.generate("To be", P(max_new_tokens=C, seed=1, trace=True, ignore_eos=True))[0]
    assert len(out.trace) == out.decoder_forwards
    assert [t.step for t in out.trace] == list(range(1, out.decoder_forwards + 1))
    assert all(len(t.argmax) == C and len(t.accepted) == C and any(t.accepted) for t in out.trace)
    assert out.trace[-1].argmax[:len(out.token_ids)] == out.token_ids


def test_stream_events_reassemble_the_output(llm):
    params = P(max_new_tokens=2 * C + 3, seed=9, trace=True, ignore_eos=True)
    events = list(llm.stream("No more", params))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "finished" and kinds.count("commit") == 3 and "draft" in kinds
    final = events[-1].output
    assert "".join(e.text_delta for e in events) == final.text
    assert sum((e.token_ids_delta for e in events), []) == final.token_ids
    assert final.token_ids == llm.generate("No more", params)[0].token_ids


def test_limits_and_bad_input(llm):
    with pytest.raises(PromptTooLongError, match="prompt has 600 tokens; max_model_len is 512"):
        llm.generate([5] * 600, P())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], P())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, "):
        llm.generate([[10 ** 6]], P())
    with pytest.raises(ValueError, match="max_new_tokens"):
        P(max_new_tokens=0)
    # max_new_tokens is clipped to the room left in max_model_len
    out = llm.generate([5] * 500, P(max_new_tokens=100, seed=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="no vision tower"):
        llm.chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_logit_chunking_does_not_change_results(llm):
    params = [P(max_new_tokens=C, seed=s, ignore_eos=True) for s in range(3)]
    ref = [o.token_ids for o in llm.generate(["a", "b", "c"], params)]
    old = llm.engine.cfg
    try:
        llm.engine.cfg = EngineConfig(max_num_seqs=old.max_num_seqs, max_model_len=old.max_model_len,
                                      logits_budget_bytes=1)  # one row per chunk
        assert [o.token_ids for o in llm.generate(["a", "b", "c"], params)] == ref
    finally:
        llm.engine.cfg = old


def test_abort_frees_the_slot(llm):
    eng = llm.engine
    rid = eng.add_request(llm.encode("To be"), P(max_new_tokens=4 * C, seed=0, ignore_eos=True))
    eng.step()
    assert eng.num_running == 1
    assert eng.abort(rid) and eng.num_running == 0 and not eng.has_work()


def test_chat_uses_the_template(llm):
    ids = llm.chat_prompt([{"role": "user", "content": "hello"}])
    assert llm.tokenizer.decode(ids, skip_special_tokens=False).endswith("<|turn>model\n")
    out = llm.chat([{"role": "user", "content": "hello"}], P(max_new_tokens=8, seed=0))
    assert out.finished and out.prompt_token_ids == ids


def test_batch_invariant_linear_tiles_are_exact_and_differentiable():
    """The tiled product equals a per-tile F.linear bit for bit (full tiles written in place, a padded last tile),
    and under autograd it falls back to a differentiable form with the same values."""
    from dgemma.batch_invariant import linear, mode

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g, requires_grad=True)
    x = torch.randn(70, 16, generator=g)  # 2 full tiles of 32 and a partial one
    padded = torch.cat([x, x.new_zeros(26, 16)])
    expect = torch.cat([torch.nn.functional.linear(padded[i:i + 32], w.detach()) for i in range(0, 96, 32)])[:70]
    with mode(True, 32):
        with torch.no_grad():
            fast = linear(x, w)
        slow = linear(x, w)
    assert torch.equal(fast, expect) and torch.equal(slow.detach(), expect)
    slow.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(24, 16))
