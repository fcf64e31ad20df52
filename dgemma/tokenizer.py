"""Tokenizer and chat template for dgemma checkpoints, without depending on transformers.

`Tokenizer.from_dir(path)` reads a checkpoint folder the way transformers 5 does
(`tokenizer.json` + `tokenizer_config.json` + optional `chat_template.jinja`,
`additional_chat_templates/*.jinja` and `special_tokens_map.json`) and reproduces
`AutoTokenizer.from_pretrained(path)` for the generic `tokenizers`-backed case:

* `encode` gives the same ids as `tok(text)["input_ids"]`;
* `decode` gives the same text as `tok.decode(ids, skip_special_tokens=...)`;
* `apply_chat_template` renders with the same sandboxed jinja2 environment and variables.

Rules copied in behaviour (not in code) from transformers 5.23, checked by tests/test_tokenizer.py:

* BOS/EOS: when tokenizer.json exists, `add_bos_token` / `add_eos_token` in tokenizer_config.json
  are dropped on load. Whether a BOS is added is decided only by tokenizer.json's post-processor.
* Named special tokens (bos/eos/unk/sep/pad/cls/mask, any other `*_token` key, the
  `extra_special_tokens` / `additional_special_tokens` list) that are missing from the backend are
  appended to it as special added tokens, so they get new ids at the end.
* `special_tokens_map.json` is read only when tokenizer_config.json has no `added_tokens_decoder`,
  and then its values override the config's.
* Truncation/padding stored in tokenizer.json are not applied by a plain call, so they are turned off.

`IncrementalDecoder` turns a growing stream of token ids into text deltas for streaming output.
It never emits a half-finished multi-byte character (byte-level BPE often splits one across tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

__all__ = [
    "Tokenizer",
    "IncrementalDecoder",
    "TokenizerFileError",
    "compile_chat_template",
    "render_chat_template",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# The standard named special tokens, in the order transformers lists them (this order shows up in
# `all_special_ids`).
NAMED_SPECIAL_TOKENS: tuple[str, ...] = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Message fields a reasoning trace may arrive under. transformers copies the first one found into
# `reasoning_content` (the standard name) and `thinking` (what gpt-oss style templates read).
_REASONING_FIELDS: tuple[str, ...] = ("reasoning_content", "thinking", "reasoning")

# Appended to the final message for `continue_final_message`, to find where it ends after rendering.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

TokenSpec = str | AddedToken


class TokenizerFileError(ValueError):
    """A tokenizer file exists but cannot be parsed. The message names the file."""


# --------------------------------------------------------------------------------------------
# Reading the checkpoint folder
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path} is not valid UTF-8 text: {e}") from e


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e


def _read_json_object(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _to_added_token(value: Any, *, special: bool | None = None) -> TokenSpec | None:
    """Turn a token entry from a config file (a string or a serialized AddedToken dict) into a token spec."""
    if value is None or isinstance(value, (str, AddedToken)):
        return value
    if isinstance(value, dict) and "content" in value:
        allowed = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
        kwargs = {k: v for k, v in value.items() if k in allowed}
        if special is not None:
            kwargs["special"] = special
        return AddedToken(**kwargs)
    return None


def _token_str(token: TokenSpec) -> str:
    return token.content if isinstance(token, AddedToken) else str(token)


def _load_chat_templates(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """Chat template(s): .jinja files win over the `chat_template` entry of tokenizer_config.json."""
    templates: dict[str, str] = {}
    default_file = folder / CHAT_TEMPLATE_FILE
    if default_file.is_file():
        templates["default"] = _read_text(default_file)
    extra_dir = folder / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = _read_text(f)
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates

    value = config.get("chat_template")
    if isinstance(value, list):  # the legacy multi-template form: [{"name": ..., "template": ...}]
        return {entry["name"]: entry["template"] for entry in value}
    if value is None or isinstance(value, (str, dict)):
        return value
    raise TokenizerFileError(
        f"{folder / TOKENIZER_CONFIG_FILE}: 'chat_template' should be a string or a list, got {type(value).__name__}"
    )


def _special_tokens_from_files(
    folder: Path, config: Mapping[str, Any]
) -> tuple[dict[str, TokenSpec], list[TokenSpec], dict[int, AddedToken]]:
    """Named special tokens, extra special tokens and `added_tokens_decoder`, resolved like transformers 5."""
    named: dict[str, TokenSpec] = {}
    for key, value in config.items():
        if key in NAMED_SPECIAL_TOKENS or (key.endswith("_token") and isinstance(value, (str, dict))):
            token = _to_added_token(value)
            if token is not None:
                named[key] = token
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # {name: token}: named, model-specific tokens
        for key, value in extra.items():
            token = _to_added_token(value)
            if token is not None:
                named[key] = token
        extra = None
    # The transformers 4 name still counts unless a non-empty v5 list is present.
    extra = extra or config.get("additional_special_tokens") or []
    if not isinstance(extra, (list, tuple)):
        raise TokenizerFileError(f"{folder / TOKENIZER_CONFIG_FILE}: the extra special tokens should be a list")
    extra_tokens: list[TokenSpec] = [t for t in (_to_added_token(v) for v in extra) if t is not None]

    added: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in config:
        decoder = config["added_tokens_decoder"]
        if not isinstance(decoder, dict):
            raise TokenizerFileError(f"{folder / TOKENIZER_CONFIG_FILE}: 'added_tokens_decoder' should be an object")
        for idx, value in decoder.items():
            token = _to_added_token(value)
            if isinstance(token, AddedToken):
                added[int(idx)] = token
    else:
        # Legacy file, read by transformers only when the config has no added_tokens_decoder;
        # its entries then override the config's.
        stm_file = folder / SPECIAL_TOKENS_MAP_FILE
        if stm_file.is_file():
            stm = _read_json_object(stm_file)
            for key, value in stm.items():
                if key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                    for v in value:
                        token = _to_added_token(v, special=True)
                        if token is not None and _token_str(token) not in map(_token_str, extra_tokens):
                            extra_tokens.append(token)
                elif key.endswith("_token"):
                    token = _to_added_token(value, special=True)
                    if token is not None:
                        named[key] = token

    return named, extra_tokens, added


# --------------------------------------------------------------------------------------------
# Chat template rendering (sandboxed jinja2, configured like transformers)
# --------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` and render the body unchanged.

    Training-oriented templates wrap assistant text in this tag (transformers uses it to build an
    assistant-token mask). Without the extension such templates would not even parse.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block (like transformers) so scoping of `{% set %}` inside the tag is identical.
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' and sorts keys; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeDict:
    """The template's `dict`: building dicts is allowed, reaching the real `dict` type is not."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (a route to interpreter internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore-prefixed namespace attributes, got {name!r}"
            )


@lru_cache(maxsize=1)
def _jinja_env() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    # Templates come from checkpoints (untrusted), hence the immutable sandbox. trim_blocks and
    # lstrip_blocks are what every HF chat template is written against.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    return env


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile (and cache) a chat template in the transformers-compatible sandbox."""
    return _jinja_env().from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, as transformers does before rendering.

    This keeps rich objects (tensors, images, pydantic models, enums) from reaching the sandbox,
    and makes their rendering match transformers: pydantic models and dataclasses become dicts,
    str/int/float subclasses become the base type, anything else becomes "<TypeName>".
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # bool is handled above by exact type
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item):  # numpy scalars, e.g. np.bool_
        return _plain(item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # pydantic
        return _plain(dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    # `thinking` goes first so an explicit `thinking` key in the message keeps its value.
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat_template(
    template: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool | str = False,
    **template_kwargs: Any,
) -> str:
    """Render one conversation with `template`, following transformers' `apply_chat_template` rules.

    Template variables: `messages`, `tools`, `documents`, `add_generation_prompt`, plus
    `template_kwargs` (the caller puts the special tokens there). Keys whose value is None are
    dropped from messages (many templates print "None" otherwise).
    """
    if len(messages) == 0:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt are not compatible: use continue_final_message "
            "to let the model continue the last message, add_generation_prompt to open a new model turn."
        )
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise ValueError(
                    f"Tools should be JSON schemas (dicts); got {type(tool).__name__}. "
                    "Convert Python functions with transformers.utils.get_json_schema first."
                )
    if documents is not None:
        for doc in documents:
            if not isinstance(doc, Mapping):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")

    chat: list[dict[str, Any]] = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        chat.append(_alias_reasoning({k: v for k, v in message.items() if v is not None}))

    final_text: str | None = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        last = chat[-1]
        final_value = last.get(field)
        if final_value is None:
            raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
        fields = [field]
        if field in _REASONING_FIELDS:  # reasoning was copied under several names: tag every copy
            fields = [f for f in _REASONING_FIELDS if last.get(f) == final_value]
        if not any(f in template for f in fields):
            raise ValueError(
                f'continue_final_message is set to "{field}" but this is not an accepted field in the chat_template'
            )
        if isinstance(final_value, (list, tuple)):
            # Multimodal content: continue the last text block.
            for block in reversed(final_value):
                if "text" in block:
                    final_text = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError(
                    "continue_final_message is set but we could not find any text to continue in the final message!"
                )
        else:
            final_text = final_value
            for f in fields:
                last[f] = last[f] + _CONTINUE_TAG

    rendered = compile_chat_template(template).render(
        messages=chat,
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(template_kwargs),
    )

    if final_text is not None:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise ValueError(
                "continue_final_message is set but the final message does not appear in the rendered chat; "
                f"the template may alter it. Final message: {final_text.strip()!r}"
            )
        at = rendered.rindex(tag)
        if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:at]
        else:  # the template trimmed trailing spacing, so trim ours too
            rendered = rendered[:at].rstrip()
    return rendered


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers` backend plus the special tokens and chat template(s) of a checkpoint.

    Build it with `Tokenizer.from_dir(folder)`. The constructor takes ownership of `backend` and
    changes it (turns off stored truncation/padding, adds missing special tokens).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, TokenSpec | None] | None = None,
        extra_special_tokens: Sequence[TokenSpec] = (),
        added_tokens: Mapping[int, AddedToken] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        split_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
        force_clean_up_for_bpe: bool = False,
        name_or_path: str = "",
    ) -> None:
        """
        Args:
            backend: the `tokenizers.Tokenizer` (normally from tokenizer.json).
            special_tokens: named special tokens, e.g. {"bos_token": "<bos>", "image_token": "<img>"}.
                These are also the template variables of the same names.
            extra_special_tokens: unnamed special tokens (transformers' `extra_special_tokens`).
            added_tokens: id -> AddedToken from tokenizer_config.json's `added_tokens_decoder`;
                ones the backend lacks are appended (in id order).
            chat_template: one template, or {name: template} with a "default" entry.
            split_special_tokens: encode special-token strings in the text as plain text.
            clean_up_tokenization_spaces: transformers' old " ." -> "." cleanup on decode; like
                transformers 5, it is ignored for BPE models unless `force_clean_up_for_bpe`.
        """
        self._backend = backend
        self.name_or_path = name_or_path
        self.chat_template: str | dict[str, str] | None = (
            dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        )

        named: dict[str, TokenSpec] = {}
        for key, value in (special_tokens or {}).items():
            if value is not None:
                named[key] = value
        # A pad token stored in tokenizer.json's padding settings counts when the config has none.
        padding = backend.padding
        if padding is not None and "pad_token" not in named and padding.get("pad_token"):
            named["pad_token"] = padding["pad_token"]
        # Standard names first, then the model-specific ones, like transformers' special-token map.
        self._named: dict[str, TokenSpec] = {k: named[k] for k in NAMED_SPECIAL_TOKENS if k in named}
        self._named.update({k: v for k, v in named.items() if k not in NAMED_SPECIAL_TOKENS})
        self._extra: list[TokenSpec] = list(extra_special_tokens)

        # A plain transformers call neither truncates nor pads, whatever tokenizer.json says.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(split_special_tokens)
        self._add_missing_tokens(added_tokens or {})

        model_type = type(backend.model).__name__
        self._clean_up = bool(clean_up_tokenization_spaces) and (model_type != "BPE" or force_clean_up_for_bpe)

    def _add_missing_tokens(self, added_tokens: Mapping[int, AddedToken]) -> None:
        """Append to the backend the added/special tokens it does not know yet (transformers does too).

        Order matters because it decides the new ids: config `added_tokens_decoder` entries by id,
        then named special tokens, then extra special tokens.
        """
        present = {tok.content for tok in self._backend.get_added_tokens_decoder().values()}
        named_strs = {_token_str(t) for t in self._named.values()}
        to_add: list[AddedToken] = []
        for tok in [*(t for _, t in sorted(added_tokens.items())), *self._named.values(), *self._extra]:
            content = _token_str(tok)
            if content in present:
                continue
            if isinstance(tok, str):
                tok = AddedToken(tok, special=True, normalized=False)
            elif content in named_strs and not tok.special:  # a named special token is always special
                tok = AddedToken(
                    content,
                    single_word=tok.single_word,
                    lstrip=tok.lstrip,
                    rstrip=tok.rstrip,
                    normalized=tok.normalized,
                    special=True,
                )
            to_add.append(tok)
            present.add(content)
        if to_add:
            self._backend.add_tokens(to_add)

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer from a checkpoint folder (the layout `save_pretrained` writes)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        tok_file = folder / TOKENIZER_FILE
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"{tok_file} not found: the folder has no {TOKENIZER_FILE} "
                "(dgemma only loads `tokenizers` JSON tokenizers, not sentencepiece/vocab files)"
            )
        text = _read_text(tok_file)
        try:
            backend = BackendTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON / schema
            raise TokenizerFileError(f"{tok_file} is corrupt or not a tokenizers JSON file: {e}") from e

        config_file = folder / TOKENIZER_CONFIG_FILE
        config = _read_json_object(config_file) if config_file.is_file() else {}

        named, extra_tokens, added = _special_tokens_from_files(folder, config)
        return cls(
            backend,
            special_tokens=named,
            extra_special_tokens=extra_tokens,
            added_tokens=added,
            chat_template=_load_chat_templates(folder, config),
            split_special_tokens=bool(config.get("split_special_tokens", False)),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            force_clean_up_for_bpe=bool(
                config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
            ),
            name_or_path=str(folder),
        )

    # ---- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; `add_special_tokens` applies tokenizer.json's post-processor (e.g. BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend)."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = True) -> str:
        """Text for `ids` (a list, tuple, 1-D tensor/array, or a single id)."""
        text = self._backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            text = _clean_up_tokenization(text)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    # ---- chat ------------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: Sequence[Any] | None = None) -> str:
        """Pick the template: an explicit one, a named one, "tool_use" when tools are given, or "default"."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None and chat_template in own:
                return own[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in own:
                    return own["tool_use"]
                if "default" in own:
                    return own["default"]
                raise ValueError(
                    "This tokenizer has several chat templates and none is named 'default'; pass chat_template= "
                    f"one of {sorted(own)}."
                )
            return chat_template
        if chat_template is not None:
            return chat_template
        if own is None:
            where = f" in {self.name_or_path}" if self.name_or_path else ""
            raise ValueError(
                f"No chat template{where}: add {CHAT_TEMPLATE_FILE} (or 'chat_template' in "
                f"{TOKENIZER_CONFIG_FILE}) or pass chat_template=."
            )
        return own

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool | None = None,
        tokenize: bool = False,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool | str = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation like transformers' `apply_chat_template`, returning a str or ids.

        `add_generation_prompt` defaults to True (unlike transformers) unless `continue_final_message`
        is set. Special tokens (`bos_token`, `eos_token`, ...) are template variables; extra keyword
        arguments (e.g. `enable_thinking=False`) are too, and override them. With `tokenize=True`
        the rendered text is encoded without adding special tokens: the template writes its own.
        """
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        template = self.get_chat_template(chat_template, tools)
        variables = {**self.special_tokens_map, **template_kwargs}
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            **variables,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- special tokens & sizes ------------------------------------------------------------------

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as strings, e.g. {"bos_token": "<bos>", ...}."""
        return {k: _token_str(v) for k, v in self._named.items()}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens, then extra ones, without duplicates (transformers' order)."""
        out: list[str] = []
        for tok in [*self._named.values(), *self._extra]:
            s = _token_str(tok)
            if s not in out:
                out.append(s)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        return [self._id_or_unk(t) for t in self.all_special_tokens]

    def _named_token(self, key: str) -> str | None:
        tok = self._named.get(key)
        return None if tok is None else _token_str(tok)

    def _id_or_unk(self, token: str) -> int | None:
        idx = self._backend.token_to_id(token)
        if idx is None:  # transformers maps unknown strings to the unk id
            unk = self._named_token("unk_token")
            return None if unk is None else self._backend.token_to_id(unk)
        return idx

    def _named_id(self, key: str) -> int | None:
        tok = self._named_token(key)
        return None if tok is None else self._id_or_unk(tok)

    @property
    def bos_token(self) -> str | None:
        return self._named_token("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._named_token("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._named_token("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._named_token("unk_token")

    @property
    def mask_token(self) -> str | None:
        return self._named_token("mask_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def mask_token_id(self) -> int | None:
        return self._named_id("mask_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (= len(AutoTokenizer)); size embeddings with this.

        Note: transformers' `tokenizer.vocab_size` excludes added tokens; that is `base_vocab_size` here.
        """
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def base_vocab_size(self) -> int:
        """Vocabulary of the model proper, without added tokens (transformers' `vocab_size`)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"special_tokens={self.special_tokens_map})"
        )


def _as_id_list(ids: Iterable[int] | int) -> list[int]:
    if isinstance(ids, int):
        return [ids]
    tolist = getattr(ids, "tolist", None)  # torch tensors and numpy arrays
    if callable(tolist):
        ids = tolist()
        if isinstance(ids, int):
            return [ids]
    return [int(i) for i in ids]


def _clean_up_tokenization(text: str) -> str:
    """transformers' legacy decode cleanup (only active for non-BPE tokenizers that ask for it)."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


# --------------------------------------------------------------------------------------------
# Streaming detokenization
# --------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turn token ids that arrive in chunks into text deltas.

    Byte-level BPE (and byte-fallback) tokenizers can split one character over several tokens; decoding
    a prefix then ends in U+FFFD replacement characters. This decoder holds such a trailing run back
    until the character completes (or until `flush()`), so the concatenation of everything returned
    equals `tokenizer.decode(all_ids)`.

    Only a window is decoded each time: the tokens since the last point where the text was complete
    (as vLLM and TGI do). Starting the window there rather than at the new tokens gives decoders that
    treat the start of a sequence specially (e.g. SentencePiece dropping a leading space) the same
    context as a full decode, and keeps the cost per step proportional to the chunk size.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and start a new stream."""
        self._ids: list[int] = []
        self._start = 0  # first token of the decode window
        self._emitted = 0  # characters of the window's text already returned
        self._last_clean = 0  # token count at the latest push whose text had no pending character

    @property
    def token_ids(self) -> list[int]:
        """All ids pushed so far."""
        return list(self._ids)

    def _window_text(self) -> str:
        return self._tokenizer.decode(self._ids[self._start :], skip_special_tokens=self._skip)

    def push(self, ids: Iterable[int] | int) -> str:
        """Add token ids; return the text that became final (possibly "")."""
        self._ids.extend(_as_id_list(ids))
        text = self._window_text()
        # A trailing U+FFFD may be a character whose remaining bytes are still to come: hold it.
        stable = len(text.rstrip("\ufffd"))
        delta = text[self._emitted : stable] if stable > self._emitted else ""
        self._emitted = max(self._emitted, stable)
        if stable == len(text):
            # Everything so far has been returned, so `_last_clean` is a character boundary. Move the
            # window start up to the previous such boundary: the text of the new window is all out.
            if self._last_clean > self._start:
                self._start = self._last_clean
                self._emitted = len(self._window_text())
            self._last_clean = len(self._ids)
        return delta

    def flush(self) -> str:
        """Return whatever is held back (e.g. a truly invalid byte sequence, as U+FFFD) at stream end."""
        text = self._window_text()
        delta = text[self._emitted :]
        self._emitted = max(self._emitted, len(text))
        return delta
