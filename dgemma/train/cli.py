"""`dgemma train`: train from scratch (`--config`) or fine-tune a checkpoint (`--init-from`, optionally LoRA).

    dgemma train --config tiny.json --data text:corpus.txt --tokenizer tok/ --out runs/a --steps 1000
    dgemma train --init-from default --lora-rank 8 --data text:data/tinyshakespeare.txt --val-fraction 0.05 \
        --eval-every 10 --steps 50 --out runs/lora
    dgemma train plot runs/lora                       # runs/lora/loss.png (needs the `plot` extra)
    dgemma train plan google/diffusiongemma-26B-A4B-it  # per-rank memory of FSDP training at N ranks
    torchrun --nproc-per-node 2 -m dgemma.train.cli --init-from ckpt/ --lora-rank 8 --data text:c.txt ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m dgemma.train.cli --parallel fsdp --init-from ckpt/ --data text:c.txt ...   # FSDP2, on every node

The run folder gets `metrics.jsonl`, `checkpoints/step-N/` (resumed automatically when present, unless
`--no-resume`, which moves the old run aside) and, at the end, `final/`: an HF-layout checkpoint (LoRA merged) with
the tokenizer, for dgemma or transformers, plus `final/adapter/` (peft layout) for LoRA runs. Every flag is checked
before the first step; errors are one line (from rank 0 only). Multi-word flags take dashes or underscores.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .. import checkpoint
from ..cli import Parser
from ..config import ModelConfig
from ..model import DiffusionGemma
from .data import SOURCES, make_source
from .lora import LoRAConfig
from .run_folder import RunFolder
from .trainer import TrainConfig, Trainer, setup_distributed

ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError, ImportError)


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in the help, except where there is none to show (required flags, switches, None)."""

    def _get_help_string(self, action):
        d = action.default
        none = d is None or d is False or d == [] or d is argparse.SUPPRESS
        if none or action.required or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dgemma train", description=__doc__.split("\n")[0], formatter_class=DefaultsHelp,
               epilog="`dgemma train plot RUN` draws a run's loss curves; `dgemma train plan MODEL` gives the "
               "per-rank memory of FSDP training.")
    # Numbers such as -1e-3 are values, not flags (argparse only knows -1 and -.5): `--lr -1e-3` reaches the
    # check that rejects it by name instead of "expected one argument".
    p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.?\d+(?:[eE][-+]?\d+)?$")
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--config", help="model config (config.json path or inline JSON) to train from scratch")
    src.add_argument("--init-from", help="checkpoint folder or hub id to fine-tune; `default` = the embedded model")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (None: the rank, scale 1)")
    g.add_argument("--canvas-length", type=int, default=None, help="override the model config's canvas_length")
    g.add_argument("--freeze-router", action="store_true", help="do not train the MoE routers")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help=f"example source NAME:ARG (known: {', '.join(sorted(SOURCES))})")
    d.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the source (JSON value), e.g. window=256; repeatable")
    d.add_argument("--tokenizer", help="tokenizer folder (tokenizer.json) for text sources (None: the --init-from "
                   "folder's, if it has one)")
    d.add_argument("--no-eos-canvas", action="store_true",
                   help="do not force an EOS after a response that fills its canvases exactly (fixed-length tasks)")
    v = p.add_argument_group("evaluation")
    v.add_argument("--val-data", help="validation source NAME:ARG (same --data-arg options)")
    v.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this final fraction of a text file for validation (0: none)")
    v.add_argument("--val-examples", type=int, default=64, help="size of the fixed validation set")
    v.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    v.add_argument("--keep-best", action="store_true", help="export the model of the best validation loss to best/")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, required=True, help="optimiser steps of the whole run")
    o.add_argument("--batch-size", type=int, default=8, help="examples per rank per micro-batch")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    o.add_argument("--lr", type=float, default=1.5e-4, help="peak learning rate (AdamW)")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine ends at lr * this")
    o.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="on matrices only")
    o.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    o.add_argument("--self-cond-prob", type=float, default=0.5, help="share of examples trained self-conditioned")
    o.add_argument("--seed", type=int, default=0, help="seeds the data windows, the noise and the initialisation")
    r = p.add_argument_group("run folder and logs")
    r.add_argument("--out", required=True, help="run folder")
    r.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    r.add_argument("--log-every", type=int, default=10, help="one log line per N steps, holding their means")
    r.add_argument("--report-to", action="append", default=[], choices=["tensorboard"],
                   help="also log to TensorBoard (needs the tensorboard package); repeatable")
    r.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from the run folder's latest checkpoint")
    r.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over; an older run in the folder is moved to replaced-STAMP/")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (None: cuda:LOCAL_RANK if available)")
    r.add_argument("--export-dtype", default="auto", help="dtype of final/: auto (as trained), bfloat16, float32")
    r.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")
    m = p.add_argument_group("parallelism and memory (under torchrun)")
    m.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                   help="ddp: a full replica per rank; fsdp: parameters, gradients and AdamW state sharded (FSDP2)")
    m.add_argument("--param-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="FSDP compute dtype (fp32 master weights and reductions); auto: bfloat16 on CUDA, else float32")
    m.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer in the backward instead of keeping its activations")
    return p


def _config_keys(cfg: ModelConfig) -> tuple[set[str], set[str]]:
    """Top-level and text_config keys dgemma reads or writes; anything else in a --config is a typo."""
    d = replace(cfg, raw={}).to_dict()
    top = set(d) | {"model_type", "text_config", "vision_config", "dtype", "transformers_version",
                    "bos_token_id", "pad_token_id"}
    text = set(d["text_config"]) | {"per_layer_config", "attention_k_eq_v"}
    return top, text


def _model_config(spec: str) -> ModelConfig:
    inline = spec.lstrip().startswith("{")
    source = "--config" if inline else spec
    try:
        d = json.loads(spec) if inline else json.loads(Path(spec).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {spec}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if "text_config" not in d:  # a bare text config
        d = {"model_type": "diffusion_gemma", "text_config": d}
    cfg = ModelConfig.from_dict(d, source=source)
    top, text = _config_keys(cfg)
    for where, keys, known in (("", d, top), ("text_config.", d["text_config"], text)):
        for k in keys:
            if k not in known:
                near = difflib.get_close_matches(k, known, 1)
                raise ValueError(f"{source}: unknown field {where}{k!r}" + (f" (did you mean {near[0]!r}?)"
                                                                          if near else ""))
    return cfg


def _data_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--data-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _resolve_init(init_from: str | None) -> Path | None:
    if not init_from:
        return None
    if init_from == "default" and not Path(init_from).exists():
        from ..llm import default_model_path
        return default_model_path()
    return checkpoint.resolve(init_from).resolve()


def _skeleton(init_path: Path) -> DiffusionGemma:
    """A checkpoint's model on the meta device, vision tower included, no weight read."""
    config = ModelConfig.from_file(init_path / "config.json")
    with torch.device("meta"):
        model = DiffusionGemma(config)
        vision = checkpoint._vision_for(config, checkpoint.weight_files(init_path))
        if vision is not None:
            model.vision = vision
    return model


def _model_of_run(out: Path, meta: bool = False) -> DiffusionGemma:
    """The model of a from-scratch run's newest readable checkpoint (its weights are then loaded by the Trainer).
    A sharded (FSDP) checkpoint holds no config.json: the architecture comes from its trainer_state.json (built
    on the meta device with `meta`: an FSDP rank other than 0)."""
    for path in RunFolder(out).candidates():
        try:
            if (path / "sharded").is_dir():
                state = json.loads((path / "trainer_state.json").read_text())
                with torch.device("meta" if meta else "cpu"):
                    return DiffusionGemma(ModelConfig.from_dict(state["identity"]["model"], source=str(path)))
            return checkpoint.load(path / "model", dtype=torch.float32).model
        except (OSError, ValueError, KeyError):
            continue
    raise ValueError(f"{out}: no readable checkpoint to resume; give --config or --init-from")


def _param_dtype(args) -> str | None:
    """FSDP's compute dtype: None (fp32, no cast) unless bf16 is asked for, or auto on CUDA."""
    if args.parallel != "fsdp":
        if args.param_dtype not in ("auto", "float32"):
            raise ValueError(f"--param-dtype {args.param_dtype} needs --parallel fsdp (ddp autocasts to bf16 on CUDA)")
        return None
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    want = "bfloat16" if args.param_dtype == "auto" and cuda else args.param_dtype
    return None if want in ("auto", "float32") else want


def _warnings(args, cfg: TrainConfig) -> list[str]:
    out = []
    if cfg.warmup >= cfg.steps:
        out.append(f"--warmup {cfg.warmup} is not shorter than the run (--steps {cfg.steps}): the learning rate "
                   "never leaves the warm-up, and the cosine decay never happens")
    if args.lora_alpha is not None and not args.lora_rank:
        out.append("--lora-alpha has no effect without --lora-rank")
    for flag, value in (("--save-every", cfg.save_every), ("--eval-every", cfg.eval_every)):
        if value > cfg.steps:
            out.append(f"{flag} {value} is longer than the run (--steps {cfg.steps}): only the last step does it")
    if args.eval_every and not (args.val_data or args.val_fraction):
        out.append("--eval-every has no effect without --val-data or --val-fraction")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        from .plot import main as plot_main
        return plot_main(argv[1:])
    if argv[:1] == ["plan"]:
        from .train_memory import main as plan_main
        return plan_main(argv[1:])
    rank = int(os.environ.get("RANK", "0"))
    try:
        return _main(argv)
    except ERRORS as e:
        if rank == 0:  # under torchrun every rank fails the same way: one report is enough
            print(f"dgemma train: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # -- everything is checked before any process group, model or run folder is touched ------------------------
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        save_every=args.save_every, log_every=args.log_every, eval_every=args.eval_every,
        val_examples=args.val_examples, keep_best=args.keep_best, seed=args.seed,
        self_cond_prob=args.self_cond_prob, require_eos=not args.no_eos_canvas, freeze_router=args.freeze_router,
        progress=not args.no_progress, report_to=tuple(dict.fromkeys(args.report_to)), parallel=args.parallel,
        param_dtype=_param_dtype(args), activation_checkpointing=args.activation_checkpointing)
    if not 0.0 <= args.self_cond_prob <= 1.0:
        raise ValueError(f"--self-cond-prob must be in [0, 1], got {args.self_cond_prob}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if args.canvas_length is not None and args.canvas_length <= 0:
        raise ValueError(f"--canvas-length must be positive, got {args.canvas_length}")
    export_dtype = checkpoint.parse_dtype(args.export_dtype)
    if args.val_data and args.val_fraction:
        raise ValueError("give --val-data or --val-fraction, not both")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.parallel == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise ValueError("--parallel fsdp runs under torchrun: torchrun --nproc-per-node N -m dgemma.train.cli ... "
                         "(N = 1 works)")
    if args.keep_best and not (args.val_data or args.val_fraction):
        raise ValueError("--keep-best needs validation: --val-data or --val-fraction")
    if cfg.report_to and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)")
    options = _data_options(args.data_arg)
    out = Path(args.out)
    saved = RunFolder(out).latest_state() if args.resume else {}
    # a resume may omit what the run already says; --config means "from scratch", never the run's base checkpoint
    init_path = _resolve_init(args.init_from or (None if args.config else saved.get("init_from")))
    lora_rank = args.lora_rank or ((saved.get("lora") or {}).get("rank", 0))
    lora_alpha = args.lora_alpha if args.lora_alpha is not None else (saved.get("lora") or {}).get("alpha")
    lora = LoRAConfig(rank=lora_rank, alpha=lora_alpha) if lora_rank else None
    model_config = _model_config(args.config) if args.config else None
    tok_dir = args.tokenizer or (str(init_path) if init_path and (init_path / "tokenizer.json").is_file() else None) \
        or saved.get("tokenizer_dir")
    tokenizer = None
    if tok_dir:
        from ..tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(tok_dir)
    split = {"holdout": args.val_fraction} if args.val_fraction else {}
    source = make_source(args.data, seed=args.seed, tokenizer=tokenizer, **options, **split)
    val_source = None
    if args.val_data:
        val_source = make_source(args.val_data, seed=args.seed, tokenizer=tokenizer, **options)
    elif args.val_fraction:
        val_source = make_source(args.data, seed=args.seed, tokenizer=tokenizer, **options, **split, split="val")
    if val_source is not None:
        val_source.example(0)
    if rank == 0:
        for w in _warnings(args, cfg):
            print(f"dgemma train: warning: {w}", file=sys.stderr)

    # -- the model ------------------------------------------------------------------------------------------------
    rank, _ = setup_distributed()
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    generation = passthrough = None
    skeleton = args.parallel == "fsdp" and rank > 0  # rank 0's weights reach it by broadcast as FSDP shards them
    if init_path is not None:
        if skeleton:
            model = _skeleton(init_path)
        else:
            ck = checkpoint.load(init_path, dtype=torch.float32)
            model, generation, passthrough = ck.model, ck.generation, ck.passthrough
    elif model_config is not None:
        if skeleton:
            with torch.device("meta"):
                model = DiffusionGemma(model_config)
        else:
            model = DiffusionGemma(model_config)
            model.init_weights(generator=torch.Generator().manual_seed(args.seed))
    elif saved and saved.get("lora") is None:  # resuming a from-scratch run: the architecture is in its checkpoint
        model = _model_of_run(out, meta=skeleton)
    else:
        raise ValueError("give --config (from scratch) or --init-from (fine-tune)")
    if args.canvas_length:
        model.config = model.config.with_canvas_length(args.canvas_length)
    identity = {"data": args.data, "data_options": options, "val_fraction": args.val_fraction,
                "tokenizer": hashlib.sha256(Path(tok_dir, "tokenizer.json").read_bytes()).hexdigest()[:16]
                if tok_dir else None}
    trainer = Trainer(model, source, cfg, out, lora=lora, generation=generation, passthrough=passthrough,
                      device=device, resume=args.resume, init_from=str(init_path) if init_path else None,
                      val_source=val_source, tokenizer_dir=tok_dir, identity=identity)
    if trainer.step and rank == 0:
        print(f"dgemma train: resumed from step {trainer.step} ({trainer.position} examples)", file=sys.stderr)
    trainer.train()
    path = trainer.export(out / "final", dtype=export_dtype)
    if rank == 0:
        last = {}
        lines = trainer.folder.metrics.read_text().splitlines() if trainer.folder.metrics.is_file() else []
        for ln in lines:
            last.update(json.loads(ln))
        print(json.dumps({"final": str(path), **trainer.summary(), "loss": last.get("loss"),
                          "val_loss": last.get("val_loss")}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
