"""A request whose own step fails ends alone: its batch mates go on as if it had never been there, and the server
answers it with an OpenAI-style error (422 for a constraint that cannot be met, 500 otherwise) and keeps serving.

Failures are forced on real paths: a constraint's matcher that reaches a dead end (no token allowed) on its second
canvas, a template pin the constraint refuses, a detokenizer that raises, an engine step that raises, a metrics
update that raises. The embedded default model (exact mode on the CPU) runs everything.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from dgemma.engine import Engine, EngineConfig
from dgemma.llm import LLM
from dgemma.sampling_params import SamplingParams

FAST = dict(max_denoising_steps=6)
LONG = r"[a-z]{1000}"  # needs more than one 64-token canvas: the failure comes mid-generation, after a commit


def _doom(constraint, canvas_length: int) -> None:
    """From the second canvas on, this constraint's matcher allows no token (a dead end)."""
    allowed = constraint._allowed
    constraint._allowed = lambda m: (torch.zeros(constraint.V, dtype=torch.bool)
                                     if constraint.offset >= canvas_length else allowed(m))


def _pin_refused(constraint, canvas_length: int, token: int) -> None:
    """A pin on the second canvas that the constraint refuses (as a template whose fixed text cannot follow)."""
    constraint.pins = {canvas_length + 3: token}


def _run(eng: Engine, requests, broken: int | None = None, breaker=None) -> list:
    """Runs [(prompt ids, params)] together on `eng`; `breaker(seq)` breaks request number `broken` first."""
    ids = [eng.add_request(p, sp) for p, sp in requests]
    if broken is not None:
        breaker(next(s for s in eng.waiting if s.id == ids[broken]))
    events = eng.step()
    assert {ev.request_id for ev in events if ev.kind == "admitted"} == set(ids)  # one batch from the start
    done = {}
    while True:
        done.update((ev.request_id, ev.output) for ev in events if ev.kind == "finished")
        if not eng.has_work():
            break
        events = eng.step()
    assert eng.num_running == 0 and not eng.waiting
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def llm():
    return LLM()


@pytest.fixture(scope="module")
def requests(llm):
    plain = (llm.encode("ROMEO:"), SamplingParams(seed=3, max_new_tokens=160, ignore_eos=True, **FAST))
    choice = (llm.encode("JULIET:"), SamplingParams(seed=4, max_new_tokens=64, choice=["Romeo", "Tybalt"], **FAST))
    doomed = (llm.encode("NURSE:"), SamplingParams(seed=5, max_new_tokens=192, regex=LONG, **FAST))
    return plain, choice, doomed


@pytest.fixture(scope="module")
def solo(llm, requests):
    """What the two mates write alone."""
    return [_run(llm.engine, [r])[0] for r in requests[:2]]


def _digit(llm) -> int:
    return llm.tokenizer.encode("7", add_special_tokens=False)[0]


@pytest.mark.parametrize("how", ["dead_end", "refused_pin", "detokenizer"])
def test_failing_request_ends_alone_and_mates_are_untouched(llm, requests, solo, how):
    eng, C = llm.engine, llm.config.canvas_length

    def breaker(seq):
        if how == "dead_end":
            _doom(seq.constraint, C)
        elif how == "refused_pin":
            _pin_refused(seq.constraint, C, _digit(llm))
        else:  # the detokenizer fails on the second canvas
            push = seq.decoder.push

            def failing_push(ids):
                if seq.out.token_ids:
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
                return push(ids)

            seq.decoder.push = failing_push

    outs = _run(eng, list(requests), broken=2, breaker=breaker)
    for got, alone in zip(outs[:2], solo):  # exact mode: token for token what they wrote alone
        assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
    bad = outs[2]
    assert bad.finished and bad.finish_reason == "error"
    assert len(bad.canvases) == 1 and len(bad.token_ids) == C  # the first canvas was committed and is kept
    kind, words = {"dead_end": ("constraint", "allows no token"), "refused_pin": ("constraint", "pinned token"),
                   "detokenizer": ("internal", "UnicodeDecodeError")}[how]
    assert bad.error.kind == kind and words in bad.error.message, bad.error
    assert all(s is None for s in eng.slots)  # every slot free again, and the engine serves on
    assert _run(eng, [requests[1]])[0].token_ids == solo[1].token_ids


def test_fast_mode_dead_end_ends_alone(llm, requests):
    """In fast mode the constrained row is on the per-row path, its mates on the fixed-shape step."""
    eng = Engine(llm.model, eos_token_ids=sorted(llm.engine.eos_ids), pad_token_id=llm.engine.pad_id,
                 defaults=llm.engine.defaults, tokenizer=llm.tokenizer,
                 config=EngineConfig(max_num_seqs=4, batch_invariant=False))
    C = llm.config.canvas_length
    outs = _run(eng, list(requests), broken=2, breaker=lambda seq: _doom(seq.constraint, C))
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 160
    assert outs[1].finish_reason == "stop" and outs[1].text in ("Romeo", "Tybalt")
    assert outs[2].finish_reason == "error" and outs[2].error.kind == "constraint"
    assert all(s is None for s in eng.slots) and not bool(eng.denoising.any())


def test_fail_ends_a_queued_or_running_request(llm, requests):
    eng = llm.engine
    a, b = eng.add_request(*requests[0]), eng.add_request(*requests[1])
    eng.step()  # both running
    c = eng.add_request(*requests[0])
    from dgemma.outputs import Failure
    for rid in (b, c):
        ev = eng.fail(rid, Failure("internal", "boom"))
        assert ev.kind == "finished" and ev.output.finish_reason == "error" and ev.output.error.message == "boom"
    assert eng.fail("nobody", Failure("internal", "x")) is None
    assert [s.id for s in eng.slots if s is not None] == [a] and not eng.waiting
    eng.abort(a)


# -- the server ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    from dgemma.server import ServerConfig, cli

    srv_llm, app = cli.build(ServerConfig(model=None, max_num_seqs=4, max_model_len=512))
    with cli.BackgroundServer(app) as srv:
        srv.llm, srv.state = srv_llm, app.state.server
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=120)


MATE = dict(model="dgemma-shakespeare", prompt="ROMEO:", max_tokens=192, seed=11,
            extra_body={"ignore_eos": True, **FAST})  # three canvases: it outlives a request that fails on its second


@pytest.fixture(scope="module")
def mate_solo(server):
    """The mate's text alone."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-").completions.create(**MATE).choices[0].text


def _with_mate(client, doomed_call):
    """Runs `doomed_call` while a long streamed request is running; returns (its result, the mate's text)."""
    stream = client.completions.create(stream=True, **MATE)
    chunks = iter(stream)
    text = next(c for c in chunks if c.choices and c.choices[0].text).choices[0].text  # the mate is running
    result = doomed_call()
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    return result, text


def _doom_server(server, monkeypatch):
    """Every constrained request on the server reaches a dead end on its second canvas."""
    eng, C = server.llm.engine, server.llm.config.canvas_length
    make = eng._constraint

    def doomed(*a, **k):
        c = make(*a, **k)
        _doom(c, C)
        return c

    monkeypatch.setattr(eng, "_constraint", doomed)


def test_server_answers_a_dead_end_with_422_and_the_mate_is_untouched(server, client, mate_solo, monkeypatch):
    _doom_server(server, monkeypatch)

    def doomed():
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.completions.create(model="dgemma-shakespeare", prompt="NURSE:", max_tokens=192, seed=5,
                                      extra_body={"guided_regex": LONG, **FAST})
        return e.value

    err, mate = _with_mate(client, doomed)
    assert err.status_code == 422
    body = err.body
    assert body["type"] == "invalid_request_error" and body["code"] == "constraint_unsatisfiable"
    assert body["param"] == "guided_regex" and "allows no token" in body["message"], body
    assert mate == mate_solo
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_server_stream_ends_a_dead_end_with_an_error_event_then_done(server, client, mate_solo, monkeypatch):
    _doom_server(server, monkeypatch)

    def doomed():
        body = {"model": "dgemma-shakespeare", "messages": [{"role": "user", "content": "Who?"}], "stream": True,
                "seed": 5, "max_tokens": 192, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "s", "schema": {
                        "type": "object", "properties": {"x": {"type": "string", "pattern": "^[a-z]{1000}$"}},
                        "required": ["x"]}}}, **FAST}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    events, mate = _with_mate(client, doomed)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "constraint_unsatisfiable" and err["param"] == "response_format", err
    assert "allows no token" in err["message"]
    chunks = [json.loads(e) for e in events[:-2]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.startswith('{"x":"') and all(c["choices"][0].get("finish_reason") is None for c in chunks)
    assert mate == mate_solo
    with pytest.raises(openai.APIError, match="allows no token"):  # the openai client raises on the error event
        list(client.completions.create(model="dgemma-shakespeare", prompt="NURSE:", max_tokens=192, seed=5,
                                       stream=True, extra_body={"guided_regex": LONG, **FAST}))
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_server_internal_failure_of_one_request_is_a_500(server, client, mate_solo, monkeypatch):
    """A detokenizer that raises for one request: that request gets 500 `generation_failed`, the rest go on."""
    eng = server.llm.engine
    add = eng.add_request

    def add_broken(prompt, params, rid, **kw):
        add(prompt, params, rid, **kw)
        seq = next(s for s in eng.waiting if s.id == rid)
        if params.seed == 99:
            seq.decoder.push = lambda ids: 1 / 0
        return rid

    monkeypatch.setattr(eng, "add_request", add_broken)

    def broken():
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="dgemma-shakespeare", prompt="x", max_tokens=16, seed=99)
        return e.value

    err, mate = _with_mate(client, broken)
    assert err.body["code"] == "generation_failed" and "ZeroDivisionError" in err.body["message"], err.body
    assert mate == mate_solo
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_server_survives_a_failed_step_and_a_loop_bug(server, client, mate_solo, monkeypatch):
    """A step that raises fails every request in flight with a 500 body (none hangs); a bug elsewhere in the loop
    (here the gauges) loses no request; either way the loop lives on and /health stays ok."""
    eng, step = server.llm.engine, server.llm.engine.step
    armed = threading.Event()

    def flaky_step():
        if armed.is_set():
            armed.clear()
            raise RuntimeError("device lost")
        return step()

    monkeypatch.setattr(eng, "step", flaky_step)
    stream = client.completions.create(stream=True, **MATE)
    chunks = iter(stream)
    next(c for c in chunks if c.choices and c.choices[0].text)
    armed.set()
    with pytest.raises(openai.APIError, match="engine failure: device lost"):
        list(chunks)
    assert all(s is None for s in eng.slots)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert client.completions.create(**MATE).choices[0].text == mate_solo  # serving as before

    def broken_gauges():
        raise RuntimeError("metrics bug")

    monkeypatch.setattr(server.state.engine, "_gauges", broken_gauges)
    assert client.with_options(timeout=60).completions.create(**MATE).choices[0].text == mate_solo
    import time
    time.sleep(1.5)  # an idle turn of the loop hits the bug too
    assert server.state.engine.alive and httpx.get(server.url + "/health").json()["status"] == "ok"


def test_cli_prints_the_text_so_far_and_exits_1(monkeypatch, capsys):
    from dgemma.cli import main
    from dgemma.constraint import Constraint

    allowed = Constraint._allowed
    monkeypatch.setattr(Constraint, "_allowed", lambda self, m: (torch.zeros(self.V, dtype=torch.bool)
                                                                 if self.offset >= 64 else allowed(self, m)))
    args = ["generate", "NURSE:", "--seed", "5", "--max-denoising-steps", "6", "--max-new-tokens", "192",
            "--regex", LONG]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert len(out.strip()) > 64 and out.strip().isalpha() and "generation failed" in err and "allows no token" in err
    assert main([*args, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "error" and "allows no token" in out["error"] and len(out["token_ids"]) == 64


def test_server_constraint_refused_at_admission_is_a_422(server, client, monkeypatch):
    """A matcher that cannot be built for the engine's tokenizer (refused on the engine thread, after the request's
    own validation) is the request's fault too."""
    from dgemma.constraint import ConstraintError

    def refuse(*a, **k):
        raise ConstraintError("constraint cannot be used: no token spells it")

    monkeypatch.setattr(server.llm.engine, "_constraint", refuse)
    with pytest.raises(openai.UnprocessableEntityError, match="no token spells it") as e:
        client.completions.create(model="dgemma-shakespeare", prompt="x", max_tokens=16,
                                  extra_body={"structured_outputs": {"choice": ["a", "b"]}})
    assert e.value.body["param"] == "structured_outputs.choice"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
