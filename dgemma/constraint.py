"""Constrained decoding on the canvas: a JSON schema, a regex, a choice or a grammar imposed on a request's output.

The matching is llguidance's (`LLMatcher`: token masks for a prefix); this file only decides where on a canvas they
apply (docs/constrained.md). Per denoising step, `Constraint.mask` sweeps the canvas left to right from the state of
the committed text: position i's logits are masked to the tokens the matcher allows after the argmax of positions
< i, and the matcher (a scratch copy) then takes position i's argmax. Once the scratch matcher has taken EOS (which it
allows only where the constraint is complete), every later position is forced to EOS. The committed canvas is the
argmax, so every commit is a valid prefix and the request ends only where the constraint is complete. `commit`
advances the real matcher over the committed tokens: its state carries across canvases.

`compile_grammar` turns the user's fields into an llguidance grammar and validates it without a tokenizer, so a
bad schema or regex is rejected when the request is made (SamplingParams), with llguidance's message. A template
(dgemma/template.py) compiles to a grammar too, and adds pinned positions: {output position: token} that the sweep
forces (and the engine writes on the canvas before the first step), so they are never renoised.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


# What a disallowed logit becomes. Not -inf: the sampler's entropy skips its -inf guard when no top-k/top-p mask is
# set, and 0 * -inf is NaN (a NaN mean entropy never meets the stop rule, and NaN breaks the acceptance sort).
# -1e30 has probability exactly 0 after softmax, stays finite after the temperature divides it (T > 1e-8), and adds
# exactly 0 to the entropy.
MASKED = -1e30


class ConstraintError(ValueError):
    """A constraint that cannot be compiled or satisfied (the message says why)."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - the extra is part of the test install
        raise ConstraintError("constrained decoding needs llguidance: pip install 'dgemma[structured]'") from e
    return llguidance


def compile_grammar(json_schema: Any = None, regex: str | None = None, choice: tuple[str, ...] | None = None,
                    grammar: str | None = None, template: str | None = None) -> str:
    """An llguidance grammar for exactly one of the five kinds (a `grammar` is Lark text, llguidance's dialect; a
    `template` is dgemma/template.py's syntax); raises ConstraintError when it is invalid."""
    L = _llguidance()
    M = L.LLMatcher
    if json_schema is not None:
        schema = json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from e
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"json_schema must be a JSON object (got {type(schema).__name__})")
        try:  # compact JSON: flexible whitespace lets an untrained model spend a canvas on blanks
            grammar = M.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except Exception as e:  # llguidance raises ValueError/RuntimeError with its message
            raise ConstraintError(f"invalid json_schema: {e}") from e
    elif regex is not None:
        grammar = M.grammar_from_regex(regex)
    elif choice is not None:
        grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
    elif grammar is not None:
        lark, grammar = grammar, None
        grammar = M.grammar_from_lark(lark)
    elif template is not None:
        from .template import TemplateError, parse_template, template_lark
        try:
            grammar = M.grammar_from_lark(template_lark(parse_template(template)))
        except TemplateError as e:
            raise ConstraintError(str(e)) from None
    else:
        raise ConstraintError("no constraint given")
    failed, messages = M.validate_grammar_with_warnings(grammar)
    if failed:
        kind = ("json_schema" if json_schema is not None else "regex" if regex is not None
                else "choice" if choice is not None else "template (a hole's regex or schema)"
                if template is not None else "grammar")
        raise ConstraintError(f"invalid {kind}: " + "; ".join(m.strip() for m in messages))
    return grammar


_TOKENIZERS: dict[int, Any] = {}


def ll_tokenizer(tokenizer, vocab_size: int, eos_id: int):
    """llguidance's view of a dgemma `Tokenizer` (built once per tokenizer, vocabulary size and EOS)."""
    key = (id(tokenizer), vocab_size, eos_id)
    if key not in _TOKENIZERS:
        L = _llguidance()
        backend = tokenizer.backend
        _TOKENIZERS[key] = (tokenizer, L.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos_id))
    return _TOKENIZERS[key][1]


def template_pins(template: str, ll_tok) -> dict[int, int]:
    """{output position: token id} that a template pins (dgemma/template.py), tokenized by llguidance's view."""
    from .template import parse_template, pinned_tokens
    return pinned_tokens(parse_template(template), ll_tok.tokenize_str, ll_tok.decode_bytes)


@runtime_checkable
class CanvasConstraint(Protocol):
    """What the engine asks of a constraint plug-in (`Engine.add_request(..., constraint=...)`): `Constraint` below
    (llguidance) and `dgemma.sudoku.rules.SudokuRules` implement it. Called on the per-row path only.

    - `mask(logits)`: every denoising step, on one row's logits [C, V] (fp32, before the sampler): set the logits of
      disallowed tokens to MASKED in place and return the C tokens the constraint commits to (the canvas argmax the
      engine keeps). It must not change the committed state: any matcher it advances is a scratch copy.
    - `commit(tokens)`: the canvas the engine committed (the returned tokens of the last step, cut at a stop);
      the state advances and carries to the next canvas.
    - `is_complete()`: the committed output satisfies the constraint."""

    def mask(self, logits: Tensor) -> list[int]: ...

    def commit(self, tokens: list[int]) -> None: ...

    def is_complete(self) -> bool: ...


class Constraint:
    """One request's matcher: masks its canvas logits each step, advances on each commit.

    `pins` ({output position: token id}, from a template) are forced by the sweep; `canvas_pins` says which fall on
    the current canvas. After each `mask`, `allowed_counts` holds how many tokens each position allowed (for
    traces: 1 = forced, V = unconstrained)."""

    def __init__(self, grammar: str, ll_tok, vocab_size: int, eos_id: int, pins: dict[int, int] | None = None):
        L = _llguidance()
        self.matcher = L.LLMatcher(ll_tok, grammar)
        if self.matcher.is_error():
            raise ConstraintError(f"constraint cannot be used: {self.matcher.get_error()}")
        self.V, self.eos_id = vocab_size, eos_id
        self.pins = dict(pins or {})
        self.offset = 0  # output tokens committed so far: the output position of the canvas's first position
        self.allowed_counts: list[int] = []
        self._bits = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)

    def canvas_pins(self, canvas_length: int) -> dict[int, int]:
        """{canvas position: token} of the pins on the current canvas."""
        return {p - self.offset: t for p, t in self.pins.items() if self.offset <= p < self.offset + canvas_length}

    def _allowed(self, matcher) -> Tensor:
        """[V] bool: the tokens `matcher` accepts next."""
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32).to(torch.int64)
        return ((words[:, None] & self._bits) != 0).reshape(-1)[:self.V]

    def mask(self, logits: Tensor) -> list[int]:
        """Masks one canvas row of logits [C, V] in place (disallowed -> MASKED) by the left-to-right sweep; returns
        the canvas the sweep committed to (the argmax of each masked position), a valid prefix of the constraint.
        A pinned position allows its token only (which the matcher must allow there)."""
        scratch = self.matcher.deep_copy()
        masked = torch.tensor(MASKED, dtype=logits.dtype)
        pins = self.canvas_pins(logits.shape[0]) if self.pins else {}
        chosen, counts = [], []
        ended = scratch.is_stopped()
        for i in range(logits.shape[0]):
            row = logits[i]
            if ended:  # the constraint is complete: the rest of the canvas is EOS
                row.fill_(masked)
                row[self.eos_id] = 0.0
                chosen.append(self.eos_id)
                counts.append(1)
                continue
            allowed = self._allowed(scratch)
            if i in pins:
                tok = pins[i]
                if not bool(allowed[tok]):
                    raise ConstraintError(f"pinned token {tok} at canvas position {i} breaks the constraint")
                row.fill_(masked)
                row[tok] = 0.0
                counts.append(1)
            else:
                n = int(allowed.sum())
                if n == 0:
                    raise ConstraintError(f"the constraint allows no token: {scratch.get_error() or 'dead end'}")
                row.masked_fill_(~allowed, masked)
                tok = int(row.argmax())
                counts.append(n)
            chosen.append(tok)
            if not scratch.consume_token(tok):
                raise ConstraintError(f"matcher rejected an allowed token {tok}: {scratch.get_error()}")
            ended = tok == self.eos_id or scratch.is_stopped()
        self.allowed_counts = counts
        return chosen

    def commit(self, tokens: list[int]) -> None:
        """Advances the real matcher over a committed canvas (tokens after a consumed EOS are ignored)."""
        self.offset += len(tokens)
        for t in tokens:
            if self.matcher.is_stopped():
                break
            if not self.matcher.consume_token(int(t)):
                raise ConstraintError(f"committed token {t} breaks the constraint: {self.matcher.get_error()}")

    def is_complete(self) -> bool:
        """The committed text satisfies the constraint (EOS taken, or nothing more may follow)."""
        return self.matcher.is_stopped() or self.matcher.is_accepting()
