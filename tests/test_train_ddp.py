"""Data parallelism: two CPU processes on gloo, each with its own shard of the global batch, end with identical
weights, and their run matches a single process that trains on the same global batch; so does the validation loss
(each rank evaluates its own shard of the held-out set)."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_trainer import cfg, fresh, random_source

from dgemma.train import Trainer

STEPS, LR = 3, 1e-3


def val_source(index):
    return random_source(50_000 + index)


def run_and_record(trainer: Trainer, result_prefix: str) -> None:
    """Step 1 (gradients recorded, from identical weights), then the rest; weights and metrics to files."""
    first = trainer.train_step()
    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    records = [first] + trainer.train()
    weights = {f"weight.{n}": t.detach().clone().contiguous() for n, t in trainer.model.state_dict().items()}
    save_file({**grads, **weights}, result_prefix + ".safetensors")
    with open(result_prefix + ".json", "w") as f:
        json.dump(records, f)


def _worker(rank: int, world: int, port: int, out: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # rank 1 starts from other weights: the trainer must broadcast rank 0's before the first step
        trainer = Trainer(fresh(seed=rank * 5), random_source, cfg(steps=STEPS, batch_size=2, lr=LR, val_examples=5),
                          out, val_source=val_source)
        run_and_record(trainer, os.path.join(results, f"rank{rank}"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(prefix):
    return load_file(prefix + ".safetensors"), json.load(open(prefix + ".json"))


def test_two_gloo_ranks_match_each_other_and_a_single_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2, join=True)
    single = Trainer(fresh(), random_source, cfg(steps=STEPS, batch_size=4, lr=LR, val_examples=5), tmp_path / "single",
                     val_source=val_source)
    run_and_record(single, str(tmp_path / "single"))
    (r0, m0), (r1, m1), (s, ms) = load(str(tmp_path / "rank0")), load(str(tmp_path / "rank1")), \
        load(str(tmp_path / "single"))

    assert r0.keys() == r1.keys() == s.keys()
    for k in r0:  # the ranks agree exactly: same all-reduced gradients, same optimiser steps
        assert torch.equal(r0[k], r1[k]), k
    assert [x["loss"] for x in m0] == [x["loss"] for x in m1]
    assert m0[-1]["val_loss"] == m1[-1]["val_loss"] == pytest.approx(ms[-1]["val_loss"], rel=1e-5)
    assert m0[-1]["val_decoder_loss"] == pytest.approx(ms[-1]["val_decoder_loss"], rel=1e-5)
    # each rank saw half of the global batch of 4: the step equals the single process's on all 4
    assert [x["examples"] for x in m0] == [x["examples"] for x in ms] == [4, 8, 12]
    for x, y in zip(m0, ms):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    for k in r0:
        if k.startswith("grad."):  # step 1, from the same weights: same gradient up to summation order
            assert (r0[k] - s[k]).abs().max() <= 1e-4 * s[k].abs().max() + 1e-9, k
        else:  # after 3 Adam steps of lr 1e-3 every weight has moved by at most ~3e-3
            torch.testing.assert_close(r0[k], s[k], rtol=0, atol=2 * STEPS * LR)
    # rank 0 wrote the run's checkpoint, and only once
    assert (tmp_path / "ddp/checkpoints/LATEST").read_text() == f"step-{STEPS:08d}"
    logged = [json.loads(x)["step"] for x in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(2, STEPS + 1))  # train() logs; step 1 was run by hand above
