"""Split Tiny Shakespeare into train / held-out text and train the byte-level BPE tokenizer on the train part.

    python -m scripts.train_shakespeare_tokenizer --corpus data/tinyshakespeare.txt --out runs/shakespeare \
        --vocab-size 2048 --heldout-fraction 0.1

Writes into `--out`:
- `train.txt`: the first lines of the corpus (the model trains on this only);
- `heldout.txt`: the last `--heldout-fraction` of its lines (cut at a blank line), for evaluation;
- `tokenizer/`: tokenizer.json, tokenizer_config.json and chat_template.jinja (dgemma's default Gemma-style
  template), made by `dgemma.tokenizer_train` with the fixed special-token layout (0 <pad>, 1 <eos>, 2 <bos>, ...)
  and a post-processor that prepends <bos>. Learned from `train.txt` only, so the held-out text is unseen.

Deterministic: the same corpus and flags give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def split_corpus(corpus: Path, out: Path, heldout_fraction: float) -> tuple[Path, Path]:
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(round(len(lines) * (1.0 - heldout_fraction)))
    # Move the cut to the next blank line so no speech is split between the two parts.
    while cut < len(lines) and lines[cut].strip():
        cut += 1
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = out / "train.txt", out / "heldout.txt"
    train.write_text("".join(lines[:cut]), encoding="utf-8")
    heldout.write_text("".join(lines[cut:]).lstrip("\n"), encoding="utf-8")
    return train, heldout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="data/tinyshakespeare.txt")
    p.add_argument("--out", default="runs/shakespeare")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    args = p.parse_args(argv)

    from dgemma.tokenizer_train import save_tokenizer_dir, train_bpe_tokenizer

    out = Path(args.out)
    train, heldout = split_corpus(Path(args.corpus), out, args.heldout_fraction)
    tok = train_bpe_tokenizer([train], vocab_size=args.vocab_size)
    save_tokenizer_dir(tok, out / "tokenizer")
    n_train = len(tok.encode(train.read_text(encoding="utf-8"), add_special_tokens=False).ids)
    n_held = len(tok.encode(heldout.read_text(encoding="utf-8"), add_special_tokens=False).ids)
    info = {
        "corpus_sha256": hashlib.sha256(Path(args.corpus).read_bytes()).hexdigest(),
        "train_chars": len(train.read_text(encoding="utf-8")),
        "heldout_chars": len(heldout.read_text(encoding="utf-8")),
        "train_tokens": n_train, "heldout_tokens": n_held, "vocab_size": tok.get_vocab_size(),
    }
    (out / "split.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
