"""Infilling templates (dgemma/template.py, docs/constrained.md "Templates") with the embedded default model: fixed
spans come out byte for byte, holes keep their bounds and rules, pinned positions hold their tokens from the first
step on, across canvases, in exact and fast mode, from Python, the CLI and the server."""

from __future__ import annotations

import json

import jsonschema
import pytest

from dgemma.constraint import ll_tokenizer, template_pins
from dgemma.llm import LLM
from dgemma.sampling_params import SamplingParams
from helpers import fast_engine
from dgemma.template import Fixed, Hole, match_output, parse_template, template_lark

SEEDS = range(20)
FAST = dict(max_denoising_steps=6, max_new_tokens=160)
HOME = {"type": "object", "properties": {"city": {"enum": ["Verona", "Mantua"]},
                                          "floor": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["city", "floor"], "additionalProperties": False}
# Every kind of hole; pinning stops at the first hole of unknown length (Name's max=6), so only "Name: " is pinned.
MIXED = ('Name: {{max=6}}\nAge: {{regex="[0-9]{1,3}"}}\nRole: {{choice=["king", "queen", "fool"]}}\n'
         'Bio: {{len=5}}.\nHome: {{json=' + json.dumps(HOME) + '}}\n')
# Only fixed spans and len= holes before the last hole: every fixed span is pinned.
PINNED = "ROMEO. {{len=4}}, quoth he, {{len=3}}!\nName: {{max=5}}\n"
# A fixed span longer than a canvas (64 tokens): pins on the second canvas, after a len= hole on the first.
LONG = "O Romeo, Romeo! wherefore art thou Romeo? " * 5 + "{{len=6}} Deny thy father and refuse thy name{{len=4}}.\n"


@pytest.fixture(scope="module")
def llm():
    return LLM()


@pytest.fixture(scope="module")
def lt(llm):
    return ll_tokenizer(llm.tokenizer, llm.engine.V, llm.tokenizer.eos_token_id)


def _check(lt, template, out, eos):
    """The output spells the template and keeps every hole's bound; pinned tokens sit at their positions."""
    assert out.finish_reason == "stop", (out.finish_reason, out.text)
    ids = out.token_ids[:-1] if out.token_ids and out.token_ids[-1] == eos else out.token_ids
    parts = parse_template(template)
    holes = match_output(parts, [lt.decode_bytes([t]) for t in ids])
    assert holes is not None, out.text
    for (text, tokens), hole in zip(holes, [p for p in parts if isinstance(p, Hole)]):
        if hole.exact:
            assert tokens == hole.max_tokens, (text, tokens, hole)
        elif hole.max_tokens is not None:
            assert tokens <= hole.max_tokens, (text, tokens, hole)
        if hole.json_schema is not None:
            jsonschema.validate(json.loads(text), hole.json_schema)
    for pos, tok in template_pins(template, lt).items():
        assert out.token_ids[pos] == tok, (pos, out.token_ids[pos], tok)
    return holes


def _run(llm, template, seeds, **kw):
    return llm.generate(["ROMEO:"] * len(seeds),
                        [SamplingParams(seed=s, template=template, **{**FAST, **kw}) for s in seeds])


def test_template_parts_and_grammar():
    parts = parse_template('Name: {{max=8}}\nAge: {{regex="[0-9]{1,3}"}} {{text="{{"}}x}}')
    assert parts == (Fixed("Name: "), Hole(max_tokens=8), Fixed("\nAge: "), Hole(max_tokens=16, regex="[0-9]{1,3}"),
                     Fixed(" {{x}}"))
    lark = template_lark(parts)
    assert lark.startswith('start: "Name: " hole1? "\\nAge: " hole3 " {{x}}"'), lark
    assert "/[^\\x{a}]+/" in lark  # the free hole stops at the next span's first character, "\n"
    # a regex with '/' and a raw newline (from the JSON escape) still makes a valid Lark literal
    slashed = 'd: {{regex="[0-9]+/[0-9]+\\n?"}}'
    assert template_lark(parse_template(slashed)).endswith('HOLE1: /[0-9]+\\/[0-9]+\\x{a}?/\n')
    SamplingParams(template=slashed)


def test_pins_cover_fixed_spans_up_to_the_first_hole_of_unknown_length(lt):
    pins = template_pins(PINNED, lt)
    first, second, third = (lt.tokenize_str(s) for s in ("ROMEO. ", ", quoth he, ", "!\nName: "))
    a, b = len(first), len(first) + 4 + len(second)
    assert pins == {**dict(enumerate(first)), **{a + 4 + j: t for j, t in enumerate(second)},
                    **{b + 3 + j: t for j, t in enumerate(third)}}
    assert set(template_pins(MIXED, lt)) == set(range(len(lt.tokenize_str("Name: "))))


def test_mixed_template_outputs_keep_fixed_spans_and_hole_bounds(llm, lt):
    outs = _run(llm, MIXED, SEEDS)
    for o in outs:
        _check(lt, MIXED, o, llm.tokenizer.eos_token_id)


def test_pinned_template_holds_its_tokens_on_every_step(llm, lt):
    """Pinned positions are on the canvas from step one, accepted on every step, and never change."""
    pins = template_pins(PINNED, lt)
    outs = _run(llm, PINNED, SEEDS, trace=True)
    for o in outs:
        _check(lt, PINNED, o, llm.tokenizer.eos_token_id)
        for t in o.trace:
            for pos, tok in pins.items():
                j = pos - 64 * t.canvas_index
                if 0 <= j < 64:
                    assert t.pinned[j] and t.accepted[j] and t.argmax[j] == tok and t.allowed[j] == 1
            assert sum(t.pinned) == sum(0 <= p - 64 * t.canvas_index < 64 for p in pins)


def test_template_longer_than_a_canvas_pins_the_second_canvas(llm, lt):
    pins = template_pins(LONG, lt)
    assert min(pins) < 64 <= max(pins), max(pins)  # pins on both canvases
    for o in _run(llm, LONG, range(6), max_new_tokens=256):
        _check(lt, LONG, o, llm.tokenizer.eos_token_id)
        assert len(o.canvases) >= 2


def test_template_in_fast_mode_with_an_unconstrained_mate(llm, lt):
    eng = fast_engine(llm)
    prompt = llm.encode("ROMEO:")
    plain = SamplingParams(seed=2, **FAST)
    ref_plain = eng.run([(prompt, plain)])[0].token_ids
    outs = eng.run([(prompt, SamplingParams(seed=s, template=PINNED, **FAST)) for s in range(3)] + [(prompt, plain)])
    for o in outs[:3]:
        _check(lt, PINNED, o, llm.tokenizer.eos_token_id)
    assert outs[3].token_ids == ref_plain


@pytest.mark.parametrize("template, message", [
    ("", "non-empty string"),
    ("a {{max=0}}", r"hole at character 2: max must be an integer in \[1, 4096\]"),
    ("a {{max=3", "no closing"),
    ("{{size=3}}", "unknown key 'size'"),
    ("{{regex=[0-9]+}}", "not a JSON value"),
    ("{{max=2}}{{max=3}}", "follows another hole"),
    ('{{len=3 regex="a"}}', "len= is for free-text holes"),
    ('{{json={"type": "integer"} max=3}}', "bounded by its schema"),
    ("{{max=2 len=3}}", "not both"),
    ('{{regex="a" choice=["a"]}}', "at most one of regex, choice, json"),
    ('{{regex="[a-"}}', "invalid template"),
    ("{{choice=[]}}", "non-empty list"),
    ('{{text="x" max=3}}', "stands alone"),
])
def test_malformed_templates_are_refused_with_the_reason(template, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(template=template)


def test_template_cannot_be_combined_with_another_constraint():
    with pytest.raises(ValueError, match="at most one"):
        SamplingParams(template="a {{}}", regex="a")


# -- CLI and server --------------------------------------------------------------------------------------------------
def test_cli_template(capsys, lt, llm):
    from dgemma.cli import main

    assert main(["generate", "ROMEO:", "--json", "--seed", "4", "--max-denoising-steps", "6", "--max-new-tokens", "160",
                 "--template", PINNED]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = [t for t in out["token_ids"] if t != llm.tokenizer.eos_token_id]
    assert match_output(parse_template(PINNED), [lt.decode_bytes([t]) for t in ids]) is not None, out
    with pytest.raises(SystemExit) as e:
        main(["generate", "ROMEO:", "--template", "a {{max=x}}"])
    assert e.value.code == 2 and "not a JSON value" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server():
    from dgemma.server import ServerConfig, cli

    _, app = cli.build(ServerConfig(model=None, max_num_seqs=4, max_model_len=512))
    with cli.BackgroundServer(app) as srv:
        yield srv


def test_server_template_fields_drafts_and_400(server, lt):
    import httpx

    parts = parse_template(PINNED)
    pins = template_pins(PINNED, lt)
    for field in ({"structured_outputs": {"template": PINNED}}, {"guided_template": PINNED}):
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "prompt": "ROMEO:", "max_tokens": 160, "seed": 5, "max_denoising_steps": 6, **field})
        assert r.status_code == 200, r.text
        assert match_output(parts, [r.json()["choices"][0]["text"].encode()]) is not None, r.json()
    drafts = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120, json={
            "prompt": "ROMEO:", "max_tokens": 160, "seed": 5, "max_denoising_steps": 6, "stream": True,
            "dgemma": {"drafts": True}, "structured_outputs": {"template": PINNED}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"dgemma.draft"' in line:
                drafts.append(json.loads(line[6:])["dgemma"])
    assert drafts and all(d["vocab_size"] == 2048 and len(d["allowed"]) == 64 for d in drafts)
    assert [j for j, p in enumerate(drafts[0]["pinned"]) if p] == sorted(p for p in pins if p < 64)
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "prompt": "ROMEO:", "structured_outputs": {"template": "a {{max=-1}}"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.template", r.text
    assert "max must be an integer" in r.json()["error"]["message"]
