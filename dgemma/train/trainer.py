"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, data parallelism, exact resume, export.

- One optimiser step consumes a *global batch* of `batch_size * grad_accum * world_size` examples, the ones at
  global indices `[position, position + global)`; micro-batch m of rank r takes a contiguous slice of it. Losses are
  sums normalised by the global counts, so gradient accumulation and any number of ranks give the gradient of the
  same global-batch mean (up to float summation order).
- Data parallelism (`torchrun`): the gradients are summed across ranks with one explicit all-reduce per step rather
  than through torch's DDP wrapper, whose hooks need `find_unused_parameters` here (MoE experts that get no token on
  a rank, the self-conditioning MLP when no row uses it) and fight gradient accumulation. Same result, fewer parts.
- Checkpoints (`out/checkpoints/step-N/`, written to a temporary folder, then renamed; `LATEST` names the newest):
  model weights in the HF layout via `dgemma.checkpoint.save` (LoRA runs: only `lora.safetensors`), optimiser
  tensors in safetensors with their settings in `trainer_state.json`, with the step, the data position (the whole
  state of the data stream: sources and noise are keyed on the example index) and the torch/numpy/python RNG
  states. No pickles anywhere. A killed run restarted on the same folder continues exactly.
- `metrics.jsonl` (rank 0): one line per logged step; a resumed run drops lines past its checkpoint first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .. import checkpoint
from ..config import GenerationConfig
from ..model import DiffusionGemma
from .data import as_source, collate
from .lora import LoRAConfig, apply_lora, has_lora, lora_state, merge_lora, unmerge_lora
from .objective import ObjectiveConfig, encoder_targets, loss_parts


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
    log_every: int = 1
    seed: int = 0
    eps: float = 1e-3
    self_cond_prob: float = 0.5
    decoder_loss_weight: float = 1.0
    encoder_loss_weight: float = 1.0
    encoder_loss_on_prompt: bool = True
    require_eos: bool = True
    freeze_router: bool = False
    autocast: bool | None = None  # None: bf16 autocast on CUDA, none elsewhere
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.betas) or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("need betas in [0, 1), weight_decay >= 0, grad_clip >= 0")

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


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class Trainer:
    """Trains `model` in place on `source` (see data.py) into the run folder `out_dir`; resumes from its latest
    checkpoint unless `resume=False`. `lora` wraps the linears first (fine-tuning); `on_step(trainer, record)` runs
    after every step (tests use it to kill a run)."""

    def __init__(self, model: DiffusionGemma, source, cfg: TrainConfig, out_dir: str | Path, *,
                 lora: LoRAConfig | None = None, generation: GenerationConfig | None = None,
                 passthrough: dict | None = None, device: str | torch.device | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, resume: bool = True,
                 init_from: str | None = None, on_step: Callable[[Trainer, dict], None] | None = None):
        self.cfg, self.out = cfg, Path(out_dir)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device).train()
        self.source, self.lora = as_source(source), lora
        self.generation, self.passthrough, self.init_from, self.on_step = generation, passthrough, init_from, on_step
        text = model.text
        self.eos_id = text.eos_token_id if eos_id is None else eos_id
        self.pad_id = text.pad_token_id if pad_id is None else pad_id
        self.objective = ObjectiveConfig(
            canvas_length=model.config.canvas_length, vocab_size=text.vocab_size, eps=cfg.eps,
            self_cond_prob=cfg.self_cond_prob, decoder_loss_weight=cfg.decoder_loss_weight,
            encoder_loss_weight=cfg.encoder_loss_weight, encoder_loss_on_prompt=cfg.encoder_loss_on_prompt,
            seed=cfg.seed)
        if lora is not None:
            apply_lora(self.model, lora, seed=cfg.seed)
        else:
            for name, p in self.model.named_parameters():
                p.requires_grad_(not (cfg.freeze_router and ".router." in f".{name}"))
        if self.world > 1:  # every rank starts from rank 0's weights, whatever each one loaded or initialised
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(t.data, 0)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.ndim >= 2]
        other = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        self.step, self.position = 0, 0
        self.autocast = cfg.autocast if cfg.autocast is not None else self.device.type == "cuda"
        latest = self.latest_checkpoint()
        if resume and latest is not None:
            self.load(latest)
        elif self.rank == 0 and (self.out / "metrics.jsonl").is_file():
            (self.out / "metrics.jsonl").unlink()  # a fresh start voids an older run's log

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
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in micro:
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
            with ctx:
                parts = loss_parts(self.model, batch, obj)
            parts.total(obj, dec_norm, enc_norm).backward()
            sums += torch.stack([parts.decoder_sum.detach(), parts.encoder_sum.detach()]).double()
        if self.world > 1:
            self._all_reduce_grads()
        sums = self._all_sum(sums)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        lr = self.cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.step += 1
        self.position += self.global_batch
        dec, enc = float(sums[0]) / dec_norm, float(sums[1]) / enc_norm
        # A part with weight 0 is not computed (objective.loss_parts): its metric is null.
        return {"step": self.step, "loss": obj.decoder_loss_weight * dec + obj.encoder_loss_weight * enc,
                "decoder_loss": dec if obj.decoder_loss_weight > 0 else None,
                "encoder_loss": enc if obj.encoder_loss_weight > 0 else None, "lr": lr, "grad_norm": grad_norm,
                "examples_per_s": self.global_batch / (time.perf_counter() - t0), "examples": self.position}

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

    # -- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run to `cfg.steps` (from wherever a resumed run stands); returns this call's metric records."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        records, metrics = [], self.out / "metrics.jsonl"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeRemainingColumn(), disable=not (self.cfg.progress and self.rank == 0))
        with bar:
            task = bar.add_task("train", total=self.cfg.steps, completed=self.step, info="")
            while self.step < self.cfg.steps:
                rec = self.train_step()
                records.append(rec)
                if self.rank == 0 and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps):
                    with metrics.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.update(task, completed=self.step, info=f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                                                           f"{rec['examples_per_s']:.1f} ex/s")
                if self.on_step is not None:
                    self.on_step(self, rec)
                if (self.cfg.save_every and self.step % self.cfg.save_every == 0) or self.step == self.cfg.steps:
                    self.save()
        return records

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        latest = self.out / "checkpoints" / "LATEST"
        if not latest.is_file():
            return None
        path = latest.parent / latest.read_text().strip()
        return path if (path / "trainer_state.json").is_file() else None

    def save(self) -> Path:
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:08d}"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".{final.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            if self.lora is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in lora_state(self.model).items()},
                          str(tmp / "lora.safetensors"))
            else:
                checkpoint.save(self.model, tmp / "model", generation=self.generation, passthrough=self.passthrough)
            osd = self.optimizer.state_dict()
            save_file({f"{pid}.{k}": v.detach().contiguous().cpu() for pid, st in osd["state"].items()
                       for k, v in st.items()}, str(tmp / "optimizer.safetensors"))
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / "rng.safetensors"))
            np_state = np.random.get_state()
            py_state = random.getstate()
            state = {"step": self.step, "position": self.position, "world_size": self.world,
                     "config": asdict(self.cfg), "lora": asdict(self.lora) if self.lora else None,
                     "init_from": self.init_from, "optimizer_param_groups": osd["param_groups"],
                     "scheduler": {"kind": "warmup_cosine", "step": self.step, "lr": self.cfg.lr_at(self.step)},
                     "rng": {"numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                                       float(np_state[4])],
                             "python": [py_state[0], list(py_state[1]), py_state[2]]}}
            _write_json(tmp / "trainer_state.json", state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (root / "LATEST.tmp").write_text(final.name)
            os.replace(root / "LATEST.tmp", root / "LATEST")
            for old in sorted(root.glob("step-*"))[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        return final

    def load(self, path: str | Path) -> None:
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if (self.lora is not None) != (state["lora"] is not None):
            raise ValueError(f"{path}: checkpoint was {'a LoRA' if state['lora'] else 'a full'} run; this is not")
        with torch.no_grad():
            if self.lora is not None:
                params = dict(self.model.named_parameters())
                for k, v in load_file(str(path / "lora.safetensors")).items():
                    params[k].copy_(v)
            else:
                ck = checkpoint.load(path / "model")
                missing, unexpected = self.model.load_state_dict(ck.model.state_dict(), strict=False)
                if unexpected or any("inv_freq" not in m for m in missing):
                    raise ValueError(f"{path}: weights do not fit the model ({missing} {unexpected})")
        flat = load_file(str(path / "optimizer.safetensors"))
        opt_state: dict[int, dict] = {}
        for key, v in flat.items():
            pid, _, name = key.partition(".")
            opt_state.setdefault(int(pid), {})[name] = v
        groups = state["optimizer_param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.step, self.position = state["step"], state["position"]
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        cuda = [rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        n = state["rng"]["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), n[4]))
        p = state["rng"]["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
        metrics = self.out / "metrics.jsonl"
        if self.rank == 0 and metrics.is_file():  # drop what the killed run logged after this checkpoint
            keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        if self.world > 1:
            dist.barrier()

    # -- export --------------------------------------------------------------------------------------------------
    def export(self, path: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
        """The trained model in the HF layout (LoRA merged in), loadable by dgemma and by transformers."""
        path = Path(path) if path is not None else self.out / "final"
        swaps = merge_lora(self.model) if has_lora(self.model) else []
        try:
            if self.rank == 0:
                checkpoint.save(self.model, path, generation=self.generation, passthrough=self.passthrough,
                                dtype=dtype)
        finally:
            unmerge_lora(swaps)
        if self.world > 1:
            dist.barrier()
        return path
