"""A synthetic extraction task for studying constrained decoding on a model that has learned it: a sentence about
a person -> a JSON object with four fields.

    "Alice, 34, lives in Lyon and works as a baker."  ->  {"name":"Alice","age":34,"city":"Lyon","job":"baker"}

`record(rng)` draws a person and a sentence (one of several templates), `ExtractionSource(tokenizer, seed)` is a
trainer example source (`dgemma.train`: example i is a pure function of (seed, i)), `SCHEMA` is the JSON schema a
decoder may be constrained with, and `score` checks outputs: JSON validity against the schema (`jsonschema`, the
test extra) and per-field accuracy. benchmarks/extraction.py fine-tunes a model on it and compares decoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

NAMES = ("Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Liam",
         "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wen", "Xavier",
         "Yara", "Zoe", "Amir", "Bianca", "Carlos", "Dana")
CITIES = ("Lyon", "Porto", "Oslo", "Kyoto", "Lima", "Cairo", "Dublin", "Quebec", "Bergen", "Seville", "Krakow",
          "Nairobi", "Hanoi", "Tallinn", "Geneva", "Austin", "Perth", "Bologna", "Leeds", "Ghent", "Malmo", "Tunis",
          "Cusco", "Riga", "Split", "Lisbon", "Munich", "Osaka", "Quito", "Zagreb")
JOBS = ("baker", "nurse", "pilot", "teacher", "plumber", "lawyer", "chef", "dentist", "farmer", "architect",
        "engineer", "painter", "tailor", "librarian", "surgeon", "carpenter", "florist", "journalist", "pharmacist",
        "electrician", "actor", "mechanic", "translator", "butcher", "gardener", "potter", "jeweller", "welder",
        "economist", "optician")
AGES = (18, 90)  # inclusive
TEMPLATES = (
    "{name}, {age}, lives in {city} and works as {a} {job}.",
    "{name} is {a} {age}-year-old {job} from {city}.",
    "Meet {name}: {a} {job}, {age} years old, based in {city}.",
    "In {city}, {name} ({age}) works as {a} {job}.",
    "{name} works as {a} {job} in {city} and is {age} years old.",
    "Age {age}, job {job}, home {city}: that is {name}.",
)
FIELDS = ("name", "age", "city", "job")
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 16},
                   "age": {"type": "integer", "minimum": 0, "maximum": 130},
                   "city": {"type": "string", "minLength": 1, "maxLength": 16},
                   "job": {"type": "string", "minLength": 1, "maxLength": 16}},
    "required": list(FIELDS),
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Record:
    sentence: str
    fields: dict

    @property
    def target(self) -> str:
        """The answer as compact JSON, fields in schema order."""
        return json.dumps(self.fields, separators=(",", ":"))


def record(rng: np.random.Generator) -> Record:
    """One person and one sentence about them, drawn from `rng`."""
    fields = {"name": str(rng.choice(NAMES)), "age": int(rng.integers(AGES[0], AGES[1] + 1)),
              "city": str(rng.choice(CITIES)), "job": str(rng.choice(JOBS))}
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    if "{a} {age}" in template:  # "an 18-year-old", "an 80-year-old", "a 34-year-old"
        a = "an" if str(fields["age"]).startswith(("8", "18")) else "a"
    else:
        a = "an" if fields["job"][0] in "aeiou" else "a"
    return Record(template.format(a=a, **fields), fields)


def prompt_text(sentence: str) -> str:
    """What the model reads: the sentence and a cue."""
    return f"{sentence}\nJSON: "


def records(seed: int, n: int) -> list[Record]:
    """`n` records, record i drawn from `np.random.default_rng([seed, i])` (the same as `ExtractionSource`'s)."""
    return [record(np.random.default_rng([seed, i])) for i in range(n)]


class ExtractionSource:
    """Trainer examples: prompt `<bos>` + the sentence and cue, response the JSON answer (the trainer adds EOS)."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer, self.seed = tokenizer, seed

    def example(self, index: int) -> tuple[list[int], list[int]]:
        r = record(np.random.default_rng([self.seed, index]))
        return (self.tokenizer.encode(prompt_text(r.sentence)),
                self.tokenizer.encode(r.target, add_special_tokens=False))


def score(outputs: list[str], truths: list[Record]) -> dict:
    """Validity and accuracy of decoded outputs: `valid` (JSON satisfying SCHEMA), `field_accuracy` (share of the
    four fields equal to the truth; an output that is not a JSON object scores 0 on every field), `exact` (all four
    right), `per_field`."""
    import jsonschema

    if len(outputs) != len(truths):
        raise ValueError(f"{len(outputs)} outputs for {len(truths)} records")
    valid = exact = 0
    right = dict.fromkeys(FIELDS, 0)
    for text, truth in zip(outputs, truths):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            try:
                jsonschema.validate(obj, SCHEMA)
                valid += 1
            except jsonschema.ValidationError:
                pass
            hits = [obj.get(f) == truth.fields[f] and type(obj.get(f)) is type(truth.fields[f]) for f in FIELDS]
            for f, h in zip(FIELDS, hits):
                right[f] += h
            exact += all(hits)
    n = max(1, len(truths))
    return {"n": len(truths), "valid": valid / n, "field_accuracy": sum(right.values()) / (n * len(FIELDS)),
            "exact": exact / n, "per_field": {f: right[f] / n for f in FIELDS}}
