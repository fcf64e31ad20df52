"""The server's prompt encoder: the character bound never refuses a prompt that could fit, and encoding is exact.

The bound says a text of n characters has at least n / max_chars_per_token tokens. Checked as a property over
generated texts (hypothesis) and over the texts that come closest to it (runs of whitespace, combining marks, the
special tokens' own spelling), on the embedded model's tokenizer and on a small trained one; pipelines that can
delete characters get no bound at all.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend

from dgemma.llm import default_model_path
from dgemma.server.prompts import PromptEncoder, max_chars_per_token
from dgemma.server.protocol import RequestError
from dgemma.tokenizer import Tokenizer
from helpers import make_tiny_checkpoint


@pytest.fixture(scope="module", params=["embedded", "tiny"])
def tokenizer(request, tmp_path_factory):
    if request.param == "embedded":
        return Tokenizer.from_dir(default_model_path())
    return Tokenizer.from_dir(make_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "t", canvas_length=16))


def hardest_texts(tok: Tokenizer) -> list[str]:
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    longest = max(vocab, key=len)
    specials = "".join(tok.all_special_tokens)
    return [" " * 5000, "\n" * 3000, "\t \r\n" * 1000, "e\u0301" * 2000, "\u1100\u1161\u11a8" * 1000, specials * 50,
            longest * 300, tok.decode([vocab[longest]]) * 300, "to be or not " * 500]


def test_bound_holds_on_the_hardest_texts(tokenizer):
    per_token = max_chars_per_token(tokenizer.backend)
    assert per_token is not None
    for text in hardest_texts(tokenizer):
        assert len(tokenizer.encode(text)) * per_token >= len(text), text[:20]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=400))
def test_bound_holds_on_any_text(tokenizer, text):
    per_token = max_chars_per_token(tokenizer.backend)
    assert len(tokenizer.encode(text, add_special_tokens=False)) * per_token >= len(text)


def test_encoder_is_exact_below_the_limit_and_refuses_at_it(tokenizer):
    enc = PromptEncoder(tokenizer, max_model_len=64)
    for text in ("To be, or not to be", "ROMEO:\nJULIET:", "é" * 10):
        assert enc.encode(text) == tokenizer.encode(text)
    long = ("To be, or not to be, that is the question. " * 100)[:enc.max_chars]
    assert len(tokenizer.encode(long)) > 64 and len(long) <= enc.max_chars  # long by tokens, not by characters
    with pytest.raises(RequestError, match="has at least 64 tokens but max_model_len is 64"):
        enc.encode(long)
    with pytest.raises(RequestError, match="characters"):
        enc.encode("x" * (enc.max_chars + 1))


def spec_with(tok: Tokenizer, **parts) -> Backend:
    spec = json.loads(tok.backend.to_str())
    spec.update(parts)
    return Backend.from_str(json.dumps(spec))


def test_no_bound_where_the_pipeline_can_delete_characters(tokenizer):
    deleting = [
        {"pre_tokenizer": {"type": "WhitespaceSplit"}},
        {"normalizer": {"type": "Strip", "strip_left": True, "strip_right": True}},
        {"normalizer": {"type": "NFC"}},
        {"normalizer": {"type": "Replace", "pattern": {"String": "  "}, "content": " "}},
        {"pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False}},
    ]
    for parts in deleting:
        assert max_chars_per_token(spec_with(tokenizer, **parts)) is None, parts
    keeping = {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFD"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}}
    assert max_chars_per_token(spec_with(tokenizer, **keeping)) is not None


def test_no_bound_where_one_token_can_spell_any_run_of_unknown_characters():
    from tokenizers.models import BPE, WordPiece

    vocab = {"<unk>": 0, "a": 1, "b": 2}
    fused = Backend(BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True))
    assert len(fused.encode("x" * 1000).ids) == 1 and max_chars_per_token(fused) is None
    assert max_chars_per_token(Backend(WordPiece(vocab=vocab, unk_token="<unk>"))) is None
    assert max_chars_per_token(Backend(BPE(vocab=vocab, merges=[], unk_token="<unk>"))) == 5  # one <unk> a char

