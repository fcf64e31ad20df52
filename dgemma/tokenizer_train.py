"""Train and save small byte-level BPE tokenizers with a Gemma-style special-token layout.

Used to build toy checkpoints (tests, tiny training runs) whose tokenizer folder loads both with
`dgemma.tokenizer.Tokenizer.from_dir` and with transformers' `AutoTokenizer.from_pretrained`.

Layout of the special tokens (fixed ids, like Gemma):
    0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>, 5 <|turn>, 6 <turn|>, then any extra special tokens,
then the 256 byte symbols, then the learned merges.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = [
    "GEMMA_SPECIAL_TOKENS",
    "DEFAULT_CHAT_TEMPLATE",
    "PAD_TOKEN",
    "EOS_TOKEN",
    "BOS_TOKEN",
    "UNK_TOKEN",
    "MASK_TOKEN",
    "TURN_START",
    "TURN_END",
    "train_bpe_tokenizer",
    "save_tokenizer_dir",
]

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
MASK_TOKEN = "<mask>"
TURN_START = "<|turn>"
TURN_END = "<turn|>"

# Order == id. Kept identical to Gemma so that code which hard-codes e.g. mask id 4 keeps working.
GEMMA_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    EOS_TOKEN,
    BOS_TOKEN,
    UNK_TOKEN,
    MASK_TOKEN,
    TURN_START,
    TURN_END,
)

# A minimal Gemma-4-like chat template. Gemma calls the assistant role "model" and puts the system
# prompt in its own turn. `bos_token` is written by the template (not by the tokenizer), because
# apply_chat_template tokenizes with add_special_tokens=False.
DEFAULT_CHAT_TEMPLATE: str = """\
{{- bos_token }}
{%- for message in messages %}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}
    {%- if role not in ['system', 'user', 'model'] %}
        {{- raise_exception('Unsupported chat role: ' + message['role']) }}
    {%- endif %}
    {{- '<|turn>' + role + '\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {%- for part in message['content'] if part['type'] == 'text' %}
            {{- part['text'] | trim }}
        {%- endfor %}
    {%- endif %}
    {{- '<turn|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|turn>model\\n' }}
{%- endif %}
"""


def _special_token_list(extra: Iterable[str]) -> list[str]:
    """Fixed Gemma tokens first, then caller extras in order, without duplicates."""
    tokens = list(GEMMA_SPECIAL_TOKENS)
    for tok in extra:
        if tok not in tokens:
            tokens.append(tok)
    return tokens


def _iter_file_text(paths: Sequence[Path]) -> Iterable[str]:
    for p in paths:
        with p.open(encoding="utf-8") as f:
            yield from f


def train_bpe_tokenizer(
    text_files: Sequence[str | os.PathLike[str]],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    add_bos: bool = True,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on UTF-8 text files.

    Args:
        text_files: plain-text files to learn merges from.
        vocab_size: total size including special tokens and the 256 byte symbols.
        special_tokens: extra special tokens, placed after the fixed Gemma layout
            (`GEMMA_SPECIAL_TOKENS`, ids 0..6); duplicates of those are ignored.
        add_bos: install a post-processor that prepends `<bos>` on `encode(add_special_tokens=True)`,
            as Gemma's tokenizer.json does. (transformers 5 decides BOS from the post-processor.)
        min_frequency: minimum pair count for a merge.
    """
    paths = [Path(p) for p in text_files]
    for p in paths:  # check up front rather than halfway through training
        if not p.is_file():
            raise FileNotFoundError(f"training text file not found: {p}")
    specials = _special_token_list(special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {len(specials) + len(alphabet)} "
            f"({len(specials)} special tokens + {len(alphabet)} byte symbols)"
        )

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # add_prefix_space=False: "Hello" at the start of a prompt and " Hello" mid-text stay distinct,
    # and encode/decode round-trips exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        # The trainer assigns special tokens ids 0..n-1 in list order: this is what fixes the layout.
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        # Seed all 256 bytes so any input is encodable without <unk>.
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_iter_file_text(paths), trainer=trainer)

    for i, t in enumerate(specials):
        got = tok.token_to_id(t)
        if got != i:  # should never happen; guards against a tokenizers behaviour change
            raise RuntimeError(f"special token {t!r} got id {got}, expected {i}")

    if add_bos:
        bos_id = tok.token_to_id(BOS_TOKEN)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )
    return tok


def save_tokenizer_dir(
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    *,
    model_max_length: int | None = None,
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`.

    `AutoTokenizer.from_pretrained(out_dir)` loads the folder as a `TokenizersBackend` (transformers 5)
    with identical encoding, decoding and chat template. Special token names are recorded only if the
    tokenizer actually contains them. Returns the directory path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    config: dict[str, object] = {
        # "A plain tokenizer.json tokenizer": transformers 5 loads this name as TokenizersBackend (what
        # it writes itself), and transformers 4 still knows it, unlike "TokenizersBackend". Not
        # GemmaTokenizer: that class rebuilds a SentencePiece-style pipeline, dropping our ByteLevel one.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "backend": "tokenizers",
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    named = {
        "pad_token": PAD_TOKEN,
        "eos_token": EOS_TOKEN,
        "bos_token": BOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "mask_token": MASK_TOKEN,
    }
    for key, tok in named.items():
        if tok in vocab:
            config[key] = tok
    named_values = set(named.values())
    extras = [
        a.content
        for _, a in sorted(tokenizer.get_added_tokens_decoder().items())
        if a.special and a.content not in named_values
    ]
    if extras:
        # "additional_special_tokens" (not v5's "extra_special_tokens") because transformers 5
        # converts it and transformers 4 also understands it.
        config["additional_special_tokens"] = extras
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)

    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    template_path = out / "chat_template.jinja"
    if chat_template is not None:
        template_path.write_text(chat_template, encoding="utf-8")
    elif template_path.exists():
        template_path.unlink()  # don't leave a stale template from a previous save
    return out
