"""`dgemma export`: write a checkpoint folder in another form, with its tokenizer, e.g. quantised to FP8.

    dgemma export google/diffusiongemma-26B-A4B-it out/fp8 --quantization fp8   # compressed-tensors FP8-dynamic
    dgemma export runs/x/final out/bf16 --dtype bfloat16
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import checkpoint
from .cli import Parser

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "processor_config.json", "preprocessor_config.json")


def main(argv: list[str]) -> int:
    p = Parser(prog="dgemma export", description="Write a checkpoint (and its tokenizer) in another form.")
    p.add_argument("model", help="checkpoint folder or Hugging Face Hub id")
    p.add_argument("out", help="the folder to write (replaced atomically if it exists)")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: FP8 weights with per-channel scales, in the compressed-tensors format vLLM serves")
    p.add_argument("--dtype", default="auto", help="dtype of the tensors that stay float: auto, float32, bfloat16, "
                                                   "float16")
    args = p.parse_args(argv)
    src = checkpoint.resolve(args.model)
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: export to the folder it reads from is refused")
    ck = checkpoint.load(src, dtype=args.dtype, quantization=args.quantization)
    checkpoint.save(ck.model, out, ck.generation, passthrough=ck.passthrough)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    print(out)
    return 0
