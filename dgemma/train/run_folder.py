"""The run folder on disk, made safe to kill at any moment and to point a second run at.

    OUT/metrics.jsonl           one line per logged step (rank 0)
    OUT/checkpoints/step-N/     written as .step-N.tmp/, every file fsynced, then renamed; LATEST names the newest
    OUT/final/  OUT/best/       exports (HF layout + tokenizer + peft adapter), staged in .final.XXXX/ and renamed
    OUT/replaced-STAMP/         an older run moved aside by a fresh start (`--no-resume`), never deleted

Checkpoints are ordered and pruned by their step number, and the one just written is never pruned. A resume tries
the newest checkpoint first and falls back past damaged ones (a truncated file, an empty `trainer_state.json`, a
folder that is gone), saying so. Leftovers of a kill (half-written checkpoints or exports) are removed on start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the folders themselves, so a rename publishes only complete data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Write a small file next to its final name, fsync it, rename it into place, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class RunFolder:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.checkpoints = self.out / "checkpoints"
        self.metrics = self.out / "metrics.jsonl"

    def steps(self) -> list[tuple[int, Path]]:
        """The checkpoint folders present, oldest first, by step number (not by name)."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := STEP_DIR.match(p.name))]
        return sorted(found)

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, newest first; LATEST's choice (if it exists) before any other."""
        paths = [p for _, p in reversed(self.steps())]
        latest = self.checkpoints / "LATEST"
        if latest.is_file():
            named = self.checkpoints / latest.read_text().strip()
            if named in paths:
                paths.remove(named)
                paths.insert(0, named)
            else:
                paths.insert(0, named)  # gone: reported as such by the loader, then the others are tried
        return paths

    def has_checkpoints(self) -> bool:
        return bool(self.steps()) or (self.checkpoints / "LATEST").is_file()

    def latest_state(self) -> dict:
        """The newest readable trainer_state.json (the CLI's defaults for a resume), or {}."""
        for path in self.candidates():
            try:
                return json.loads((path / "trainer_state.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
        return {}

    def clean_leftovers(self) -> list[str]:
        """Remove what a kill left half-written; returns the names removed."""
        removed = []
        leftovers = list(self.out.glob(".final.*")) + list(self.out.glob(".best.*")) + \
            list(self.checkpoints.glob(".step-*.tmp")) + list(self.checkpoints.glob("LATEST.tmp"))
        for p in leftovers:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(str(p.relative_to(self.out)))
        return removed

    def move_aside(self) -> Path | None:
        """A fresh start in a folder that holds a run: move that run's files into `replaced-STAMP/` (kept)."""
        parts = [p for p in (self.checkpoints, self.metrics, self.out / "final", self.out / "best",
                             self.out / "tensorboard") if p.exists()]
        if not self.has_checkpoints() and not (self.out / "final").exists():
            for p in parts:  # only the log of a run killed before its first checkpoint: nothing worth keeping
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            return None
        dest = self.out / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
        n = 1
        while dest.exists():
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
            n += 1
        dest.mkdir(parents=True)
        for p in parts:
            os.replace(p, dest / p.name)
        return dest

    def publish(self, tmp: Path, step: int, keep: int) -> Path:
        """Make the fully written `tmp` the checkpoint of `step`: fsync, rename, LATEST, prune older ones."""
        final = self.checkpoints / f"step-{step:08d}"
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.checkpoints)
        write_durably(self.checkpoints / "LATEST", final.name)
        older = [p for s, p in self.steps() if s < step]
        for p in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return final

    def stage(self, prefix: str) -> Path:
        """A fresh hidden folder in the run folder for an export being written (`.final.XXXX`)."""
        import tempfile
        self.out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{prefix}.", dir=self.out))

    def replace(self, staged: Path, dest: Path) -> Path:
        """Swap a fully written export folder in for `dest` (the old one is removed only after)."""
        fsync_tree(staged)
        old = None
        if dest.exists():
            old = staged.parent / f"{staged.name}.old"
            os.replace(dest, old)
        os.replace(staged, dest)
        fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return dest


def flatten(d, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, for listing differences."""
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(saved: dict, now: dict) -> list[str]:
    """`key: RUN -> NOW` for every key whose value differs (keys the saved run did not record are skipped)."""
    a, b = flatten(saved), flatten(now)
    keys = [k for k in b if any(k == s or k.startswith(s + ".") for s in saved)]
    return [f"{k}: {a.get(k, '(absent)')} -> {b[k]}" for k in keys if a.get(k) != b[k]] + \
        [f"{k}: {a[k]} -> (absent)" for k in a if k not in b]
