"""Infilling templates: fixed text spans and holes, compiled to one llguidance grammar plus pinned canvas positions.

A template is text with holes written `{{ ... }}` (docs/constrained.md, "Templates"):

    Name: {{max=8}}
    Age: {{regex="[0-9]{1,3}"}}
    Role: {{choice=["king", "queen", "fool"]}}

Inside a hole, options are `key=value` pairs separated by blanks, each value a JSON value (numbers, "strings" with
JSON escapes, [lists], {objects}); `{{}}` is a free hole with the default bound. Keys:

- `max=N`: at most N tokens (default 16). A free hole holds any text without the first character of the fixed text
  that follows it (that character is where the hole ends); a regex or choice hole ends where its pattern is complete
  and, once it has N tokens, at the first point it may (llguidance's `max_tokens`).
- `len=N`: exactly N tokens of any text (free holes only). The fixed text after it then sits at a known canvas
  position and is pinned. (A len= hole that ends the template holds at most N: EOS may come sooner.)
- `regex="..."`, `choice=[...]`, `json={...}` (a JSON schema): the hole's own constraint (at most one). A json hole is
  bounded by its schema (`maxLength`, `maxItems`, `enum`, ...): llguidance enforces token bounds only on terminals.
- `text="..."`: not a hole but fixed text (the way to write a literal `{{`).

`{{` always opens a hole; `}}` outside a hole is ordinary text. Two holes need fixed text between them.

What is constrained: the whole output must spell the template (the fixed spans byte for byte, every hole within its
rules, then EOS), which `template_grammar` states as one Lark grammar for the existing matcher and sweep. What is
pinned: the tokens of every fixed span whose output position is known before generation, i.e. each span preceded
only by fixed spans and `len=` holes (`pinned_tokens`). A pinned position holds its token on the canvas from the
first step and the sweep forces it on every step, so it is never renoised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 16
MAX_HOLE_TOKENS = 4096
_KEYS = ("max", "len", "regex", "choice", "json", "text")


class TemplateError(ValueError):
    """A malformed template (the message says where and why)."""


@dataclass(frozen=True)
class Fixed:
    """A fixed text span."""

    text: str


@dataclass(frozen=True)
class Hole:
    """A hole: free text, or a regex / choice / JSON schema; `max_tokens` bounds it, `exact` makes it exactly that."""

    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: a json hole, bounded by its schema
    exact: bool = False  # `len=N`: exactly max_tokens tokens of free text
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    json_schema: Any = None

    @property
    def free(self) -> bool:
        return self.regex is None and self.choice is None and self.json_schema is None


Part = Fixed | Hole


def parse_template(template: str) -> tuple[Part, ...]:
    """The parts of a template string, adjacent fixed text merged; raises TemplateError."""
    if not isinstance(template, str) or not template:
        raise TemplateError(f"template must be a non-empty string (got {template!r})")
    parts: list[Part] = []
    i = 0
    while i < len(template):
        j = template.find("{{", i)
        if j < 0:
            _add_text(parts, template[i:])
            break
        _add_text(parts, template[i:j])
        part, i = _parse_hole(template, j)
        if isinstance(part, Fixed):
            _add_text(parts, part.text)
        else:
            if parts and isinstance(parts[-1], Hole):
                raise TemplateError(f"template: the hole at character {j} follows another hole; put fixed text "
                                    "between them (where one ends and the next starts would be ambiguous)")
            parts.append(part)
    return tuple(parts)


def _add_text(parts: list[Part], text: str) -> None:
    if not text:
        return
    if parts and isinstance(parts[-1], Fixed):
        parts[-1] = Fixed(parts[-1].text + text)
    else:
        parts.append(Fixed(text))


def _parse_hole(s: str, start: int) -> tuple[Part, int]:
    """Parses the hole opening at s[start] ('{{'); returns it and the index after its '}}'."""
    at = f"template: hole at character {start}"
    i = start + 2
    opts: dict[str, Any] = {}
    decoder = json.JSONDecoder()
    while True:
        while i < len(s) and s[i] in " \t\r\n":
            i += 1
        if s.startswith("}}", i):
            i += 2
            break
        if i >= len(s):
            raise TemplateError(f"{at}: no closing '}}}}'")
        m = re.match(r"([A-Za-z_]+)\s*=\s*", s[i:])
        if m is None:
            raise TemplateError(f"{at}: expected key=value or '}}}}' at character {i} (keys: {', '.join(_KEYS)})")
        key = m.group(1)
        if key not in _KEYS:
            raise TemplateError(f"{at}: unknown key {key!r} (keys: {', '.join(_KEYS)})")
        if key in opts:
            raise TemplateError(f"{at}: {key} given twice")
        i += m.end()
        try:
            opts[key], i = decoder.raw_decode(s, i)
        except json.JSONDecodeError as e:
            raise TemplateError(f"{at}: the value of {key} is not a JSON value ({e.msg} at character {e.pos}); "
                                'strings are written in double quotes with JSON escapes, e.g. regex="[0-9]+"') from None
    return _make_hole(opts, at), i


def _make_hole(opts: dict[str, Any], at: str) -> Part:
    if "text" in opts:
        if len(opts) > 1 or not isinstance(opts["text"], str) or not opts["text"]:
            raise TemplateError(f"{at}: text= stands alone and is a non-empty string")
        return Fixed(opts["text"])
    for key in ("max", "len"):
        v = opts.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_HOLE_TOKENS):
            raise TemplateError(f"{at}: {key} must be an integer in [1, {MAX_HOLE_TOKENS}] (got {v!r})")
    if "max" in opts and "len" in opts:
        raise TemplateError(f"{at}: give max= or len=, not both")
    kinds = [k for k in ("regex", "choice", "json") if k in opts]
    if len(kinds) > 1:
        raise TemplateError(f"{at}: give at most one of regex, choice, json (got {', '.join(kinds)})")
    if kinds and "len" in opts:
        raise TemplateError(f"{at}: len= is for free-text holes; a {kinds[0]} hole takes max=")
    if "json" in opts:
        if "max" in opts:
            raise TemplateError(f"{at}: a json hole is bounded by its schema (maxLength, maxItems, enum, ...), "
                                "not by max=")
        if not isinstance(opts["json"], (dict, bool)):
            raise TemplateError(f"{at}: json must be a JSON schema object")
        return Hole(max_tokens=None, json_schema=opts["json"])
    bound = opts.get("len", opts.get("max", DEFAULT_MAX_TOKENS))
    if "regex" in opts:
        if not isinstance(opts["regex"], str) or not opts["regex"]:
            raise TemplateError(f"{at}: regex must be a non-empty string")
        return Hole(max_tokens=bound, regex=opts["regex"])
    if "choice" in opts:
        c = opts["choice"]
        if not isinstance(c, list) or not c or not all(isinstance(x, str) and x for x in c):
            raise TemplateError(f"{at}: choice must be a non-empty list of non-empty strings")
        return Hole(max_tokens=bound, choice=tuple(c))
    return Hole(max_tokens=bound, exact="len" in opts)


def _regex_literal(pattern: str) -> str:
    """A regex as a Lark /.../ literal: an unescaped '/' would end it, a raw control character break its line."""
    pattern = re.sub(r"[\x00-\x1f]", lambda m: f"\\x{{{ord(m.group()):x}}}", pattern)
    return "/" + re.sub(r"(?<!\\)/", r"\\/", pattern) + "/"


def template_lark(parts: tuple[Part, ...]) -> str:
    """The template as one Lark grammar (llguidance's dialect)."""
    seq, rules = [], []
    for k, part in enumerate(parts):
        if isinstance(part, Fixed):
            seq.append(json.dumps(part.text))
            continue
        name = f"hole{k}"
        seq.append(name)
        if part.json_schema is not None:
            schema = part.json_schema if isinstance(part.json_schema, bool) else \
                {**part.json_schema, "x-guidance": {"whitespace_flexible": False}}  # compact, as compile_grammar's
            rules.append(f"{name}: %json {json.dumps(schema)}")
            continue
        if part.regex is not None:
            body = _regex_literal(part.regex)
        elif part.choice is not None:
            body = " | ".join(json.dumps(c) for c in part.choice)
        else:
            nxt = parts[k + 1].text if k + 1 < len(parts) else ""
            # len=N: any text, greedy, so it ends only at its bound; max=N: anything but the next span's first char
            body = "/(?s:.+)/" if part.exact or not nxt else f"/[^\\x{{{ord(nxt[0]):x}}}]+/"
        rules.append(f"{name}[max_tokens={part.max_tokens}]: {name.upper()}")
        rules.append(f"{name.upper()}: {body}")
        if part.free and not (part.exact and _followed_by_text(parts, k)):
            seq[-1] = f"{name}?"  # a free hole may stay empty (its lexeme cannot), except a len= hole before text
    return "start: " + " ".join(seq) + "\n" + "\n".join(rules) + "\n"


def _followed_by_text(parts: tuple[Part, ...], k: int) -> bool:
    return k + 1 < len(parts) and isinstance(parts[k + 1], Fixed)


def pinned_tokens(parts: tuple[Part, ...], tokenize, token_bytes) -> dict[int, int]:
    """{output position: token id} of the fixed spans whose position is known before generation.

    `tokenize(text) -> list[int]` and `token_bytes(ids) -> bytes` are the tokenizer's (llguidance's view). A span is
    pinned only if its tokens spell it byte for byte; pinning stops at the first hole of unknown length (anything
    but a `len=` hole followed by fixed text) or span that does not tokenize exactly."""
    pins: dict[int, int] = {}
    offset = 0
    for k, part in enumerate(parts):
        if isinstance(part, Fixed):
            ids = list(tokenize(part.text))
            if token_bytes(ids) != part.text.encode("utf-8"):
                break
            pins.update({offset + j: t for j, t in enumerate(ids)})
            offset += len(ids)
        elif part.exact and _followed_by_text(parts, k):
            offset += part.max_tokens
        else:
            break
    return pins


def match_output(parts: tuple[Part, ...], pieces: list[bytes]) -> list[tuple[str, int]] | None:
    """Checks an output against its template: each hole's (text, tokens it overlaps), or None where the text does not
    spell the template (fixed spans byte for byte; each hole's text matching its rule, by Python's `re`; a json hole
    parsing as JSON). `pieces` are the output tokens' bytes, EOS excluded. Used by tests and benchmarks."""
    text = b"".join(pieces).decode("utf-8", errors="replace")
    pattern = ""
    for k, part in enumerate(parts):
        if isinstance(part, Fixed):
            pattern += re.escape(part.text)
        elif part.regex is not None:
            pattern += f"({part.regex})"
        elif part.choice is not None:
            pattern += "(" + "|".join(map(re.escape, part.choice)) + ")"
        elif part.json_schema is not None or part.exact or not _followed_by_text(parts, k):
            pattern += "(.*?)" if part.json_schema is not None else "(.*)"
        else:
            pattern += f"([^{re.escape(parts[k + 1].text[0])}]*)"
    m = re.fullmatch(pattern, text, flags=re.DOTALL)
    if m is None:
        return None
    ends, pos = [], 0  # character offset where each token ends
    for p in pieces:
        pos += len(p.decode("utf-8", errors="replace"))
        ends.append(pos)
    out = []
    for g, part in enumerate([p for p in parts if isinstance(p, Hole)], 1):
        a, b = m.span(g)
        if part.json_schema is not None:
            try:
                json.loads(m.group(g))
            except json.JSONDecodeError:
                return None
        starts = [0] + ends[:-1]
        out.append((m.group(g), sum(1 for s, e in zip(starts, ends) if s < b and e > a)))
    return out
