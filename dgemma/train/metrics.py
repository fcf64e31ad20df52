"""What a run reports (rank 0): `metrics.jsonl`, the console, and optionally TensorBoard.

Each logged line holds the *mean* of the steps since the previous one (`steps_averaged` of them): loss and its two
parts, grad norm, examples/s; `lr` is the last step's and `examples` / `tokens` are running totals. Intervals are
aligned to multiples of `log_every` and their partial sums are part of the checkpoint, so a resumed run writes the
same lines as one that was never killed. An evaluation adds `val_*` keys to its step's line (or a line of its own).

The console gets a rich progress bar on a terminal and, otherwise (a log file, a pipe, a batch job), one plain line
per logged step: `step 40/200 loss 4.1234 lr 1.40e-04 ex/s 35.2 eta 0:04:31 val 4.3011`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MEANS = ("loss", "decoder_loss", "encoder_loss", "grad_norm", "examples_per_s")


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsLog:
    def __init__(self, path: Path | None, total_steps: int, log_every: int, *, console: str = "plain",
                 report_to: tuple[str, ...] = (), interval: dict | None = None, start_step: int = 0):
        """`path`: metrics.jsonl (None: write nothing); `console`: "bar" (rich, for terminals), "plain" (lines)
        or "off"; `interval`: the partial sums of the current interval, updated in place (they are checkpointed)."""
        self.path, self.total, self.every, self.console = path, total_steps, log_every, console
        self.interval = interval if interval is not None else {"sums": {}, "count": 0}
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.last: dict = {}
        self.bar = self.task = self.tb = None
        if console == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def step(self, rec: dict, val: dict | None = None) -> dict | None:
        """Account one optimiser step (and its evaluation, if any); returns the line written, if one was."""
        sums, step = self.interval["sums"], rec["step"]
        for k in MEANS:
            if rec.get(k) is not None:
                sums[k] = sums.get(k, 0.0) + rec[k]
        self.interval["count"] += 1
        line = None
        if step % self.every == 0 or step == self.total:
            n = self.interval["count"]
            line = {"step": step, **{k: v / n for k, v in sums.items()},
                    **{k: rec[k] for k in ("decoder_loss", "encoder_loss") if rec.get(k) is None and k in rec},
                    "lr": rec["lr"], "examples": rec["examples"], "tokens": rec["tokens"], "steps_averaged": n,
                    "wall_s": rec.get("wall_s")}
            self.interval["sums"], self.interval["count"] = {}, 0
        if val is not None:
            line = {**(line or {"step": step}), **val}
        if line is not None:
            self._write(line)
        self._show(rec, line)
        return line

    def _write(self, line: dict) -> None:
        if self.path is None:  # ranks other than 0
            return
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if self.tb is not None:
            for k, v in line.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(("val/" if k.startswith("val_") else "train/") + k.removeprefix("val_"),
                                       v, line["step"])
            self.tb.flush()

    def _show(self, rec: dict, line: dict | None) -> None:
        step = rec["step"]
        done = step - self.start_step
        eta = (time.perf_counter() - self.t0) / done * (self.total - step) if done else 0.0
        if line is not None:
            self.last = {**self.last, **line}
        if self.console == "bar":
            info = f"loss {self.last.get('loss', rec['loss']):.4f} lr {rec['lr']:.2e}"
            if "val_loss" in self.last:
                info += f" val {self.last['val_loss']:.4f}"
            self.bar.update(self.task, completed=step, info=info)
        elif self.console == "plain" and line is not None:
            text = f"step {step}/{self.total}"
            if "loss" in line:
                text += (f" loss {line['loss']:.4f} lr {line['lr']:.2e} ex/s {line['examples_per_s']:.1f}"
                         f" eta {clock(eta)}")
            if "val_loss" in line:
                text += f" val {line['val_loss']:.4f}"
            print(text, flush=True)

    def note(self, text: str) -> None:
        """A line for the person watching (above the bar on a terminal)."""
        if self.console == "bar":
            self.bar.console.print(text)
        elif self.console == "plain":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.tb is not None:
            self.tb.close()


def console_mode(progress: bool, rank: int) -> str:
    if rank != 0:
        return "off"
    return "bar" if progress and sys.stdout.isatty() else "plain"
