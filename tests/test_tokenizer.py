"""Tests for dgemma.tokenizer and dgemma.tokenizer_train, checked against transformers 5.23.

A tiny byte-level BPE (vocab 300) is trained in a temp folder once per module; every behaviour
(encode, decode, special tokens, chat templates) is compared with `AutoTokenizer` loading the same
folder. Helpers live in this file on purpose (tests/conftest.py belongs to the lead).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import jinja2.exceptions
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers

from dgemma.tokenizer import IncrementalDecoder, Tokenizer, TokenizerFileError
from dgemma.tokenizer_train import (
    DEFAULT_CHAT_TEMPLATE,
    GEMMA_SPECIAL_TOKENS,
    save_tokenizer_dir,
    train_bpe_tokenizer,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CORPUS = """\
The quick brown fox jumps over the lazy dog. A diffusion language model fills in masked tokens,
block by block, unmasking the tokens it is most confident about first.
Hello world! This small corpus trains a byte-level BPE tokenizer with Gemma-style special tokens.
Les élèves étudient à l'école, naïve café. Привет, мир! こんにちは世界。你好，世界。
Emoji also appear: 😀 🎉 👍🏽 ❤️ 🇫🇷 and the model must never print half a character.
The system prompt says: be brief. The user asks a question and the model answers it.
"""

TEXTS = [
    "Hello world!",
    "  leading and trailing spaces  ",
    "",
    "naïve café – Привет, мир! こんにちは",
    "Emoji: 😀🎉👍🏽 ❤️ 🇫🇷 👨‍👩‍👧",
    "special tokens in text: <bos>x<eos> <|turn>user\nhi<turn|> <mask>",
    "tabs\tand\nnewlines\r\n",
]

# Conversations for the chat-template comparisons.
CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there 😀"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 3+3?  "},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "list content"}, {"type": "image"}]},
        {"role": "assistant", "content": "ok", "tool_calls": None},  # None keys are dropped
    ],
]

# A template that exercises the jinja features transformers enables: raise_exception, tojson,
# namespace, loop controls, template kwargs, tools/documents and the {% generation %} tag.
FANCY_TEMPLATE = """\
{%- if messages[0]['role'] != 'system' and require_system is defined and require_system %}
    {{- raise_exception('first message must be a system message') }}
{%- endif %}
{%- set ns = namespace(n_user=0) %}
{{- bos_token }}
{%- if tools %}tools={{ tools | tojson }}
{% endif %}
{%- if documents %}docs={{ documents | tojson(indent=2) }}
{% endif %}
{%- for m in messages %}
    {%- if m['role'] == 'tool' %}{{ raise_exception('tool role not supported: ' + m['content']) }}{% endif %}
    {%- if m['role'] == 'user' %}{% set ns.n_user = ns.n_user + 1 %}{% endif %}
    {%- if m['role'] == 'skip' %}{% continue %}{% endif %}
<|turn>{{ m['role'] }}
{% if m['role'] == 'assistant' %}{% generation %}
{%- if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}
{{- m['content'] }}{% endgeneration %}{% else %}{{ m['content'] | tojson }}{% endif %}<turn|>
{% endfor %}
{%- if add_generation_prompt %}<|turn>model
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{%- endif %}
users={{ ns.n_user }} eos={{ eos_token }} mask={{ mask_token }}"""


# ------------------------------------------------------------------------------------------------
# helpers / fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    backend = train_bpe_tokenizer([corpus], vocab_size=300)
    return save_tokenizer_dir(backend, root / "ckpt", chat_template=DEFAULT_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def ours(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _copy_dir(src: Path, dst: Path, config_update: dict[str, Any] | None = None) -> Path:
    shutil.copytree(src, dst)
    if config_update:
        cfg_path = dst / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg.update(config_update)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    return dst


def _both(tmp_dir: Path) -> tuple[Tokenizer, Any]:
    return Tokenizer.from_dir(tmp_dir), transformers.AutoTokenizer.from_pretrained(str(tmp_dir))


def _assert_same_tokenizer(ours: Tokenizer, hf: Any) -> None:
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.all_special_ids == hf.all_special_ids
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.vocab_size == len(hf)
    assert ours.base_vocab_size == hf.vocab_size


def _stream(dec: IncrementalDecoder, ids: list[int], sizes: list[int]) -> list[str]:
    pieces, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        pieces.append(dec.push(ids[i : i + n]))
        i, k = i + n, k + 1
    pieces.append(dec.flush())
    return pieces


# ------------------------------------------------------------------------------------------------
# training layout
# ------------------------------------------------------------------------------------------------


def test_trained_layout(ours: Tokenizer, hf: Any) -> None:
    for i, t in enumerate(GEMMA_SPECIAL_TOKENS):
        assert ours.token_to_id(t) == i
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id, ours.unk_token_id, ours.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert hf.mask_token_id == 4 and type(hf).__name__ == "TokenizersBackend"
    assert ours.vocab_size == 300
    assert ours.encode("hi")[0] == ours.bos_token_id  # Gemma-style: the post-processor adds BOS
    assert set(ours.all_special_ids) == set(range(len(GEMMA_SPECIAL_TOKENS)))


def test_train_extra_special_tokens_and_errors(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    backend = train_bpe_tokenizer([corpus], 280, special_tokens=["<bos>", "<|think|>"], add_bos=False)
    assert backend.token_to_id("<|think|>") == len(GEMMA_SPECIAL_TOKENS)  # right after the fixed ones
    assert backend.token_to_id("<bos>") == 2  # duplicates of fixed tokens keep their fixed id
    d = save_tokenizer_dir(backend, tmp_path / "t", chat_template=None)
    assert not (d / "chat_template.jinja").exists()
    ours, hf = _both(d)
    assert ours.encode("hi") == hf("hi")["input_ids"] and ours.encode("hi")[0] != 2  # no BOS
    assert "<|think|>" in ours.all_special_tokens and ours.all_special_ids == hf.all_special_ids
    with pytest.raises(ValueError, match="No chat template"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer([corpus], 100)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_bpe_tokenizer([tmp_path / "nope.txt"], 300)


# ------------------------------------------------------------------------------------------------
# encode / decode parity
# ------------------------------------------------------------------------------------------------


def test_encode_decode_match_transformers(ours: Tokenizer, hf: Any) -> None:
    _assert_same_tokenizer(ours, hf)
    for text in TEXTS:
        # byte-level BPE round-trips exactly (special tokens written in the text included)
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    ids = ours.encode(TEXTS[4])
    assert ours.decode(tuple(ids)) == ours.decode(ids)
    assert ours.encode_batch(TEXTS) == [hf(t)["input_ids"] for t in TEXTS]


def test_decode_accepts_tensors(ours: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = ours.encode("Hello 😀")
    assert ours.decode(torch.tensor(ids)) == ours.decode(ids)
    assert ours.decode(ids[1]) == ours.decode([ids[1]])


def _no_post_processor(tj: dict[str, Any]) -> None:
    tj["post_processor"] = None


def _turn_only_in_model_vocab(tj: dict[str, Any]) -> None:
    # "<|turn>" stays in the BPE vocab but stops being an added token; transformers re-adds it as special.
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|turn>"]


@pytest.mark.parametrize(
    "name, edit_json, config_update",
    [
        # transformers 5 drops add_bos_token/add_eos_token from the config when tokenizer.json exists:
        # BOS comes only from tokenizer.json's post-processor.
        ("bos_flag_ignored_with_post_processor", None, {"add_bos_token": False}),
        ("bos_flag_ignored_without_post_processor", _no_post_processor, {"add_bos_token": True, "add_eos_token": True}),
        ("v5_class_name", None, {"tokenizer_class": "TokenizersBackend"}),
        # a named special token missing from the vocab is appended as a new id
        ("bos_not_in_vocab", None, {"bos_token": "<s>"}),
        ("model_specific_tokens", None, {"image_token": "<img>", "extra_special_tokens": {"audio_token": "<aud>"}}),
        ("split_special_tokens", None, {"split_special_tokens": True}),
        ("no_extra_specials", None, {"additional_special_tokens": None}),
        ("turn_only_in_model_vocab", _turn_only_in_model_vocab, {}),
        (
            "added_tokens_decoder",
            None,
            {
                "added_tokens_decoder": {
                    "900": {"__type": "AddedToken", "content": "<new>", "special": False, "normalized": False},
                    "901": {"__type": "AddedToken", "content": "<eos2>", "special": False, "normalized": False},
                },
                "eos_token": "<eos2>",
            },
        ),
    ],
)
def test_config_variants_match_transformers(
    tok_dir: Path, tmp_path: Path, name: str, edit_json: Any, config_update: dict[str, Any]
) -> None:
    d = _copy_dir(tok_dir, tmp_path / name, config_update)
    if edit_json is not None:
        tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        edit_json(tj)
        (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    ours, hf = _both(d)
    _assert_same_tokenizer(ours, hf)
    for text in ("a <new> b <eos2> c <s> <img>", "x <|turn>user"):
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    msgs = CHATS[0]
    variables = "{{ bos_token }}|{{ eos_token }}|{{ image_token }}|{{ audio_token }}|{{ mask_token }}"
    assert ours.apply_chat_template(msgs, chat_template=variables) == hf.apply_chat_template(
        msgs, chat_template=variables, tokenize=False, add_generation_prompt=True
    )


def test_special_tokens_map_json_overrides_config(tok_dir: Path, tmp_path: Path) -> None:
    d = _copy_dir(tok_dir, tmp_path / "stm")
    (d / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<turn|>", "lstrip": False, "rstrip": False, "normalized": False}}),
        encoding="utf-8",
    )
    ours, hf = _both(d)
    _assert_same_tokenizer(ours, hf)
    assert ours.eos_token == "<turn|>"
    # ... but is ignored once the config has added_tokens_decoder (what transformers 5 saves).
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    ours, hf = _both(d)
    _assert_same_tokenizer(ours, hf)
    assert ours.eos_token == "<eos>"


def test_stored_truncation_and_padding_are_ignored(tok_dir: Path, tmp_path: Path) -> None:
    d = _copy_dir(tok_dir, tmp_path / "trunc")
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tj["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    tj["padding"] = {
        "strategy": {"Fixed": 64},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "<pad>",
    }
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    ours, hf = _both(d)
    _assert_same_tokenizer(ours, hf)


# ------------------------------------------------------------------------------------------------
# chat templates
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat_index", range(len(CHATS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_chat_template_matches(ours: Tokenizer, hf: Any, chat_index: int, add_generation_prompt: bool) -> None:
    msgs = CHATS[chat_index]
    expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, return_dict=False)
    got_ids = ours.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert got_ids == expected_ids
    assert got_ids.count(ours.bos_token_id) == 1  # the template writes BOS; encoding adds none


def test_default_chat_template_shape(ours: Tokenizer) -> None:
    text = ours.apply_chat_template(CHATS[1])  # add_generation_prompt defaults to True here
    assert text == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n4<turn|>\n<|turn>user\nAnd 3+3?<turn|>\n<|turn>model\n"
    )
    with pytest.raises(jinja2.exceptions.TemplateError, match="Unsupported chat role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    "messages, kwargs",
    [
        (CHATS[1], {"add_generation_prompt": True}),
        (CHATS[1], {"add_generation_prompt": True, "enable_thinking": False}),
        (CHATS[1], {"add_generation_prompt": True, "enable_thinking": True, "eos_token": "OVERRIDDEN"}),
        (
            [{"role": "user", "content": "<b>&'\"é"}, {"role": "skip", "content": "x"}],
            {"add_generation_prompt": False, "tools": [{"type": "function", "function": {"name": "f<>"}}]},
        ),
        (CHATS[0], {"add_generation_prompt": True, "documents": [{"title": "T", "text": "naïve <doc>"}]}),
        (
            # reasoning under an old field name is exposed as reasoning_content
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "hmm"}],
            {"add_generation_prompt": False},
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}],
            {"add_generation_prompt": False, "continue_final_message": True},
        ),
    ],
)
def test_fancy_template_matches(ours: Tokenizer, hf: Any, messages: list[dict], kwargs: dict[str, Any]) -> None:
    expected = hf.apply_chat_template(messages, chat_template=FANCY_TEMPLATE, tokenize=False, **kwargs)
    assert ours.apply_chat_template(messages, chat_template=FANCY_TEMPLATE, **kwargs) == expected
    expected_ids = hf.apply_chat_template(messages, chat_template=FANCY_TEMPLATE, return_dict=False, **kwargs)
    assert ours.apply_chat_template(messages, chat_template=FANCY_TEMPLATE, tokenize=True, **kwargs) == expected_ids


@pytest.mark.parametrize(
    "messages, kwargs",
    [
        (CHATS[0], {"require_system": True}),
        ([{"role": "tool", "content": "boom"}], {}),
    ],
)
def test_raise_exception_matches(ours: Tokenizer, hf: Any, messages: list[dict], kwargs: dict[str, Any]) -> None:
    with pytest.raises(jinja2.exceptions.TemplateError) as theirs:
        hf.apply_chat_template(messages, chat_template=FANCY_TEMPLATE, tokenize=False, **kwargs)
    with pytest.raises(jinja2.exceptions.TemplateError) as mine:
        ours.apply_chat_template(messages, chat_template=FANCY_TEMPLATE, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_chat_template_input_errors(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="not compatible"):
        ours.apply_chat_template(CHATS[0], add_generation_prompt=True, continue_final_message=True)
    # continue_final_message alone turns the default generation prompt off
    assert ours.apply_chat_template(CHATS[0], continue_final_message=True).endswith("Hi there 😀")
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(CHATS[0], chat_template="{% set ns = namespace(_x=1) %}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox blocks attribute escapes
        ours.apply_chat_template(CHATS[0], chat_template="{{ ''.__class__.__mro__ }}")


def test_strftime_now_and_multiple_templates(tok_dir: Path, tmp_path: Path) -> None:
    d = _copy_dir(tok_dir, tmp_path / "multi")
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS {{ tools | length }}", encoding="utf-8")
    (d / "additional_chat_templates" / "dated.jinja").write_text("{{ strftime_now('%Y') }}", encoding="utf-8")
    ours, hf = _both(d)
    assert ours.chat_template is not None and set(ours.chat_template) == {"default", "tool_use", "dated"}
    tools = [{"type": "function", "function": {"name": "f"}}]
    for kwargs in ({}, {"tools": tools}, {"chat_template": "dated"}):
        expected = hf.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(CHATS[0], **kwargs) == expected


# ------------------------------------------------------------------------------------------------
# incremental decoding
# ------------------------------------------------------------------------------------------------


def test_incremental_decoder_reassembles_emoji(ours: Tokenizer) -> None:
    text = "Hi 👍🏽 and 🇫🇷! " + TEXTS[3] + " 😀😀"
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    # The emoji must really be split across tokens for this test to mean anything.
    emoji_ids = ours.encode("😀", add_special_tokens=False)
    assert len(emoji_ids) > 1
    dec = IncrementalDecoder(ours)
    assert dec.push(emoji_ids[:1]) == ""  # half an emoji: nothing yet
    assert dec.push(emoji_ids[1:]) == "😀"
    assert dec.flush() == ""

    rng = random.Random(0)
    for sizes in ([1], [2], [3], [5, 1, 7], [rng.randint(1, 6) for _ in range(20)], [len(ids)]):
        pieces = _stream(IncrementalDecoder(ours), ids, sizes)
        assert "".join(pieces) == ours.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoder_special_tokens_and_reset(ours: Tokenizer) -> None:
    ids = ours.apply_chat_template(CHATS[1], tokenize=True) + ours.encode("Sure 🎉", add_special_tokens=False)
    ids.append(ours.eos_token_id)
    for skip in (True, False):
        dec = IncrementalDecoder(ours, skip_special_tokens=skip)
        assert "".join(_stream(dec, ids, [1])) == ours.decode(ids, skip_special_tokens=skip)
        dec.reset()
        assert dec.token_ids == [] and dec.push(ours.encode("ok", add_special_tokens=False)) == "ok"


def test_incremental_decoder_flushes_invalid_bytes(ours: Tokenizer) -> None:
    partial = ours.encode("😀", add_special_tokens=False)[:1]
    dec = IncrementalDecoder(ours)
    assert dec.push(ours.encode("ab", add_special_tokens=False)) == "ab"
    assert dec.push(partial) == ""
    assert dec.flush() == ours.decode(partial)  # the stream ended mid-character: emit U+FFFD now


def test_incremental_decoder_byte_fallback_sentencepiece_style() -> None:
    # A Gemma/Llama-like pipeline: "▁" for spaces, <0xNN> byte-fallback tokens, and a decoder that
    # strips the leading space of the whole text, so a naive per-chunk decode would lose spaces.
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ["▁", "H", "i", "▁Hi", "▁there", "a", "b", "▁a"]:
        vocab[piece] = len(vocab)
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = Tokenizer(backend, special_tokens={"unk_token": "<unk>"})
    text = "Hi there 😀 a 👍🏽b Hi"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for sizes in ([1], [2], [3], [4, 1]):
        pieces = _stream(IncrementalDecoder(tok), ids, sizes)
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


# ------------------------------------------------------------------------------------------------
# loading errors
# ------------------------------------------------------------------------------------------------


def test_missing_folder_and_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        Tokenizer.from_dir(tmp_path / "does-not-exist")
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "filename, content",
    [
        ("tokenizer.json", "{ this is not json"),
        ("tokenizer.json", '{"version": "1.0", "model": {"type": "NoSuchModel"}}'),
        ("tokenizer.json", b"\xff\xfe\x00garbage"),
        ("tokenizer_config.json", '{"bos_token": '),
        ("tokenizer_config.json", "[1, 2, 3]"),
    ],
)
def test_corrupt_files_name_the_file(tok_dir: Path, tmp_path: Path, filename: str, content: str | bytes) -> None:
    d = _copy_dir(tok_dir, tmp_path / "bad")
    target = d / filename
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerFileError) as err:
        Tokenizer.from_dir(d)
    assert str(target) in str(err.value)
