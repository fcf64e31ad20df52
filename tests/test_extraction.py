"""The synthetic extraction task (dgemma/extraction.py) and constrained autoregressive decoding: sentences hold the
fields their answer names, examples are reproducible, the scorer tells valid, partial and broken outputs apart, and
an AR decode under the task's schema (llguidance, one position at a time) always writes valid JSON."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from dgemma.autoregressive import generate_ar
from dgemma.constraint import Constraint, compile_grammar, ll_tokenizer
from dgemma.extraction import FIELDS, SCHEMA, ExtractionSource, Record, prompt_text, records, score
from dgemma.llm import LLM


@pytest.fixture(scope="module")
def llm():
    return LLM()  # the embedded default model: it writes no JSON by itself


def test_records_hold_their_fields_and_are_reproducible():
    rs = records(0, 200)
    assert [r.sentence for r in rs[:20]] == [r.sentence for r in records(0, 20)]
    assert [r.sentence for r in rs[:20]] != [r.sentence for r in records(1, 20)]
    assert len({r.sentence.split(" ")[1] for r in rs}) > 3  # several templates
    for r in rs:
        for f in FIELDS:
            assert str(r.fields[f]) in r.sentence
        obj = json.loads(r.target)
        assert list(obj) == list(FIELDS) and obj == r.fields
        jsonschema.validate(obj, SCHEMA)
        words = r.sentence.lower().split()
        for article, nxt in zip(words, words[1:]):  # "a" before a consonant sound, "an" before a vowel sound
            if article in ("a", "an"):
                assert (article == "an") == (nxt[0] in "aeiou" or nxt.startswith(("8", "18-"))), r.sentence


def test_score_counts_validity_and_fields():
    truths = [Record("s", {"name": "Alice", "age": 34, "city": "Lyon", "job": "baker"})] * 4
    outs = ['{"name":"Alice","age":34,"city":"Lyon","job":"baker"}',  # exact
            '{"name":"Alice","age":"34","city":"Oslo","job":"baker"}',  # age a string: invalid, 2 fields right
            '{"name":"Alice","age":34,"city":"Lyon"',  # not JSON
            '{"name":"Bob","age":34,"city":"Lyon","job":"baker","x":1}']  # extra member: invalid, 3 fields
    s = score(outs, truths)
    assert s["valid"] == 0.25 and s["exact"] == 0.25
    assert s["field_accuracy"] == pytest.approx((4 + 2 + 0 + 3) / 16)
    assert s["per_field"] == {"name": 0.5, "age": 0.5, "city": 0.5, "job": 0.75}
    with pytest.raises(ValueError):
        score(outs[:2], truths)


def test_source_gives_prompt_and_answer_tokens(llm):
    tok = llm.tokenizer
    src = ExtractionSource(tok, seed=3)
    prompt, response = src.example(7)
    r = records(3, 8)[7]
    assert src.example(7) == (prompt, response)
    assert prompt[0] == tok.bos_token_id and tok.decode(prompt) == prompt_text(r.sentence)
    assert tok.bos_token_id not in response and tok.decode(response) == r.target
    assert len(response) < llm.config.canvas_length  # one canvas holds the answer and its EOS


def test_constrained_ar_decode_writes_valid_json(llm):
    """The default model writes no JSON; greedy AR under the schema always does."""
    tok, model = llm.tokenizer, llm.model
    eos, V = tok.eos_token_id, model.config.text.vocab_size
    grammar = compile_grammar(json_schema=SCHEMA)
    rs = records(2, 4)
    prompts = [tok.encode(prompt_text(r.sentence)) for r in rs]
    free, _ = generate_ar(model, prompts, 24, eos_ids=(eos,))
    cons = [Constraint(grammar, ll_tokenizer(tok, V, eos), V, eos) for _ in rs]
    outs, _ = generate_ar(model, prompts, 120, eos_ids=(eos,), constraints=cons)
    assert score([tok.decode(o) for o in free], rs)["valid"] == 0
    for o, c in zip(outs, cons):
        assert o[-1] == eos and c.is_complete()
        jsonschema.validate(json.loads(tok.decode(o[:-1])), SCHEMA)
