"""Training data: example sources, the response-to-canvas layout, and padded batches.

An *example source* maps a global example index to one `(prompt_ids, response_ids)` pair, deterministically from
(seed, index). Random access by index is what makes a killed run resume exactly (the checkpoint stores only the
position) and lets every data-parallel rank read its own shard of the same global batch without coordination.

Sources are pluggable: anything with `example(index)`, a plain callable `index -> (prompt, response)`, or a factory
registered under a name with `register_source`, which `make_source("name:ARG", ...)` (the CLI's `--data`) builds.
Built in: `text:FILE`, random windows of a tokenised plain-text file split into a prompt and a response.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

Example = tuple[list[int], list[int]]  # (prompt ids, response ids)


@runtime_checkable
class ExampleSource(Protocol):
    def example(self, index: int) -> Example:
        """The example at a global index; the same index always gives the same example."""
        ...


class CallableSource:
    """Adapts a plain function `index -> (prompt, response)`."""

    def __init__(self, fn: Callable[[int], Example]):
        self.fn = fn

    def example(self, index: int) -> Example:
        return self.fn(index)


class ChunkedSource:
    """For generators that are cheaper in bulk (e.g. the Sudoku maker): chunk c of `chunk_size` examples is
    `make_chunk(np.random.default_rng([seed, c]), chunk_size)`, so any index is reachable without replaying."""

    def __init__(self, make_chunk: Callable[[np.random.Generator, int], Sequence[Example]], seed: int = 0,
                 chunk_size: int = 1024):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.make_chunk, self.seed, self.chunk_size = make_chunk, seed, chunk_size
        self._cached: tuple[int, Sequence[Example]] | None = None

    def example(self, index: int) -> Example:
        c, i = divmod(index, self.chunk_size)
        if self._cached is None or self._cached[0] != c:
            chunk = self.make_chunk(np.random.default_rng([self.seed, c]), self.chunk_size)
            if len(chunk) != self.chunk_size:
                raise ValueError(f"make_chunk returned {len(chunk)} examples, expected {self.chunk_size}")
            self._cached = (c, chunk)
        return self._cached[1][i]


class TextCorpusSource:
    """Random windows of a tokenised text file: `window` tokens each, split at a random point into a prompt of at
    least `min_prompt` tokens and a response of at least `min_response` (a shorter file gives shorter windows).
    `part=(lo, hi)` keeps only that fraction of the tokens: `(0, 0.95)` to train and `(0.95, 1)` to validate hold
    out the end of the text itself, not just other windows over the same text."""

    def __init__(self, text_or_path: str | Path, tokenizer, seed: int = 0, window: int = 256,
                 min_prompt: int = 1, min_response: int = 1, bos_id: int | None = None,
                 part: tuple[float, float] = (0.0, 1.0)):
        if isinstance(text_or_path, Path):
            try:
                text = text_or_path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{text_or_path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r});"
                                 " convert it, e.g. iconv -f latin1 -t utf-8") from None
        else:
            text = text_or_path
        lo, hi = part
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"part must be (lo, hi) with 0 <= lo < hi <= 1, got {part}")
        try:  # dgemma's Tokenizer and HF tokenizers take add_special_tokens; a bare `encode(text)` works too
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode(text)
        n = len(ids)
        self.tokens = np.asarray(ids, dtype=np.int64)[round(lo * n):round(hi * n)]
        if min_prompt < 0 or min_response < 1:
            raise ValueError("min_prompt must be >= 0 and min_response >= 1")
        if len(self.tokens) < min_prompt + min_response:
            raise ValueError(f"the corpus{' part' if part != (0.0, 1.0) else ''} has {len(self.tokens)} tokens; "
                             f"need at least {min_prompt + min_response}")
        self.window = min(window, len(self.tokens))
        if self.window < min_prompt + min_response:
            raise ValueError(f"window {window} is shorter than min_prompt + min_response")
        self.seed, self.min_prompt, self.min_response, self.bos_id = seed, min_prompt, min_response, bos_id

    def example(self, index: int) -> Example:
        rng = np.random.default_rng([self.seed, index])
        start = int(rng.integers(0, len(self.tokens) - self.window + 1))
        split = int(rng.integers(self.min_prompt, self.window - self.min_response + 1))
        win = self.tokens[start:start + self.window].tolist()
        prompt = ([self.bos_id] if self.bos_id is not None else []) + win[:split]
        return prompt, win[split:]


# -- registry ------------------------------------------------------------------------------------------------------
SourceFactory = Callable[..., ExampleSource]
SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str, factory: SourceFactory) -> None:
    """`factory(arg: str, *, seed: int, tokenizer=None, **options) -> ExampleSource` for `--data name:arg`."""
    SOURCES[name] = factory


def make_source(spec: str, *, seed: int = 0, tokenizer=None, **options) -> ExampleSource:
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r} in {spec!r}; known: {sorted(SOURCES)}")
    try:
        return SOURCES[name](arg, seed=seed, tokenizer=tokenizer, **options)
    except TypeError as e:  # a factory that passes its options on: name the bad one, not a Python signature
        if "argument" not in str(e):
            raise
        raise ValueError(f"data source {name!r}: {str(e).split(') ', 1)[-1]} (check --data-arg)") from None


def as_source(obj) -> ExampleSource:
    if isinstance(obj, ExampleSource):
        return obj
    if callable(obj):
        return CallableSource(obj)
    raise TypeError(f"not an example source: {obj!r} (needs .example(index) or to be callable)")


TEXT_OPTIONS = {"window": int, "min_prompt": int, "min_response": int, "bos_id": int, "holdout": float,
                "split": str}


def _text_factory(arg: str, *, seed: int, tokenizer=None, **options) -> ExampleSource:
    """`text:FILE`; options window, min_prompt, min_response, bos_id; `holdout=F` with `split=train|val` splits the
    file's tokens (the last fraction F validates)."""
    for key, value in options.items():
        kind = TEXT_OPTIONS.get(key)
        if kind is None:
            near = difflib.get_close_matches(key, TEXT_OPTIONS, 1)
            raise ValueError(f"data source 'text': unknown option {key!r}" + (f" (did you mean {near[0]!r}?)" if near
                             else "") + f"; known: {', '.join(TEXT_OPTIONS)}")
        ok = isinstance(value, kind) and not isinstance(value, bool) or (kind is float and isinstance(value, int))
        if not ok and not (key == "bos_id" and value is None):
            what = {int: "an integer", float: "a number", str: "a string"}[kind]
            raise ValueError(f"data source 'text': option {key}={value!r} must be {what}")
    if tokenizer is None:
        raise ValueError("the text source needs a tokenizer (--tokenizer DIR, or --init-from a folder with one)")
    path = Path(arg)
    if not path.is_file():
        raise ValueError(f"text source: {arg!r} is not a file")
    holdout, split = options.pop("holdout", 0.0), options.pop("split", "train")
    if not 0.0 <= holdout < 1.0 or split not in ("train", "val"):
        raise ValueError(f"text source: need 0 <= holdout < 1 and split train or val, got {holdout}, {split!r}")
    part = (0.0, 1.0) if not holdout else (0.0, 1.0 - holdout) if split == "train" else (1.0 - holdout, 1.0)
    return TextCorpusSource(path, tokenizer, seed=seed, part=part, **options)


register_source("text", _text_factory)


# -- layout and batches --------------------------------------------------------------------------------------------
def layout(prompt: Sequence[int], response: Sequence[int], canvas_length: int, eos_id: int,
           require_eos: bool = True) -> list[int]:
    """prompt + response chunked into canvases aligned at the response start, the last canvas filled with EOS.
    With `require_eos` the response always ends with at least one EOS (a full last canvas gets a whole EOS canvas
    more), so the model learns to stop; without it a response that fills its canvases exactly keeps no EOS."""
    resp = list(response)
    if require_eos or not resp:
        resp.append(eos_id)
    resp += [eos_id] * (-len(resp) % canvas_length)
    return list(prompt) + resp


@dataclass
class Batch:
    """Clean sequences right-padded to the longest: `input_ids` [B, S]; per row the real `lengths`, `prompt_lens`,
    `n_canvases`, and the global example `indices` (the per-example randomness of the objective is keyed on them)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    prompt_lens: torch.Tensor
    n_canvases: torch.Tensor
    indices: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(getattr(self, f).to(device) for f in ("input_ids", "lengths", "prompt_lens", "n_canvases",
                                                             "indices")))

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(examples: Sequence[Example], indices: Sequence[int], canvas_length: int, eos_id: int, pad_id: int = 0,
            vocab_size: int | None = None, require_eos: bool = True) -> Batch:
    seqs, plens, ncan = [], [], []
    for (prompt, response), idx in zip(examples, indices):
        seq = layout(prompt, response, canvas_length, eos_id, require_eos)
        if vocab_size is not None and seq and not 0 <= min(seq) <= max(seq) < vocab_size:
            raise ValueError(f"example {idx} has token ids outside [0, {vocab_size}): the tokenizer does not fit "
                             "the model's vocabulary")
        seqs.append(seq)
        plens.append(len(prompt))
        ncan.append((len(seq) - len(prompt)) // canvas_length)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    def t(xs):
        return torch.tensor(list(xs), dtype=torch.long)

    return Batch(ids, t(map(len, seqs)), t(plens), t(ncan), t(indices))
