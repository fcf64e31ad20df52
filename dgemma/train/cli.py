"""`dgemma train`: train from scratch (`--config`) or fine-tune a checkpoint (`--init-from`, optionally LoRA).

    dgemma train --config tiny.json --data text:corpus.txt --tokenizer tok/ --out runs/a --steps 1000
    torchrun --nproc-per-node 2 -m dgemma.train.cli --init-from ckpt/ --lora-rank 8 --data text:c.txt ...

The run folder gets `metrics.jsonl`, `checkpoints/step-N/` (resumed automatically when present, unless
`--no-resume`) and, at the end, `final/`: an HF-layout checkpoint (LoRA merged) for dgemma or transformers.
Multi-word flags take dashes or underscores (`--batch-size` = `--batch_size`), as everywhere in dgemma.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..cli import Parser
from .. import checkpoint
from ..config import ModelConfig
from ..model import DiffusionGemma
from .data import SOURCES, make_source
from .lora import LoRAConfig
from .trainer import TrainConfig, Trainer, setup_distributed


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dgemma train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="model config (config.json path or inline JSON) to train from scratch")
    src.add_argument("--init-from", help="checkpoint folder (or hub id) to fine-tune")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--data", required=True, help=f"example source NAME:ARG (known: {', '.join(sorted(SOURCES))})")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
         help="option for the source (JSON value), e.g. window=256; repeatable")
    p.add_argument("--tokenizer", help="tokenizer folder (tokenizer.json) for text sources")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8, help="examples per rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas-length", type=int, default=None, help="override the model config's canvas_length")
    p.add_argument("--self-cond-prob", type=float, default=0.5)
    p.add_argument("--no-eos-canvas", action="store_true",
         help="do not force an EOS after a response that fills its canvases exactly (fixed-length tasks)")
    p.add_argument("--freeze-router", action="store_true")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from the run folder's latest checkpoint (the default)")
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--export-dtype", default="auto", help="dtype of final/: auto (as trained), bfloat16, float32")
    p.add_argument("--no-progress", action="store_true")
    return p


def _model_config(spec: str) -> ModelConfig:
    d = json.loads(spec) if spec.lstrip().startswith("{") else json.loads(Path(spec).read_text())
    if "text_config" not in d:  # a bare text config
        d = {"model_type": "diffusion_gemma", "text_config": d}
    return ModelConfig.from_dict(d, source=spec if not spec.lstrip().startswith("{") else "--config")


def _data_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--data-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, _ = setup_distributed()
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    state_file = None
    if args.resume and (out / "checkpoints" / "LATEST").is_file():
        state_file = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip() / "trainer_state.json"
    saved = json.loads(state_file.read_text()) if state_file and state_file.is_file() else {}
    init_from = args.init_from or saved.get("init_from")
    lora_rank = args.lora_rank or ((saved.get("lora") or {}).get("rank", 0))
    generation = passthrough = None
    if init_from:
        ck = checkpoint.load(checkpoint.resolve(init_from), dtype=torch.float32)
        model, generation, passthrough = ck.model, ck.generation, ck.passthrough
    elif args.config:
        model = DiffusionGemma(_model_config(args.config))
        model.init_weights(generator=torch.Generator().manual_seed(args.seed))
    elif saved and saved.get("lora") is None:  # resuming a from-scratch run: the architecture is in its checkpoint
        model = checkpoint.load(state_file.parent / "model", dtype=torch.float32).model
    else:
        print("dgemma train: give --config (from scratch) or --init-from (fine-tune)", file=sys.stderr)
        return 2
    if args.canvas_length:
        model.config = model.config.with_canvas_length(args.canvas_length)
    tokenizer = None
    if args.tokenizer:
        from ..tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(args.tokenizer)
    source = make_source(args.data, seed=args.seed, tokenizer=tokenizer, **_data_options(args.data_arg))
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        save_every=args.save_every, log_every=args.log_every, seed=args.seed, self_cond_prob=args.self_cond_prob,
        require_eos=not args.no_eos_canvas, freeze_router=args.freeze_router, progress=not args.no_progress)
    lora = LoRAConfig(rank=lora_rank, alpha=args.lora_alpha) if lora_rank else None
    trainer = Trainer(model, source, cfg, out, lora=lora, generation=generation, passthrough=passthrough,
                      device=device, resume=args.resume, init_from=str(init_from) if init_from else None)
    if trainer.step:
        print(f"resumed from step {trainer.step} ({trainer.position} examples)", file=sys.stderr)
    records = trainer.train()
    dtype = checkpoint.parse_dtype(args.export_dtype)
    path = trainer.export(out / "final", dtype=dtype)
    if rank == 0:
        last = records[-1] if records else {}
        print(json.dumps({"final": str(path), "step": trainer.step, "loss": last.get("loss")}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
