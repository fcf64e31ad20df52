"""Evaluation during training: validation loss of both parts in metrics.jsonl on a fixed held-out set, the best
checkpoint kept on request, logs averaged over each interval, and all of it exact across a kill and resume."""

import json

import pytest
import torch
from test_trainer import OVERFIT, cfg, fresh, random_source

from dgemma import checkpoint
from dgemma.train import Trainer, TextCorpusSource
from dgemma.train.evaluation import evaluate


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def val_source(index):
    return random_source(10_000 + index)


def test_validation_loss_is_logged_and_falls_on_a_learnable_task(tmp_path):
    model = fresh()
    model.init_weights(generator=torch.Generator().manual_seed(0))  # plain from-scratch init
    c = cfg(steps=40, batch_size=4, lr=3e-3, warmup=2, eval_every=10, val_examples=4, weight_decay=0.0)
    tr = Trainer(model, lambda i: OVERFIT[i % 4], c, tmp_path, val_source=lambda i: OVERFIT[i % 4])
    tr.train()
    logged = [r for r in records(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in logged] == [10, 20, 30, 40]
    for r in logged:
        assert r["val_loss"] == pytest.approx(r["val_decoder_loss"] + r["val_encoder_loss"])
    vals = [r["val_loss"] for r in logged]
    assert vals == sorted(vals, reverse=True) and vals[-1] < 0.7 * vals[0], vals
    # the figure is the objective's mean over the fixed set: evaluating again gives the same number
    again = evaluate(tr.model, tr.val_source, 4, tr.objective, batch_size=3, eos_id=tr.eos_id, pad_id=tr.pad_id)
    assert again["val_loss"] == pytest.approx(logged[-1]["val_loss"], rel=1e-6)


def test_keep_best_exports_the_checkpoint_with_the_lowest_validation_loss(tmp_path):
    c = cfg(steps=6, lr=3e-2, eval_every=2, val_examples=6, keep_best=True)
    tr = Trainer(fresh(), random_source, c, tmp_path, val_source=val_source)
    tr.train()
    val = {r["step"]: r["val_loss"] for r in records(tmp_path) if "val_loss" in r}
    best_step = min(val, key=val.get)
    info = json.loads((tmp_path / "best/best.json").read_text())
    assert info["step"] == best_step and info["val_loss"] == pytest.approx(val[best_step])
    best = checkpoint.load(tmp_path / "best").model
    again = evaluate(best, tr.val_source, 6, tr.objective, batch_size=2, eos_id=tr.eos_id, pad_id=tr.pad_id)
    assert again["val_loss"] == pytest.approx(val[best_step], rel=1e-5)


class Kill(Exception):
    pass


def test_interval_means_and_validation_survive_a_kill(tmp_path):
    c = cfg(steps=6, save_every=3, log_every=2, eval_every=3, val_examples=3, keep_best=True)
    straight = Trainer(fresh(), random_source, c, tmp_path / "a", val_source=val_source)
    per_step = straight.train()
    logged = records(tmp_path / "a")
    assert [r["step"] for r in logged if "loss" in r] == [2, 4, 6]
    assert logged[0]["loss"] == pytest.approx((per_step[0]["loss"] + per_step[1]["loss"]) / 2)

    def kill(trainer, rec):
        if rec["step"] == 5:
            raise Kill
    with pytest.raises(Kill):
        Trainer(fresh(), random_source, c, tmp_path / "b", val_source=val_source, on_step=kill).train()
    Trainer(fresh(), random_source, c, tmp_path / "b", val_source=val_source).train()  # resumes at 3, mid-interval

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in ("examples_per_s", "wall_s")} for r in rs]
    assert strip(records(tmp_path / "b")) == strip(logged)
    assert json.loads((tmp_path / "b/best/best.json").read_text()) == \
        json.loads((tmp_path / "a/best/best.json").read_text())


def test_held_out_fraction_splits_the_text_not_the_windows():
    class Chars:
        def encode(self, text, add_special_tokens=True):
            return [3 + ord(ch) % 90 for ch in text]
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train = TextCorpusSource(text, Chars(), window=20, part=(0.0, 0.9))
    val = TextCorpusSource(text, Chars(), window=20, part=(0.9, 1.0))
    assert len(train.tokens) == 900 and len(val.tokens) == 100
    assert train.tokens.tolist() + val.tokens.tolist() == Chars().encode(text)
    with pytest.raises(ValueError, match="part"):
        TextCorpusSource(text, Chars(), part=(0.5, 0.4))


def test_validation_mean_does_not_depend_on_the_batching(tmp_path):
    """Sums, not means, are accumulated: any split of the validation set (micro-batches, ranks) gives one mean."""
    tr = Trainer(fresh(), random_source, cfg(steps=1), tmp_path, val_source=val_source)
    whole = evaluate(tr.model, tr.val_source, 7, tr.objective, batch_size=7, eos_id=tr.eos_id, pad_id=tr.pad_id)
    split = evaluate(tr.model, tr.val_source, 7, tr.objective, batch_size=2, eos_id=tr.eos_id, pad_id=tr.pad_id)
    for k in whole:
        assert whole[k] == pytest.approx(split[k], rel=1e-5)
    assert torch.is_grad_enabled()
