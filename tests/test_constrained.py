"""Constrained decoding (dgemma/constraint.py, docs/constrained.md) with the embedded default model, which writes no
JSON by itself: every output satisfies its JSON schema / regex / choice, or ends with finish_reason "length"."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from dgemma.constraint import ConstraintError
from dgemma.llm import LLM
from dgemma.sampling_params import SamplingParams
from helpers import fast_engine

SEEDS = range(20)
FAST = dict(max_denoising_steps=6, max_new_tokens=128)  # few steps: validity does not depend on the step count

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["king", "queen", "fool"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                   "floor": {"type": "integer", "minimum": -2, "maximum": 9}},
                 "required": ["city", "floor"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,6} (of|the) [A-Z][a-z]{2,8}\."
CHOICE = ["Romeo", "Juliet", "Mercutio", "the nurse"]
# A context-free language no regex describes: balanced brackets around a sum of small numbers, e.g. "(3+(12+7))".
GRAMMAR = """
start: expr
expr: NUM | "(" expr "+" expr ")"
NUM: /[1-9][0-9]?/
"""


def _balanced_sum(text: str) -> bool:
    if re.fullmatch(r"[1-9][0-9]?", text):
        return True
    if not (text.startswith("(") and text.endswith(")")):
        return False
    depth = 0
    for i, ch in enumerate(text[1:-1], 1):
        depth += (ch == "(") - (ch == ")")
        if ch == "+" and depth == 0:
            return _balanced_sum(text[1:i]) and _balanced_sum(text[i + 1:-1])
    return False


@pytest.fixture(scope="module")
def llm():
    return LLM()


def _run(llm, seeds, **constraint):
    return llm.generate(["ROMEO:"] * len(seeds), [SamplingParams(seed=s, **FAST, **constraint) for s in seeds])


def _tally(outs, valid):
    """Every output is valid or ended by length; returns the number that ended by length."""
    by_length = 0
    for o in outs:
        if o.finish_reason == "length":
            by_length += 1
        else:
            assert o.finish_reason == "stop", o.finish_reason
            assert valid(o.text), o.text
    assert by_length < len(outs), "every output ran out of room: the test shows nothing"
    return by_length


def _valid_json(text):
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_json_schema_outputs_are_valid_or_end_by_length(llm):
    _tally(_run(llm, SEEDS, json_schema=SCHEMA), _valid_json)


def test_regex_outputs_match_or_end_by_length(llm):
    _tally(_run(llm, SEEDS, regex=REGEX), lambda t: re.fullmatch(REGEX, t) is not None)


def test_choice_outputs_are_one_of_the_choices(llm):
    outs = _run(llm, SEEDS, choice=CHOICE)
    assert _tally(outs, lambda t: t in CHOICE) == 0


def test_grammar_outputs_are_in_the_language_or_end_by_length(llm):
    _tally(_run(llm, SEEDS, grammar=GRAMMAR), _balanced_sum)


def test_masked_steps_keep_finite_entropies_and_stop_early(llm):
    """The mask must not turn entropies into NaN (0 * -inf): the mean-entropy stop rule and the entropy-bound
    acceptance both need them, so a constrained canvas converges before the step cap like an unconstrained one."""
    outs = llm.generate(["ROMEO:"] * 4, [SamplingParams(seed=s, json_schema=SCHEMA, max_new_tokens=64, trace=True)
                                         for s in range(4)])
    for o in outs:
        assert all(t.mean_entropy == t.mean_entropy for t in o.trace), [t.mean_entropy for t in o.trace]
    steps = [c.steps for o in outs for c in o.canvases]
    assert max(steps) < llm.engine.defaults.max_denoising_steps, steps


def test_unconstrained_default_model_writes_no_json(llm):
    """The control: without the constraint the same requests are not JSON (so the constraint does the work)."""
    outs = _run(llm, range(5))
    assert not any(_valid_json(o.text) for o in outs)


def test_constraint_spans_canvases_and_state_carries(llm):
    """A schema whose shortest valid text is longer than a canvas (64 tokens) still ends valid: the matcher's state
    carries from one commit to the next."""
    schema = {"type": "object", "properties": {"line": {"type": "string", "minLength": 200, "maxLength": 220}},
              "required": ["line"], "additionalProperties": False}
    outs = llm.generate(["ROMEO:"] * 3, [SamplingParams(seed=s, json_schema=schema, max_denoising_steps=6,
                                                        max_new_tokens=512) for s in range(3)])
    for o in outs:
        assert o.finish_reason == "stop" and len(o.canvases) >= 2, (o.finish_reason, len(o.canvases))
        jsonschema.validate(json.loads(o.text), schema)


def test_constrained_output_independent_of_batch_mates_and_reproducible(llm):
    alone = _run(llm, [7], json_schema=SCHEMA)[0]
    mates = [SamplingParams(seed=1, **FAST), SamplingParams(seed=7, **FAST, json_schema=SCHEMA),
             SamplingParams(seed=3, **FAST, regex=REGEX), SamplingParams(seed=4, **FAST)]
    together = llm.generate(["ROMEO:", "ROMEO:", "JULIET:", "To be"], mates)
    assert together[1].token_ids == alone.token_ids
    assert together[0].token_ids == _run(llm, [1])[0].token_ids  # an unconstrained mate is untouched too


def test_fast_mode_runs_constrained_rows_on_the_per_row_path(llm):
    """In fast mode (batch_invariant=False) a constrained request leaves the fixed-shape step: its rows are decoded
    per row while its unconstrained batch mates take the fast step; both stay as they would be."""
    eng = fast_engine(llm)
    prompt = llm.encode("ROMEO:")
    plain = SamplingParams(seed=2, **FAST)
    ref_plain = eng.run([(prompt, plain)])[0].token_ids
    outs = eng.run([(prompt, SamplingParams(seed=s, json_schema=SCHEMA, **FAST)) for s in range(2)] + [(prompt, plain)])
    for o in outs[:2]:
        assert o.finish_reason == "length" or _valid_json(o.text), o.text
    assert outs[2].token_ids == ref_plain
    again = eng.run([(prompt, SamplingParams(seed=0, json_schema=SCHEMA, **FAST))])[0]
    assert again.token_ids == outs[0].token_ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"type": "foo"}), "invalid json_schema"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(regex="[a-z"), "invalid regex"),
    (dict(choice=[]), "non-empty list"),
    (dict(choice=["a", ""]), "non-empty list"),
    (dict(regex="a", choice=["a"]), "at most one"),
    (dict(regex="a", stop=["x"]), "cannot be combined"),
    (dict(grammar="start: x"), "invalid grammar"),
])
def test_bad_constraints_are_rejected_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_constraint_error_is_a_value_error():
    assert issubclass(ConstraintError, ValueError)


# -- the server ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    import openai

    from dgemma.server import ServerConfig, cli

    _, app = cli.build(ServerConfig(model=None, max_num_seqs=4, max_model_len=512))
    with cli.BackgroundServer(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=120)


def _fmt(strict):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": strict}}


@pytest.mark.parametrize("strict", [True, False])
def test_server_response_format_json_schema(client, strict):
    for seed in range(3):
        r = client.chat.completions.create(model="dgemma-shakespeare", messages=[{"role": "user", "content": "Who?"}],
                                           response_format=_fmt(strict), seed=seed, max_tokens=128,
                                           extra_body={"max_denoising_steps": 6})
        c = r.choices[0]
        assert c.finish_reason == "length" or _valid_json(c.message.content), c.message.content


def test_server_streams_valid_json_and_takes_vllm_fields(client):
    seen = 0
    for seed, fmt in [(0, _fmt(True)), (1, _fmt(True)), (2, {"type": "json_object"})]:
        stream = client.chat.completions.create(
            model="dgemma-shakespeare", messages=[{"role": "user", "content": "Speak"}], stream=True, seed=seed,
            response_format=fmt, max_tokens=128, extra_body={"max_denoising_steps": 6})
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        reason = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
        if reason == "stop":  # json_object allows any members: it may run to the length limit
            assert isinstance(json.loads(text), dict), text
            if fmt["type"] == "json_schema":
                assert _valid_json(text), text
            seen += 1
    assert seen, "every stream ended by length"
    r = client.completions.create(model="dgemma-shakespeare", prompt="ROMEO:", max_tokens=64, seed=1,
                                  extra_body={"structured_outputs": {"choice": CHOICE}, "max_denoising_steps": 6})
    assert r.choices[0].text in CHOICE
    r = client.completions.create(model="dgemma-shakespeare", prompt="ROMEO:", max_tokens=64, seed=1,
                                  extra_body={"guided_regex": REGEX, "max_denoising_steps": 6})
    assert r.choices[0].finish_reason == "length" or re.fullmatch(REGEX, r.choices[0].text)
    r = client.completions.create(model="dgemma-shakespeare", prompt="ROMEO:", max_tokens=64, seed=1,
                                  extra_body={"structured_outputs": {"grammar": GRAMMAR}, "max_denoising_steps": 6})
    assert r.choices[0].finish_reason == "length" or _balanced_sum(r.choices[0].text), r.choices[0].text


def test_server_bad_schema_is_a_400_that_says_why(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dgemma-shakespeare", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "object", "minProperties": "two"}}})
    assert e.value.body["param"] == "response_format" and "json_schema" in e.value.body["message"], e.value.body


# -- the CLI -------------------------------------------------------------------------------------------------------
def test_cli_generate_with_a_schema_file_and_a_choice(tmp_path, capsys):
    from dgemma.cli import main

    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    assert main(["generate", "ROMEO:", "--json", "--seed", "3", "--max-denoising-steps", "6",
                 "--max-new-tokens", "128", "--json-schema", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "length" or _valid_json(out["text"]), out
    assert main(["generate", "ROMEO:", "--json", "--seed", "3", "--max-denoising-steps", "6",
                 "--choice", *CHOICE]) == 0
    assert json.loads(capsys.readouterr().out)["text"] in CHOICE
    (tmp_path / "sum.lark").write_text(GRAMMAR)
    assert main(["generate", "ROMEO:", "--json", "--seed", "3", "--max-denoising-steps", "6",
                 "--grammar", str(tmp_path / "sum.lark")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "length" or _balanced_sum(out["text"]), out


@pytest.mark.parametrize("flags, message", [(["--regex", "[a-"], "invalid regex"),
                                            (["--json-schema", "/nonexistent.json"], "cannot read"),
                                            (["--regex", "a", "--choice", "a"], "at most one")])
def test_cli_bad_constraint_exits_2_with_the_reason(flags, message, capsys):
    from dgemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "ROMEO:", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
