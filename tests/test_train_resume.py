"""Run folders a fine-tuner can trust: a fresh start never eats a newer checkpoint, a resume refuses another run's
folder (listing the differences) and states changed hyper-parameters, and a corrupt or half-written checkpoint falls
back to the newest complete one."""

import json
import os
import shutil

import pytest
from test_train_cli import base_args, corpus, run  # noqa: F401  (corpus is a fixture)
from test_trainer import cfg, fresh, random_source

from dgemma.train import Trainer


def steps_logged(run_dir):
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


# -- defect 1 -------------------------------------------------------------------------------------------------------
def test_no_resume_into_a_longer_old_run_keeps_the_new_checkpoints(corpus, tmp_path, capsys):
    old = tmp_path / "old"
    assert run(base_args(corpus, old, 12, "--save-every", "2"), capsys)[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(old, copy)
    rc, _, err = run(base_args(corpus, copy, 8, "--save-every", "2", "--no-resume"), capsys)
    assert rc == 0
    latest = (copy / "checkpoints/LATEST").read_text()
    assert latest == "step-00000008" and (copy / "checkpoints" / latest / "trainer_state.json").is_file()
    assert checkpoints(copy) == ["step-00000006", "step-00000008"]
    # the old run was moved aside, not deleted, and the user was told where
    moved = [p for p in copy.iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1 and str(moved[0]) in err
    assert sorted(p.name for p in (moved[0] / "checkpoints").glob("step-*")) == ["step-00000010", "step-00000012"]
    # a later resume continues from step 8 and keeps the log
    assert run(base_args(corpus, copy, 10, "--save-every", "2"), capsys)[0] == 0
    assert steps_logged(copy) == list(range(1, 11))


# -- defect 2 -------------------------------------------------------------------------------------------------------
def test_resume_refuses_another_runs_folder(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(base_args(corpus, out, 4, "--save-every", "2"), capsys)[0] == 0
    before = (out / "final/model.safetensors").read_bytes()
    other = base_args(corpus, out, 6)
    i = other.index("--config") + 1
    other[i] = json.dumps({**json.loads(other[i]), "canvas_length": 4})
    rc, _, err = run(other, capsys)
    assert rc == 2 and "canvas_length" in err and "--no-resume" in err
    other_data = base_args(corpus, out, 6, "--data-arg", "window=16")
    rc, _, err = run(other_data, capsys)
    assert rc == 2 and "window" in err
    assert (out / "final/model.safetensors").read_bytes() == before  # nothing re-exported
    assert steps_logged(out) == [1, 2, 3, 4]


def test_resume_behind_the_run_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(base_args(corpus, out, 4), capsys)[0] == 0
    rc, _, err = run(base_args(corpus, out, 2), capsys)
    assert rc == 2 and "step 4" in err and "--steps 2" in err


def test_resume_states_and_records_hyperparameter_changes(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(base_args(corpus, out, 2), capsys)[0] == 0
    args = base_args(corpus, out, 4)
    args[args.index("--lr") + 1] = "5e-4"
    rc, _, err = run(args + ["--batch-size", "3"], capsys)
    assert rc == 0 and "lr: 0.001 -> 0.0005" in err and "batch_size: 2 -> 3" in err and "steps: 2 -> 4" in err
    state = json.loads((out / "checkpoints/step-00000004/trainer_state.json").read_text())
    assert state["changes"] == [{"step": 2, "steps": [2, 4], "batch_size": [2, 3], "lr": [0.001, 0.0005]}]


# -- defect 6 -------------------------------------------------------------------------------------------------------
def kill_at(step):
    def hook(trainer, rec):
        if rec["step"] == step:
            raise KeyboardInterrupt
    return hook


@pytest.mark.parametrize("damage", ["truncate_optimizer", "empty_state", "missing_folder"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage):
    c = cfg(steps=6, save_every=2)
    straight = Trainer(fresh(), random_source, c, tmp_path / "a")
    straight.train()
    with pytest.raises(KeyboardInterrupt):
        Trainer(fresh(), random_source, c, tmp_path / "b", on_step=kill_at(5)).train()
    newest = tmp_path / "b/checkpoints/step-00000004"
    if damage == "truncate_optimizer":
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "empty_state":
        (newest / "trainer_state.json").write_text("")
    else:
        shutil.rmtree(newest)
    capsys.readouterr()
    resumed = Trainer(fresh(seed=3), random_source, c, tmp_path / "b")
    err = capsys.readouterr().err
    assert resumed.step == 2 and "step-00000004" in err and "step-00000002" in err
    resumed.train()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert (a == b).all(), name
    assert steps_logged(tmp_path / "b") == list(range(1, 7))


def test_no_complete_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    c = cfg(steps=2, save_every=2)
    Trainer(fresh(), random_source, c, tmp_path).train()
    (tmp_path / "checkpoints/step-00000002/trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        Trainer(fresh(), random_source, c, tmp_path)
    assert steps_logged(tmp_path) == [1, 2]  # the log is kept


def test_leftovers_of_a_killed_export_are_cleaned_up(tmp_path, capsys):
    c = cfg(steps=2)
    tr = Trainer(fresh(), random_source, c, tmp_path)
    tr.train()
    (tmp_path / ".final.abc123").mkdir()
    (tmp_path / ".final.abc123/model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoints/.step-00000004.tmp").mkdir()
    Trainer(fresh(), random_source, c, tmp_path)
    assert not (tmp_path / ".final.abc123").exists() and not (tmp_path / "checkpoints/.step-00000004.tmp").exists()
    assert ".final.abc123" in capsys.readouterr().err


def test_checkpoint_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    tr = Trainer(fresh(), random_source, cfg(steps=1), tmp_path)
    tr.train()
    tmp_dir = str(tmp_path / "checkpoints/.step-00000001.tmp")
    names = {os.path.basename(p) for p in synced if p.startswith(tmp_dir)}
    assert {"trainer_state.json", "optimizer.safetensors", "rng.safetensors", "model.safetensors"} <= names, synced
    assert str(tmp_path / "checkpoints") in synced  # the folder itself, after the rename


def test_a_resume_needs_only_the_folder_and_the_steps(corpus, tmp_path, capsys):
    """The run remembers its architecture and tokenizer: `--data`, `--out` and `--steps` continue it."""
    out = tmp_path / "run"
    assert run(base_args(corpus, out, 2), capsys)[0] == 0
    text = corpus[0]
    rc, _, err = run(["--data", f"text:{text}", "--data-arg", "window=24", "--out", str(out), "--steps", "3",
                      "--batch-size", "2", "--lr", "1e-3", "--log-every", "1"], capsys)
    assert rc == 0, err
    assert steps_logged(out) == [1, 2, 3]
    assert "changed settings (recorded in trainer_state.json): steps: 2 -> 3\n" in err  # and nothing else
