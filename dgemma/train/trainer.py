"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, data parallelism, evaluation, exact resume,
export.

- One optimiser step consumes a *global batch* of `batch_size * grad_accum * world_size` examples, the ones at
  global indices `[position, position + global)`; micro-batch m of rank r takes a contiguous slice of it. Losses are
  sums normalised by the global counts, so gradient accumulation and any number of ranks give the gradient of the
  same global-batch mean (up to float summation order).
- Data parallelism (`torchrun`): the gradients are summed across ranks with one explicit all-reduce per step rather
  than through torch's DDP wrapper, whose hooks need `find_unused_parameters` here (MoE experts that get no token on
  a rank, the self-conditioning MLP when no row uses it) and fight gradient accumulation. Same result, fewer parts.
- Fully sharded data parallelism (`parallel="fsdp"`, fsdp.py): parameters, gradients and AdamW state sharded over
  the ranks with FSDP2, optionally bf16 parameters with fp32 reductions (`param_dtype`); the same global batch and
  the same losses, so the same curve. Its checkpoints are sharded (`step-N/sharded/`, every rank writes its part).
- Activation checkpointing (`activation_checkpointing`, either mode): each layer is recomputed in the backward.
- Checkpoints (`out/checkpoints/step-N/`, see run_folder.py): model weights in the HF layout via
  `dgemma.checkpoint.save` (LoRA runs: only the adapter, in peft's layout), optimiser tensors in safetensors with
  their settings in `trainer_state.json`, with the step, the data position (the whole state of the data stream:
  sources and noise are keyed on the example index), the RNG states, the log interval's partial sums, the best
  validation loss, and the run's *identity* (architecture, base checkpoint, LoRA shape, data, tokenizer, a
  fingerprint of the first examples). No pickles anywhere. A killed run restarted on the same folder continues
  exactly; a resume into another run's folder is refused with the differences listed; changed hyper-parameters are
  stated and recorded (`changes` in trainer_state.json).
- Evaluation (`val_source`, `eval_every`): see evaluation.py; `keep_best` exports the best model to `out/best/`.
- Exports (`final/`, `best/`): HF layout (LoRA merged) + the tokenizer files + `adapter/` (peft layout) for LoRA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .. import checkpoint
from ..config import GenerationConfig
from ..model import DiffusionGemma
from . import fsdp
from .data import as_source, collate
from .evaluation import evaluate
from .lora import LoRAConfig, apply_lora, has_lora, merge_lora, unmerge_lora
from .metrics import MetricsLog, clock, console_mode
from .objective import ObjectiveConfig, encoder_targets, loss_parts
from .peft_adapter import read_adapter, save_adapter
from .run_folder import RunFolder, differences, write_durably

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "additional_chat_templates")
# Settings that change what or how the run learns: a resume that changes one says so and records it.
UNSTATED = {"progress", "report_to", "log_every", "save_every", "keep_checkpoints", "eval_every", "val_examples",
            "keep_best", "parallel", "activation_checkpointing"}
PARALLEL = ("ddp", "fsdp")
PARAM_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}


class LayoutError(ValueError):
    """A checkpoint this trainer cannot resume at all (not a damaged one to skip): it stops the resume."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 8  # per rank and micro-batch
    grad_accum: int = 1
    lr: float = 1.5e-4
    warmup: int = 0
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    betas: tuple[float, float] = (0.95, 0.99)  # the reference SFT recipe (spec section 2)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4  # matrices only; norms, scales and biases are not decayed
    grad_clip: float = 1.0  # 0 disables
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1  # metrics.jsonl and the console: one line per interval, holding its means
    eval_every: int = 0  # 0: evaluate at the end only (when there is a validation source)
    val_examples: int = 64  # the fixed validation set: examples 0 .. val_examples-1 of the validation source
    keep_best: bool = False  # export the model of the best validation loss to out/best/
    seed: int = 0
    eps: float = 1e-3
    self_cond_prob: float = 0.5
    decoder_loss_weight: float = 1.0
    encoder_loss_weight: float = 1.0
    encoder_loss_on_prompt: bool = True
    require_eos: bool = True
    freeze_router: bool = False
    autocast: bool | None = None  # None: bf16 autocast on CUDA, none elsewhere
    progress: bool = True  # a progress bar on a terminal (plain log lines otherwise)
    report_to: tuple[str, ...] = ()  # ("tensorboard",): also write TensorBoard scalars to out/tensorboard/
    parallel: str = "ddp"  # "ddp": a full replica per rank; "fsdp": FSDP2, everything sharded (fsdp.py)
    param_dtype: str | None = None  # FSDP mixed precision: "bfloat16" computes in bf16 (fp32 master weights)
    activation_checkpointing: bool = False  # recompute each layer in the backward

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every", "val_examples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got lr {self.lr}, min_lr_ratio "
                             f"{self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.betas) or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("need betas in [0, 1), weight_decay >= 0, grad_clip >= 0")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be float32 or bfloat16, got {self.param_dtype!r}")
        if self.param_dtype is not None and self.parallel != "fsdp":
            raise ValueError("param_dtype (mixed precision) needs parallel='fsdp'; the ddp trainer autocasts on CUDA")
        unknown = set(self.report_to) - {"tensorboard"}
        if unknown:
            raise ValueError(f"report_to: unknown logger(s) {sorted(unknown)}; known: tensorboard")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step `step` (0-based): linear warm-up, then cosine to lr * min_lr_ratio."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def setup_distributed() -> tuple[int, int]:
    """Join the process group that `torchrun` describes (gloo on CPU, nccl on CUDA); (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _jsonable(obj):
    """As it reads back from JSON (tuples become lists), so saved and current values compare equal."""
    return json.loads(json.dumps(obj, default=int))


def fingerprint(examples: list) -> str:
    """A hash of the first examples: another file, tokenizer, window or seed gives another fingerprint."""
    return hashlib.sha256(json.dumps(examples, default=int).encode()).hexdigest()[:16]


class Trainer:
    """Trains `model` in place on `source` (see data.py) into the run folder `out_dir`; resumes from its latest
    complete checkpoint unless `resume=False` (which moves an older run in the folder aside). `lora` wraps the
    linears first (fine-tuning); `val_source` is evaluated every `cfg.eval_every` steps and at the end;
    `tokenizer_dir`'s files go into every export; `identity` adds what the run is (data spec, tokenizer hash) to
    what a resume must match; `on_step(trainer, record)` runs after every step (tests use it to kill a run)."""

    def __init__(self, model: DiffusionGemma, source, cfg: TrainConfig, out_dir: str | Path, *,
                 lora: LoRAConfig | None = None, generation: GenerationConfig | None = None,
                 passthrough: dict | None = None, device: str | torch.device | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, resume: bool = True,
                 init_from: str | None = None, val_source=None, tokenizer_dir: str | Path | None = None,
                 identity: dict | None = None, on_step: Callable[[Trainer, dict], None] | None = None):
        self.cfg, self.out, self.folder = cfg, Path(out_dir), RunFolder(out_dir)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(device) if device is not None else model.device
        self.fsdp = cfg.parallel == "fsdp"
        if self.fsdp and not dist.is_initialized():
            raise ValueError("parallel='fsdp' needs a process group: launch with torchrun (one process works too)")
        # FSDP moves each unit to the device as it shards it: the whole model never sits on one device.
        self.model = (model if self.fsdp else model.to(self.device)).train()
        self.source, self.lora = as_source(source), lora
        self.val_source = as_source(val_source) if val_source is not None else None
        self.generation, self.passthrough, self.init_from, self.on_step = generation, passthrough, init_from, on_step
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        text = model.text
        self.eos_id = text.eos_token_id if eos_id is None else eos_id
        self.pad_id = text.pad_token_id if pad_id is None else pad_id
        self.objective = ObjectiveConfig(
            canvas_length=model.config.canvas_length, vocab_size=text.vocab_size, eps=cfg.eps,
            self_cond_prob=cfg.self_cond_prob, decoder_loss_weight=cfg.decoder_loss_weight,
            encoder_loss_weight=cfg.encoder_loss_weight, encoder_loss_on_prompt=cfg.encoder_loss_on_prompt,
            seed=cfg.seed)
        self.identity = self._identity(identity or {})
        if lora is not None:
            apply_lora(self.model, lora, seed=cfg.seed)
        else:
            for name, p in self.model.named_parameters():
                p.requires_grad_(not (cfg.freeze_router and ".router." in f".{name}"))
        if cfg.activation_checkpointing:
            fsdp.checkpoint_layers(self.model)
        # Every rank starts from rank 0's weights, whatever each one loaded or initialised. Under FSDP that happens
        # unit by unit as it shards, so the other ranks may bring a model built on the meta device (the CLI does).
        if self.fsdp:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            fsdp.shard(self.model, PARAM_DTYPES[cfg.param_dtype], self.device)
        elif self.world > 1:
            fsdp.broadcast_from_rank0(self.model, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        other = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        self.step, self.position, self.tokens, self.wall = 0, 0, 0, 0.0
        self.interval: dict = {"sums": {}, "count": 0}
        self.best: dict | None = None
        self.changes: list[dict] = []
        # FSDP's mixed precision casts the parameters itself; autocast stays for the unsharded trainer on CUDA
        self.autocast = cfg.autocast if cfg.autocast is not None else (
            self.device.type == "cuda" and cfg.param_dtype is None)
        self._open_folder(resume)

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(f"dgemma train: {text}", file=sys.stderr, flush=True)

    def _identity(self, extra: dict) -> dict:
        """What a resume must match. Laying out the first examples also checks, before any step, that the data
        fits the model (token ids inside the vocabulary)."""
        probe = [self.source.example(i) for i in range(4)]
        collate(probe, range(4), self.objective.canvas_length, self.eos_id, self.pad_id, self.objective.vocab_size,
                self.cfg.require_eos)
        ident = {"model": replace(self.model.config, raw={}).to_dict(), "init_from": self.init_from,
                 "lora": asdict(self.lora) if self.lora else None, "examples": fingerprint(probe)}
        return _jsonable({**ident, **extra})

    def _open_folder(self, resume: bool) -> None:
        if self.rank == 0:
            for name in self.folder.clean_leftovers():
                self._say(f"removed {self.out / name}, left by a killed run")
        loaded = False
        if resume and self.folder.has_checkpoints():
            failures = []
            for path in self.folder.candidates():
                error = None
                try:
                    data = self._read(path)
                except LayoutError:
                    raise
                except Exception as e:  # reading has no side effects: a damaged checkpoint is only skipped
                    error = f"{path.name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                if not self._all_agree(error is None):  # every rank resumes from the same checkpoint
                    failures.append(error or f"{path.name} (unreadable on another rank)")
                    continue
                if failures:
                    self._say(f"checkpoint {'; '.join(failures)} is damaged or incomplete; resuming from "
                              f"{path.name} instead")
                self._check_identity(path, data["state"])
                self._apply(data)
                loaded = True
                break
            if not loaded:
                raise ValueError(f"{self.out}: no complete checkpoint to resume from ({'; '.join(failures)}); "
                                 "start over with --no-resume (the old run is moved aside) or another --out")
            if self.step > self.cfg.steps:
                raise ValueError(f"{self.out}: the run is already at step {self.step}; --steps {self.cfg.steps} "
                                 "is behind it (give more steps, or --no-resume / another --out for a new run)")
        elif self.rank == 0:
            moved = self.folder.move_aside()
            if moved is not None:
                self._say(f"fresh start: moved the previous run in {self.out} to {moved} (delete it when no "
                          "longer needed)")
        if self.world > 1:
            dist.barrier()

    def _all_agree(self, ok: bool) -> bool:
        if self.world == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    # -- one step ------------------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def _micro_batches(self):
        bs = self.cfg.batch_size
        for m in range(self.cfg.grad_accum):
            start = self.position + (m * self.world + self.rank) * bs
            idx = list(range(start, start + bs))
            batch = collate([self.source.example(i) for i in idx], idx, self.objective.canvas_length, self.eos_id,
                            self.pad_id, self.objective.vocab_size, self.cfg.require_eos)
            yield batch.to(self.device)

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        obj, micro = self.objective, list(self._micro_batches())
        # Normalise by the *global* counts, known before any backward: every micro-batch and rank then contributes
        # exactly its share of the global-batch mean.
        # (Tensors for collectives live on the device: nccl reduces CUDA tensors only.)
        count = sum(int(encoder_targets(b, obj).sum()) for b in micro)
        enc_count = self._all_sum(torch.tensor([float(count)], dtype=torch.float64, device=self.device))
        enc_norm, dec_norm = max(float(enc_count), 1.0), float(self.global_batch * obj.canvas_length)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # decoder sum, encoder sum, tokens
        for batch in micro:
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
            with ctx:
                parts = loss_parts(self.model, batch, obj, lockstep=self.fsdp)
            parts.total(obj, dec_norm, enc_norm).backward()
            sums += torch.stack([parts.decoder_sum.detach().double(), parts.encoder_sum.detach().double(),
                                 batch.lengths.sum().double()])
        # Every trainable parameter steps with a gradient, zeros where no example reached it (the self-conditioning
        # MLP in a batch with no self-conditioned row): AdamW skips a parameter whose gradient is None, so with a
        # None the update would depend on how the batch is split over ranks (FSDP and DDP reduce zeros).
        if self.world > 1 and not self.fsdp:  # FSDP reduce-scattered them during the backward
            self._all_reduce_grads()
        elif not self.fsdp:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        sums = self._all_sum(sums)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.fsdp:
            grad_norm = fsdp.clip_grad_norm(self.params, clip)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        lr = self.cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.step += 1
        self.position += self.global_batch
        self.tokens += int(sums[2])
        dec, enc = float(sums[0]) / dec_norm, float(sums[1]) / enc_norm
        # A part with weight 0 is not computed (objective.loss_parts): its metric is null.
        return {"step": self.step, "loss": obj.decoder_loss_weight * dec + obj.encoder_loss_weight * enc,
                "decoder_loss": dec if obj.decoder_loss_weight > 0 else None,
                "encoder_loss": enc if obj.encoder_loss_weight > 0 else None, "lr": lr, "grad_norm": grad_norm,
                "examples_per_s": self.global_batch / (time.perf_counter() - t0), "examples": self.position,
                "tokens": self.tokens}

    def _all_reduce_grads(self, bucket_elems: int = 1 << 24) -> None:
        # Summed, not averaged: each rank's loss is already divided by the global counts.
        for p in self.params:
            if p.grad is None:  # e.g. an expert no token of this rank reached
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            bucket.append(p.grad)
            if sum(g.numel() for g in bucket) >= bucket_elems or i == len(self.params) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
                bucket = []

    def evaluate(self) -> dict:
        """Validation loss of both parts on the fixed held-out set (see evaluation.py)."""
        return evaluate(self.model, self.val_source, self.cfg.val_examples, self.objective,
                        batch_size=self.cfg.batch_size, eos_id=self.eos_id, pad_id=self.pad_id,
                        require_eos=self.cfg.require_eos, autocast=self.autocast, rank=self.rank, world=self.world,
                        lockstep=self.fsdp)

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run to `cfg.steps` (from wherever a resumed run stands); returns this call's per-step records."""
        records = []
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.folder.metrics if self.rank == 0 else None, self.cfg.steps, self.cfg.log_every,
                         console=console_mode(self.cfg.progress, self.rank),
                         report_to=self.cfg.report_to if self.rank == 0 else (), interval=self.interval,
                         start_step=self.step)
        t0, wall0, first = time.perf_counter(), self.wall, self.step
        try:
            while self.step < self.cfg.steps:
                rec = self.train_step()
                self.wall = wall0 + time.perf_counter() - t0
                rec["wall_s"] = self.wall
                val = None
                if self.val_source is not None and (self.step == self.cfg.steps or (
                        self.cfg.eval_every and self.step % self.cfg.eval_every == 0)):
                    val = self.evaluate()
                    rec.update(val)
                    if self.best is None or val["val_loss"] < self.best["val_loss"]:
                        self.best = {"step": self.step, "val_loss": val["val_loss"]}
                        if self.cfg.keep_best:
                            self.export(self.out / "best", info={"best.json": self.best})
                log.step(rec, val)
                records.append(rec)
                if self.on_step is not None:
                    self.on_step(self, rec)
                if (self.cfg.save_every and self.step % self.cfg.save_every == 0) or self.step == self.cfg.steps:
                    self.save()
                self.wall = wall0 + time.perf_counter() - t0
            if self.rank == 0:
                log.note(self.summary_line(self.step - first, time.perf_counter() - t0))
        finally:
            log.close()
        return records

    def summary(self) -> dict:
        return {"step": self.step, "wall_s": round(self.wall, 3), "tokens": self.tokens, "examples": self.position,
                "best_val_loss": self.best["val_loss"] if self.best else None,
                "best_step": self.best["step"] if self.best else None}

    def summary_line(self, steps: int, seconds: float) -> str:
        text = (f"done: step {self.step}/{self.cfg.steps} ({steps} this run, {clock(seconds)}; {clock(self.wall)} "
                f"in all), {self.tokens:,} tokens seen")
        if self.best:
            text += f", best validation loss {self.best['val_loss']:.4f} at step {self.best['step']}"
        return text

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save(self) -> Path:
        final = self.folder.checkpoints / f"step-{self.step:08d}"
        tmp = self.folder.checkpoints / f".{final.name}.tmp"
        if self.rank == 0:
            self.folder.checkpoints.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        if self.fsdp:  # every rank writes its shards (the run folder must be on storage that all nodes share)
            dist.barrier()
            fsdp.save_sharded(tmp, self.model, self.optimizer, self.lora is not None)
        if self.rank == 0:
            osd = self.optimizer.state_dict()  # (FSDP: only its hyper-parameters are used from it)
            if not self.fsdp:
                if self.lora is not None:
                    save_adapter(self.model, self.lora, tmp / "adapter", base_model=self.init_from)
                else:
                    checkpoint.save(self.model, tmp / "model", generation=self.generation,
                                    passthrough=self.passthrough)
                save_file({f"{pid}.{k}": v.detach().contiguous().cpu() for pid, st in osd["state"].items()
                           for k, v in st.items()}, str(tmp / "optimizer.safetensors"))
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / "rng.safetensors"))
            np_state = np.random.get_state()
            py_state = random.getstate()
            state = {"step": self.step, "position": self.position, "tokens": self.tokens, "wall_s": self.wall,
                     "world_size": self.world, "layout": "sharded" if self.fsdp else "full",
                     "config": asdict(self.cfg), "identity": self.identity,
                     "lora": asdict(self.lora) if self.lora else None, "init_from": self.init_from,
                     "tokenizer_dir": str(self.tokenizer_dir) if self.tokenizer_dir else None,
                     "changes": self.changes, "interval": self.interval, "best": self.best,
                     "optimizer_param_groups": osd["param_groups"],
                     "scheduler": {"kind": "warmup_cosine", "step": self.step, "lr": self.cfg.lr_at(self.step)},
                     "rng": {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                                       float(np_state[4])],
                             "python": [py_state[0], list(py_state[1]), py_state[2]]}}
            write_durably(tmp / "trainer_state.json", json.dumps(state, indent=1))
            self.folder.publish(tmp, self.step, self.cfg.keep_checkpoints)
        if self.world > 1:
            dist.barrier()
        return final

    def _read(self, path: Path) -> dict:
        """Everything a checkpoint holds, read and checked, nothing applied yet (a damaged one raises). A sharded
        checkpoint (FSDP) is only checked here (every shard's header against the tensors the run needs): it is
        read into place by `_apply`."""
        state = json.loads((path / "trainer_state.json").read_text())
        rng = load_file(str(path / "rng.safetensors"))
        if state.get("layout") == "sharded":
            if (state.get("lora") is None) == (self.lora is None):  # else: an identity difference, reported later
                fsdp.check_sharded(path, self.model, self.optimizer, self.lora is not None)
            return {"state": state, "weights": None, "optimizer": None, "rng": rng, "path": path, "sharded": True}
        if self.fsdp:
            raise LayoutError(f"{path} was written by the unsharded trainer (parallel 'ddp'); resume it with "
                              "--parallel ddp (its export loads into an FSDP run via --init-from)")
        if self.lora is not None and state.get("lora") is not None:
            if (path / "lora.safetensors").is_file():  # the layout before peft adapters
                weights = load_file(str(path / "lora.safetensors"))
            else:
                weights = read_adapter(path / "adapter", self.lora)
            names = {n for n, _ in self.model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
            if set(weights) != names:
                raise ValueError(f"adapter tensors {sorted(set(weights) ^ names)[:4]} do not fit the model")
        elif self.lora is None and state.get("lora") is None:
            weights = checkpoint.load(path / "model").model.state_dict()
        else:
            weights = None  # LoRA against full: an identity difference, reported by _check_identity
        flat = load_file(str(path / "optimizer.safetensors"))
        return {"state": state, "weights": weights, "optimizer": flat, "rng": rng, "path": path, "sharded": False}

    def _check_identity(self, path: Path, state: dict) -> None:
        saved = state.get("identity") or {"lora": state.get("lora")}
        diff = differences(saved, self.identity)
        if diff:
            raise ValueError(f"{self.out} holds another run ({path.name}); it differs in: {'; '.join(diff)}. "
                             "Use another --out, or --no-resume to start over (the old run is moved aside)")
        old = {k: v for k, v in state.get("config", {}).items() if k not in UNSTATED}
        now = {k: v for k, v in _jsonable(asdict(self.cfg)).items() if k not in UNSTATED}
        changed = {k: [old[k], now[k]] for k in now if k in old and old[k] != now[k]}
        self.changes = list(state.get("changes", []))
        if changed:
            self.changes.append({"step": state["step"], **changed})
            self._say(f"resuming {path.name} with changed settings (recorded in trainer_state.json): "
                      + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))

    def _apply(self, data: dict) -> None:
        state, path = data["state"], data["path"]
        if data["sharded"]:
            fsdp.load_sharded(path, self.model, self.optimizer, self.lora is not None)
            for g, saved in zip(self.optimizer.param_groups, state["optimizer_param_groups"]):
                g.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})
        else:
            self._apply_full(data)
        self.step, self.position = state["step"], state["position"]
        self.tokens, self.wall = state.get("tokens", 0), state.get("wall_s", 0.0)
        self.interval = state.get("interval") or {"sums": {}, "count": 0}
        self.best = state.get("best")
        rng = data["rng"]
        torch.set_rng_state(rng["torch"])
        cuda = [rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        n = state["rng"]["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), n[4]))
        p = state["rng"]["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
        metrics = self.folder.metrics
        if self.rank == 0 and metrics.is_file():  # drop what the killed run logged after this checkpoint
            keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        if self.world > 1:
            dist.barrier()

    def _apply_full(self, data: dict) -> None:
        state, path = data["state"], data["path"]
        with torch.no_grad():
            if self.lora is not None:
                params = dict(self.model.named_parameters())
                for k, v in data["weights"].items():
                    params[k].copy_(v)
            else:
                missing, unexpected = self.model.load_state_dict(data["weights"], strict=False)
                if unexpected or any("inv_freq" not in m for m in missing):
                    raise ValueError(f"{path}: weights do not fit the model ({missing} {unexpected})")
        opt_state: dict[int, dict] = {}
        for key, v in data["optimizer"].items():
            pid, _, name = key.partition(".")
            opt_state.setdefault(int(pid), {})[name] = v
        groups = state["optimizer_param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})

    def load(self, path: str | Path) -> None:
        """Resume from one given checkpoint folder (the constructor finds the newest complete one itself)."""
        data = self._read(Path(path))
        self._check_identity(Path(path), data["state"])
        self._apply(data)

    # -- export --------------------------------------------------------------------------------------------------
    def export(self, path: str | Path | None = None, dtype: torch.dtype | None = None,
               info: dict[str, dict] | None = None) -> Path:
        """The trained model in the HF layout (LoRA merged in), loadable by dgemma and by transformers, with the
        tokenizer's files and, for LoRA, `adapter/` in peft's layout; `info` adds small JSON files. Written in a
        hidden folder next to `path` and renamed into place."""
        path = Path(path) if path is not None else self.out / "final"
        model = self.model
        if self.fsdp:  # the full weights, gathered on rank 0, in an unsharded copy of the model
            full = fsdp.gather_full(self.model)
            model = fsdp.plain_copy(self.model, full, self.lora) if self.rank == 0 else None
        if self.rank == 0:
            stage = RunFolder(path.parent).stage(path.name)
            try:
                target = stage / "export"
                adapter = save_adapter(model, self.lora, stage / "adapter", base_model=self.init_from) \
                    if self.lora is not None and has_lora(model) else None
                swaps = merge_lora(model) if has_lora(model) else []
                try:
                    checkpoint.save(model, target, generation=self.generation, passthrough=self.passthrough,
                                    dtype=dtype)
                finally:
                    unmerge_lora(swaps)
                if adapter is not None:
                    os.replace(adapter, target / "adapter")
                for name in TOKENIZER_FILES if self.tokenizer_dir is not None else ():
                    src = self.tokenizer_dir / name
                    if src.is_dir():
                        shutil.copytree(src, target / name)
                    elif src.is_file():
                        shutil.copy2(src, target / name)
                for name, obj in (info or {}).items():
                    (target / name).write_text(json.dumps(obj, indent=1))
                RunFolder(path.parent).replace(target, path)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        return path
