"""Prompts for the server: refuse the obviously too long by characters, tokenise off the GIL, chat variables.

    enc = PromptEncoder(llm.tokenizer, max_model_len)
    enc.check_chars(len(text), "prompt")          # RequestError before any tokenising if it cannot fit
    ids = await asyncio.to_thread(enc.encode, text) # RequestError if it has max_model_len tokens or more

`tokenizers`' `encode` holds the GIL for its whole run (seconds for a few MB), which would freeze the event loop
and the engine thread alike; its batch entry point releases the GIL while it works. The server encodes one text at
a time through that entry point, on a copy of the tokenizer that truncates at `max_model_len` tokens, so what comes
back to Python (the only part that needs the GIL) is at most `max_model_len` ids.

The character bound: a token covers at most `max_chars` characters of the text, the longest vocabulary entry
(byte-level vocabularies spell one byte per character, and a character is at least one byte). So a text of more
than `max_model_len * max_chars` characters has more than `max_model_len` tokens and is refused without being
tokenised. Pipelines that can delete characters (whitespace-removing pre-tokenizers, most normalizers, added
tokens that swallow spaces) break that argument: for those there is no character bound, only the token count.
"""

from __future__ import annotations

import json
from functools import lru_cache

from .protocol import RequestError

# Normalizers and pre-tokenizers that never turn a text into fewer characters than it had.
_SAFE_NORMALIZERS = {"NFD", "Lowercase", "Prepend", "ByteLevel"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}
# Variables the server itself passes to the chat template: clients may not set them.
RESERVED_TEMPLATE_VARIABLES = {"messages", "add_generation_prompt", "tools", "documents", "tokenize", "chat_template",
                               "continue_final_message"}


def _keeps_characters(spec: dict | None, safe: set[str]) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        parts = spec.get("normalizers", spec.get("pretokenizers", []))
        return all(_keeps_characters(p, safe) for p in parts)
    if kind == "Replace":  # e.g. " " -> "▁" (Gemma): safe while nothing is replaced by something shorter
        pattern = spec.get("pattern", {})
        return "String" in pattern and len(spec.get("content", "")) >= len(pattern["String"]) > 0
    if kind == "Split" and spec.get("behavior") == "Removed":
        return False
    return kind in safe


def max_chars_per_token(backend) -> int | None:
    """The most characters of input one token can stand for, or None where the pipeline can delete characters."""
    spec = json.loads(backend.to_str())
    if not (_keeps_characters(spec.get("normalizer"), _SAFE_NORMALIZERS)
            and _keeps_characters(spec.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS)):
        return None
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE":
        return None  # WordPiece and Unigram can spell a whole unknown word as one unknown token
    if not (byte_level or model.get("byte_fallback")) and (model.get("fuse_unk") or not model.get("unk_token")):
        return None  # characters outside the vocabulary are dropped, or a run of them becomes one token
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens", [])):
        return None  # such tokens absorb the whitespace around them
    return max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)


class PromptEncoder:
    def __init__(self, tokenizer, max_model_len: int):
        from tokenizers import Tokenizer as Backend

        self.tokenizer, self.max_len = tokenizer, max_model_len
        self.max_chars = None
        if tokenizer is not None:
            self._backend = Backend.from_str(tokenizer.backend.to_str())
            self._backend.enable_truncation(max_model_len)  # a prompt this long is refused anyway: keep no more
            self._backend.no_padding()
            per_token = max_chars_per_token(self._backend)
            self.max_chars = None if per_token is None else max_model_len * per_token
            self._batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)

    def too_long(self, n_tokens: int, param: str, at_least: bool = False) -> RequestError:
        has = f"at least {n_tokens}" if at_least else str(n_tokens)
        return RequestError(f"the prompt has {has} tokens but max_model_len is {self.max_len}: at least one token "
                            "must be left for the output", param=param, code="context_length_exceeded")

    def check_chars(self, n_chars: int, param: str) -> None:
        """Refuse, before tokenising, a text too long to fit whatever its tokens (see the module docstring)."""
        if self.max_chars is not None and n_chars > self.max_chars:
            raise RequestError(f"the prompt has {n_chars} characters, more than max_model_len ({self.max_len}) "
                               f"tokens can hold: at most {self.max_chars} characters fit (one token stands for "
                               f"at most {self.max_chars // self.max_len})", param=param,
                               code="context_length_exceeded")

    def encode(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, without holding the GIL while tokenising (call it from a worker thread)."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer.json: send token ids instead of text", param=param)
        self.check_chars(len(text), param)
        ids = self._batch([text], add_special_tokens=add_special_tokens)[0].ids
        if len(ids) >= self.max_len:
            raise self.too_long(len(ids), param, at_least=True)
        return ids

    def template_variables(self) -> frozenset[str]:
        """Names the chat template reads that a client may set through `chat_template_kwargs`."""
        return _template_variables(self.tokenizer.get_chat_template())

    def template_kwargs(self, template_kwargs: dict | None) -> dict:
        """A request's `chat_template_kwargs`, checked: only variables the chat template reads (400 otherwise)."""
        kwargs = dict(template_kwargs or {})
        try:
            allowed = self.template_variables()
        except ValueError as e:  # no chat template
            raise RequestError(str(e), param="messages") from None
        for name in kwargs:
            if name not in allowed:
                raise RequestError(f"'{name}' is not a variable of this model's chat template; it reads "
                                   f"{sorted(allowed)}", param=f"chat_template_kwargs.{name}")
        return kwargs

    def render_chat(self, messages: list[dict], template_kwargs: dict | None) -> str:
        """The chat prompt as text (template errors are the client's: a 400 naming the messages)."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer: chat needs tokenizer.json and a chat template",
                               param="messages")
        kwargs = self.template_kwargs(template_kwargs)
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        except Exception as e:  # e.g. a template's raise_exception("roles must alternate")
            raise RequestError(f"chat template: {e}", param="messages") from None


@lru_cache(maxsize=8)
def _template_variables(template: str) -> frozenset[str]:
    import jinja2.meta

    from ..tokenizer import compile_chat_template

    env = compile_chat_template(template).environment
    names = jinja2.meta.find_undeclared_variables(env.parse(template))
    return frozenset(names - RESERVED_TEMPLATE_VARIABLES - set(env.globals))
