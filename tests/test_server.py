"""`dgemma serve` with the real `openai` client: completions, chat, streaming, drafts, every error class, CLI, memory.

One tiny random checkpoint and one server (uvicorn in a background thread on a free loopback port) for the module;
outputs are checked against offline `LLM.generate` / `LLM.chat` with the same seed.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from dgemma.llm import LLM
from dgemma.sampling_params import SamplingParams
from dgemma.server import ServerConfig
from dgemma.server import cli, memory
from dgemma.server.metrics import parse_text
from helpers import make_tiny_checkpoint

KEY = "sk-test"
MAX_LEN = 128
FAST = {"max_denoising_steps": 4}  # extra body: few steps per canvas keeps every request short


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", canvas_length=16)


@pytest.fixture(scope="module")
def server(ckpt):
    cfg = ServerConfig(model=str(ckpt), served_model_names=("tiny", "tiny-alias"), api_key=KEY, max_num_seqs=4,
                       max_waiting=2, max_model_len=MAX_LEN, max_body_bytes=64 * 1024)
    llm, app = cli.build(cfg)
    with cli.BackgroundServer(app) as srv:
        srv.llm = llm
        yield srv


@pytest.fixture(scope="module")
def offline(ckpt):
    return LLM(ckpt, max_num_seqs=4, max_model_len=MAX_LEN)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def sp(**kw) -> SamplingParams:
    return SamplingParams(**{**FAST, **kw})


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("dgemma_requests_received_total", "dgemma_generation_tokens_total", "dgemma_queue_depth",
                 "dgemma_running_canvases", "dgemma_tokens_per_forward", "dgemma_denoising_steps_per_canvas_bucket",
                 "dgemma_time_to_first_token_seconds_bucket", "dgemma_request_latency_seconds_count"):
        assert name in text


def test_completion_matches_offline(client, offline):
    r = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=24, seed=7, extra_body=FAST)
    ref = offline.generate("To be, or not", sp(max_new_tokens=24, seed=7))[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.model == "tiny" and r.object == "text_completion"


def test_chat_stream_equals_non_stream_equals_offline(client, offline):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Hamlet?"}]
    kw = dict(model="tiny-alias", messages=msgs, max_completion_tokens=40, seed=11, extra_body=FAST)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    ref = offline.chat(msgs, sp(max_new_tokens=40, seed=11))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed == ref.text
    assert whole.choices[0].message.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + len(ref.token_ids)


def test_sse_wire_format_and_drafts(server, client):
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 20, "seed": 3, "stream": True,
            "dgemma": {"drafts": True}, **FAST}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    drafts = [o for o in objs if o["object"] == "dgemma.draft"]
    assert drafts and all(o["choices"] == [] and len(o["dgemma"]["tokens"]) == 16 and
                          len(o["dgemma"]["accepted"]) == 16 for o in drafts)
    assert [d["dgemma"]["step"] for d in drafts if d["dgemma"]["canvas"] == 0] == [1, 2, 3, 4]
    # The OpenAI client yields the drafts as chunks with empty choices: code that skips those (as it must for the
    # usage chunk) reads the same text as without drafts.
    with_drafts = client.completions.create(model="tiny", prompt="To be", max_tokens=20, seed=3, stream=True,
                                            extra_body={**FAST, "dgemma": {"drafts": True}})
    text = "".join(c.choices[0].text for c in with_drafts if c.choices)
    plain = client.completions.create(model="tiny", prompt="To be", max_tokens=20, seed=3, extra_body=FAST)
    assert text == plain.choices[0].text == "".join(o["choices"][0]["text"] for o in objs if o["choices"])


def test_stop_strings_match_offline(client, offline):
    full = offline.generate("To be", sp(max_new_tokens=32, seed=9))[0].text
    stop = full[5:7]
    r = client.completions.create(model="tiny", prompt="To be", max_tokens=32, seed=9, stop=[stop], extra_body=FAST)
    ref = offline.generate("To be", sp(max_new_tokens=32, seed=9, stop=(stop,)))[0]
    assert r.choices[0].text == ref.text and stop not in ref.text
    assert r.choices[0].finish_reason == "stop"


def test_engine_failure_is_500_and_the_server_recovers(server, client):
    engine, real_step = server.llm.engine, server.llm.engine.step

    def failing_step():
        engine.step = real_step  # fail once only
        raise RuntimeError("injected fault")

    engine.step = failing_step
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt="To be", max_tokens=8, extra_body=FAST)
        assert e.value.status_code == 500 and "injected fault" in e.value.message
    finally:
        engine.step = real_step
    assert client.completions.create(model="tiny", prompt="To be", max_tokens=8, extra_body=FAST).choices
    assert httpx.get(server.url + "/health").status_code == 200


def test_no_model_serves_the_embedded_default(ckpt, monkeypatch):
    import dgemma.llm

    monkeypatch.setattr(dgemma.llm, "default_model_path", lambda: ckpt)
    llm, app = cli.build(ServerConfig(max_model_len=64))
    assert llm.checkpoint.path == ckpt and app.state.server.config.model_name == "dgemma-shakespeare"
    monkeypatch.setattr(dgemma.llm, "default_model_path", lambda: ckpt / "missing")
    with pytest.raises(ValueError, match="default model is not installed"):
        cli.build(ServerConfig())


def test_default_max_tokens_is_room_left(client, offline):
    ids = offline.encode("To be")
    r = client.completions.create(model="tiny", prompt="To be", seed=1,
                                  extra_body={"ignore_eos": True, "max_denoising_steps": 1})
    assert r.usage.completion_tokens == MAX_LEN - len(ids)  # never a silent 256 (or other) cap
    assert r.choices[0].finish_reason == "length"


def test_temperature_is_accepted_and_schedule_decides(client):
    outs = {client.completions.create(model="tiny", prompt="To", max_tokens=16, seed=5, temperature=t,
                                      extra_body=FAST).choices[0].text for t in (0, 0.7, 2)}
    assert len(outs) == 1


BAD_REQUESTS = [  # (field overrides, param named in the error)
    ({"max_tokens": "5"}, "max_tokens"),  # wrong type (no coercion)
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"temperature": 3}, "temperature"),
    ({"n": 2}, "n"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "start: x"}}, "structured_outputs.grammar"),  # undefined rule x
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"t_min": 0.9, "t_max": 0.5}, "t_max"),
    ({"max_denoising_steps": 0}, "max_denoising_steps"),
    ({"bogus_knob": 1}, "bogus_knob"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_completion_tokens": MAX_LEN}, "max_completion_tokens"),  # prompt + max_tokens > max_model_len
    ({"max_tokens": MAX_LEN}, "max_tokens"),
]


@pytest.mark.parametrize("override,param", BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_400_names_the_field(client, override, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **override}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body=body, cast_to=object)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param, err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_too_long_prompt_states_the_counts(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * (MAX_LEN + 3), max_tokens=4)
    assert f"{MAX_LEN + 3} tokens" in e.value.message and f"max_model_len is {MAX_LEN}" in e.value.message
    assert e.value.code == "context_length_exceeded"


def test_auth_model_size_and_route_errors(server, client):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model="tiny", prompt="x", max_tokens=4)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})  # no key at all (openai cannot send none)
    assert r.status_code == 401 and r.json()["error"]["message"].startswith("missing API key")
    assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=4)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="x" * 100_000, max_tokens=4)
    assert e.value.status_code == 413 and e.value.code == "request_too_large"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "request body is not valid JSON"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_full_is_503_with_retry_after(server, client):
    # 4 slots + 2 waiting = 6 in flight; long requests (48 steps a canvas, no EOS) keep them busy.
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 100, "stream": True, "ignore_eos": True,
            "max_denoising_steps": 48, "stability_threshold": 0, "confidence_threshold": 0}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                      limits=httpx.Limits(max_connections=10)) as h:
        streams = [h.stream("POST", "/v1/completions", json=body) for _ in range(6)]
        try:
            assert all(s.__enter__().status_code == 200 for s in streams)
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model="tiny", prompt="x", max_tokens=4)
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
            assert e.value.code == "queue_full" and "queue is full" in e.value.message
        finally:
            for s in streams:
                s.__exit__(None, None, None)  # disconnect: the server aborts them and frees the slots
    values = {}
    for _ in range(200):  # bounded wait for the aborts to reach the engine loop
        values = parse_text(httpx.get(server.url + "/metrics").text)
        if values["dgemma_running_canvases"] == 0 and values["dgemma_requests_in_flight"] == 0:
            break
        __import__("time").sleep(0.05)
    assert values["dgemma_running_canvases"] == 0 and values["dgemma_queue_depth"] == 0
    assert values['dgemma_requests_finished_total{finish_reason="cancelled"}'] >= 6


def test_cli_flags_underscores_and_diffusion_config():
    args = cli.build_parser().parse_args(["m", "--max_model_len", "64", "--canvas_length", "32",
                                          "--diffusion-config", '{"max_denoising_steps": 4, "t_min": 0.3}',
                                          "--served_model_name", "a", "b", "--api-key", "k"])
    cfg = cli.config_from_args(args)
    assert (cfg.max_model_len, cfg.canvas_length, cfg.max_denoising_steps) == (64, 32, 4)
    assert cfg.diffusion_defaults == (("t_min", 0.3),) and cfg.served_model_names == ("a", "b")
    assert cfg.host == "127.0.0.1" and cfg.model_name == "a"
    bad = cli.build_parser().parse_args(["m", "--canvas-length", "8", "--diffusion-config", '{"canvas_length": 16}'])
    with pytest.raises(ValueError, match="contradicts"):
        cli.config_from_args(bad)


def test_memory_plan_refuses_at_start_up(ckpt, capsys):
    assert cli.main(["serve", str(ckpt), "--max-num-seqs", "100000", "--max-model-len", "2048"]) == 2
    err = capsys.readouterr().err
    assert "not enough memory" in err and "KV pool" in err and "would fit" in err


def test_memory_plan_kv_is_exact(ckpt):
    import torch

    from dgemma.config import ModelConfig
    from dgemma.kv_cache import KVCache

    cfg = ModelConfig.from_file(ckpt / "config.json")
    p = memory.plan(cfg, torch.float32, max_num_seqs=3, max_model_len=100, available=None)
    kv = dict(p.parts)["KV pool (full layers)"] + dict(p.parts)["KV per slot (sliding rings, canvas scratch)"]
    assert kv == KVCache(cfg.text, 3, 100, scratch=cfg.canvas_length).nbytes()  # as the engine allocates
    assert p.fits and p.total > dict(p.parts)["weights"] > 0


# MARK: hardening (issue 12): each of these failed before its fix


def test_streamed_text_never_leaks_the_start_of_a_stop_string(server, client, offline):
    """A stop string that starts in one canvas and ends in the next: the stream used to send its start."""
    checked = 0
    for seed in range(40):
        full = offline.generate("To be", sp(max_new_tokens=48, seed=seed, ignore_eos=True))[0]
        b = len(offline.tokenizer.decode(full.token_ids[:16]))  # where the first canvas's text ends
        stop = full.text[b - 2:b + 2]
        if b < 2 or len(stop) < 4 or full.text.find(stop) != b - 2 or "\ufffd" in stop:
            continue
        kw = dict(model="tiny", prompt="To be", max_tokens=48, seed=seed, stop=[stop],
                  extra_body={**FAST, "ignore_eos": True})
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
        assert streamed == client.completions.create(**kw).choices[0].text == full.text[:b - 2]
        checked += 1
        if checked == 2:
            return
    raise AssertionError("no seed gave a stop string across a canvas boundary")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_body_must_be_declared_json(server, content_type):
    # What a web page can send cross-site without a CORS preflight: refused before the body is read as JSON.
    headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": content_type} if content_type else {})}
    body = json.dumps({"model": "tiny", "prompt": "To be", "max_tokens": 4})
    r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(server.url + "/v1/completions", content=body,
                    headers={**headers, "Content-Type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200


def test_host_header_must_name_this_server(server):
    def get(host):
        return httpx.get(server.url + "/health", headers={"Host": host})

    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        r = get(host)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        assert "--allowed-hosts" in r.json()["error"]["message"]
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST", f"[::1]:{server.port}",
                 "10.1.2.3", "app.localhost"):
        assert get(host).status_code == 200, host


def test_allowed_hosts_option():
    from dgemma.server.security import HostCheck

    args = cli.build_parser().parse_args(["--host", "0.0.0.0", "--allowed-hosts", "box.lan", "Api.Example.com"])
    cfg = cli.config_from_args(args)
    check = HostCheck(None, cfg.host, cfg.allowed_hosts)
    assert check.allows("box.lan:8000") and check.allows("api.example.com") and check.allows("192.168.1.5:8000")
    assert not check.allows("other.example")
    assert HostCheck(None, "127.0.0.1", ("*",)).allows("anything.example")


def test_api_key_protects_the_schema_and_turns_the_docs_off(server):
    for path in ("/docs", "/redoc"):
        assert httpx.get(server.url + path).status_code == 404
    assert httpx.get(server.url + "/openapi.json").status_code == 401
    schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "/v1/completions" in schema["paths"]
    # as documented in docs/serving.md (and as vLLM does): probes stay open
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_docs_are_served_without_api_key(ckpt):
    _, app = cli.build(ServerConfig(model=str(ckpt), max_model_len=64, max_num_seqs=1))
    with cli.BackgroundServer(app) as srv:
        assert httpx.get(srv.url + "/docs").status_code == 200
        assert "/v1/chat/completions" in httpx.get(srv.url + "/openapi.json").json()["paths"]


def test_chat_template_kwargs_are_template_variables_only(server, client, offline):
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs, name in (({"tokenize": False}, "tokenize"), ({"messages": []}, "messages"),
                         ({"raise_exception": "x"}, "raise_exception"), ({"not_in_template": 1}, "not_in_template")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                           extra_body={"chat_template_kwargs": kwargs})
        assert e.value.body["param"] == f"chat_template_kwargs.{name}"
        assert "not a variable of this model's chat template" in e.value.message and "bos_token" in e.value.message
        assert "got multiple values" not in e.value.message  # the Python error that used to leak
    bos = offline.tokenizer.special_tokens_map["bos_token"]
    kw = dict(model="tiny", messages=msgs, max_tokens=8, seed=2, extra_body=FAST)
    with_var = client.chat.completions.create(**{**kw, "extra_body": {**FAST,
                                                                      "chat_template_kwargs": {"bos_token": bos}}})
    assert with_var.choices[0].message.content == client.chat.completions.create(**kw).choices[0].message.content


def test_too_long_prompt_is_refused_by_characters_before_tokenising(server, client, monkeypatch):
    from dgemma.server.prompts import max_chars_per_token

    per_token = max_chars_per_token(server.llm.tokenizer.backend)
    calls = []
    prompts = server.server.config.app.state.server.prompts
    monkeypatch.setattr(prompts, "_batch", lambda *a, **k: calls.append(1))
    with pytest.raises(openai.BadRequestError) as e:  # 63 KB: under the body limit, over what 128 tokens can hold
        client.completions.create(model="tiny", prompt="to be or not " * 5000, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "characters" in e.value.message
    assert f"at most {MAX_LEN * per_token} characters fit" in e.value.message and not calls
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "to be " * 10000}],
                                       max_tokens=4)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "messages"


def test_character_bound_applies_to_the_rendered_chat(client, offline):
    # The template trims each message: 20,000 characters of padding render to a short prompt, which must be served.
    padded = [{"role": "user", "content": " " * 10_000 + "Who is Hamlet?" + "\n" * 10_000}]
    plain = [{"role": "user", "content": "Who is Hamlet?"}]
    kw = dict(model="tiny", max_tokens=8, seed=4, extra_body=FAST)
    r = client.chat.completions.create(messages=padded, **kw)
    ref = client.chat.completions.create(messages=plain, **kw)
    assert r.choices[0].message.content == ref.choices[0].message.content
