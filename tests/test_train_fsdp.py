"""FSDP2 training on two CPU processes (gloo): the loss curve of a global batch equals one process's, a killed run
resumes from its sharded checkpoint (falling back past a damaged one) and ends where an uninterrupted run ends,
LoRA trains and exports its adapter, bf16 mixed precision computes in bf16 over fp32 master shards, and the
HF-layout export loads in dgemma and equals the single-process export. `torchrun` runs the command line."""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from test_train_cli import base_args, corpus  # noqa: F401  (corpus is a fixture)
from test_trainer import cfg, fresh, random_source

from dgemma import checkpoint
from dgemma.train import LoRAConfig, Trainer

pytestmark = [pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),  # fsdp.py: the objective writes no view
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]  # DCP loading on one process

STEPS, LR = 20, 3e-4  # at 1e-3 the tiny MoE is chaotic: any two batch layouts drift apart (docs/training.md)
SEEDS = (1, 2)  # more runs for the loss-curve comparison, besides seed 0
ROOT = Path(__file__).resolve().parents[1]


def val_source(index):
    return random_source(50_000 + index)


def run_cfg(**kw):
    base = {"steps": STEPS, "batch_size": 2, "lr": LR, "save_every": 5, "val_examples": 5, "eval_every": 10}
    return cfg(**{**base, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def same_lines(a, b):
    drop = ("examples_per_s", "wall_s")
    return [{k: v for k, v in x.items() if k not in drop} for x in a] == \
        [{k: v for k, v in x.items() if k not in drop} for x in b]


# -- two gloo ranks under a deadline ------------------------------------------------------------------------------
def _worker(rank, world, port, job, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        JOBS[job](rank, **kw)
    finally:
        dist.destroy_process_group()


def spawn(job, timeout=180, **kw):
    """Run JOBS[job] on two ranks; a hang fails the test after `timeout` seconds instead of stalling the suite."""
    ctx = mp.start_processes(_worker, args=(2, free_port(), job, kw), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{job}: the ranks did not finish within {timeout} s")


class Killed(Exception):
    pass


def _full(rank, out, kill_at=None, seeds=(), **kw):
    """An FSDP run of run_cfg(); `kill_at`: both ranks stop dead after that step (no final checkpoint, no export).
    Rank 1 starts from other weights: the trainer must broadcast rank 0's before sharding. `seeds`: then more runs
    (other initial weights, data windows and noise), without validation, into out/seed-S."""
    for seed in seeds:
        Trainer(fresh(seed=seed + rank), random_source, run_cfg(parallel="fsdp", seed=seed, save_every=0,
                                                                eval_every=0), Path(out, f"seed-{seed}")).train()
    def hook(trainer, rec):
        if rec["step"] == kill_at:
            raise Killed
    tr = Trainer(fresh(seed=rank * 5), random_source, run_cfg(parallel="fsdp", **kw), out, val_source=val_source,
                 on_step=hook if kill_at else None)
    try:
        tr.train()
    except Killed:
        return
    tr.export()
    local = {"params": sum(p.to_local().numel() for p in tr.params),
             "grads": sum(p.grad.to_local().numel() for p in tr.params if p.grad is not None),
             "adam": sum(v.to_local().numel() for st in tr.optimizer.state.values() for k, v in st.items()
                         if k != "step")}
    Path(out, f"held-rank{rank}.json").write_text(json.dumps(local))


def _lora(rank, out):
    """Rank 1 brings the model built on the meta device, as the CLI does: rank 0's weights arrive as FSDP shards."""
    model = fresh()
    if rank == 1:
        from dgemma.model import DiffusionGemma
        with torch.device("meta"):
            model = DiffusionGemma(model.config)
    tr = Trainer(model, random_source, run_cfg(parallel="fsdp", steps=8, save_every=4), out,
                 lora=LoRAConfig(rank=4), val_source=val_source, init_from="base", device="cpu")
    tr.train()
    tr.export()


def _bf16(rank, out):
    dtypes = []
    tr = Trainer(fresh(), random_source, run_cfg(parallel="fsdp", steps=4, param_dtype="bfloat16",
                                                 activation_checkpointing=True), out, val_source=val_source)
    tr.model.layers[0].register_forward_pre_hook(lambda m, a: dtypes.append(str(m.self_attn.q_proj.weight.dtype)))
    tr.train()
    if rank == 0:
        master = sorted({str(p.dtype) for p in tr.model.parameters()})
        Path(out, "dtypes.json").write_text(json.dumps({"compute": sorted(set(dtypes)), "master": master}))


JOBS = {"full": _full, "lora": _lora, "bf16": _bf16}


# -- the runs the tests compare -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted FSDP run (2 ranks x 2 examples) and one single process on the same global batch of 4."""
    root = tmp_path_factory.mktemp("fsdp")
    spawn("full", out=str(root / "fsdp"), save_every=10, seeds=SEEDS)
    single = Trainer(fresh(), random_source, run_cfg(batch_size=4, save_every=10), root / "single",
                     val_source=val_source)
    single.train()
    single.export()
    for seed in SEEDS:
        Trainer(fresh(seed=seed), random_source, run_cfg(batch_size=4, seed=seed, save_every=0, eval_every=0),
                root / f"single/seed-{seed}").train()
    return root


def test_two_fsdp_ranks_give_the_single_process_loss_curve(runs):
    f, s = losses(runs / "fsdp"), losses(runs / "single")
    assert [x["step"] for x in f] == [x["step"] for x in s] == list(range(1, STEPS + 1))
    assert [x["examples"] for x in f] == [x["examples"] for x in s]
    for seed in SEEDS:  # three initial weights, data windows and noise draws in all
        fs, ss = losses(runs / f"fsdp/seed-{seed}"), losses(runs / f"single/seed-{seed}")
        assert len(fs) == len(ss) == STEPS and fs[0]["loss"] != f[0]["loss"]
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(fs, ss)) <= 1e-4
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(f, s))
    assert diff <= 1e-4, diff
    for a, b in zip(f, s):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-4)  # measured: 5.5e-5
    vals = [(a["val_loss"], b["val_loss"]) for a, b in zip(f, s) if "val_loss" in a]
    assert len(vals) == 2 and all(abs(a - b) <= 1e-4 for a, b in vals)
    # the checkpoint is sharded: one safetensors file per rank, no full copy of the model
    ckpt = runs / "fsdp/checkpoints/step-00000020"
    assert sorted(p.name for p in ckpt.iterdir()) == ["rng.safetensors", "sharded", "trainer_state.json"]
    assert len(list((ckpt / "sharded").glob("*.safetensors"))) == 2


def test_each_rank_holds_the_share_the_memory_plan_counts(runs):
    from dgemma.train.train_memory import estimate
    plan = estimate(fresh().config, ranks=2)
    assert plan.trainable == sum(p.numel() for p in fresh().parameters()) and plan.frozen == 0
    for rank in (0, 1):
        held = json.loads((runs / f"fsdp/held-rank{rank}.json").read_text())
        assert held["grads"] == held["params"] and held["adam"] == 2 * held["params"]
        # fp32 parameters, gradients and two AdamW moments: 16 bytes per parameter, half of them on each rank
        # (FSDP pads each tensor's dim 0 to a multiple of 2: a few rows more or less per rank)
        assert abs(16 * held["params"] - plan.sharded_bytes) <= 0.01 * plan.sharded_bytes


def test_fsdp_export_loads_in_dgemma_and_equals_the_single_process_export(runs):
    a = checkpoint.load(runs / "fsdp/final")
    b = checkpoint.load(runs / "single/final")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sb)
    assert worst <= 1e-4, worst  # 20 Adam steps from gradients equal to ~1e-6 (measured: 9.7e-6)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    from dgemma.train.objective import run
    with torch.no_grad():
        la = a.model.logits(run(a.model, ids, torch.tensor([8, 8]), ids, torch.tensor([4, 4]))[1])
        lb = b.model.logits(run(b.model, ids, torch.tensor([8, 8]), ids, torch.tensor([4, 4]))[1])
    torch.testing.assert_close(la, lb, rtol=0, atol=2e-3)


def test_killed_fsdp_run_resumes_from_its_sharded_checkpoint_and_ends_where_the_straight_run_ends(runs, tmp_path,
                                                                                               capfd):
    out = tmp_path / "killed"
    spawn("full", out=str(out), kill_at=13)  # checkpoints at 5 and 10; steps 11-13 logged, then lost
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000005", "step-00000010"]
    assert not (out / "final").exists() and losses(out)[-1]["step"] == 13
    shard = next((out / "checkpoints/step-00000010/sharded").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])  # the newest checkpoint is damaged too
    capfd.readouterr()
    spawn("full", out=str(out))  # falls back to step 5 and runs to the end
    err = capfd.readouterr().err
    assert "step-00000010" in err and "truncated" in err and "resuming from step-00000005" in err, err[-800:]
    assert same_lines(losses(out), losses(runs / "fsdp"))  # the same curve, step for step, bit for bit
    a = checkpoint.load(out / "final").model.state_dict()
    b = checkpoint.load(runs / "fsdp/final").model.state_dict()
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_a_sharded_checkpoint_resumes_in_a_single_unsharded_process(runs, tmp_path):
    out = tmp_path / "one"
    shutil.copytree(runs / "fsdp", out)
    tr = Trainer(fresh(seed=9), random_source, run_cfg(batch_size=4), out, val_source=val_source)
    assert tr.step == STEPS and tr.position == STEPS * 4
    final = checkpoint.load(runs / "fsdp/final").model.state_dict()
    for k, v in tr.model.state_dict().items():
        if "inv_freq" not in k:
            assert torch.equal(v, final[k]), k
    exp_avg = [tr.optimizer.state[p]["exp_avg"] for p in tr.params]
    assert all(e.abs().sum() > 0 for e in exp_avg)  # the AdamW moments came back too


def test_lora_under_fsdp_matches_one_process_and_exports_the_adapter(tmp_path):
    spawn("lora", out=str(tmp_path / "fsdp"))
    single = Trainer(fresh(), random_source, run_cfg(batch_size=4, steps=8, save_every=4), tmp_path / "single",
                     lora=LoRAConfig(rank=4), val_source=val_source, init_from="base")
    single.train()
    single.export()
    f, s = losses(tmp_path / "fsdp"), losses(tmp_path / "single")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(f, s)) <= 1e-4
    # the sharded checkpoint holds the adapter and its AdamW moments only, not the frozen base
    with safe_open(str(next((tmp_path / "fsdp/checkpoints/step-00000008/sharded").glob("*.safetensors"))),
                   "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(".lora_A" in k or ".lora_B" in k or k.endswith("layer_scalar") for k in keys), keys[:4]
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg_sq") for k in keys)
    from dgemma.train import read_adapter
    a = read_adapter(tmp_path / "fsdp/final/adapter", LoRAConfig(rank=4))
    b = read_adapter(tmp_path / "single/final/adapter", LoRAConfig(rank=4))
    assert a.keys() == b.keys() and any(float(t.abs().max()) > 0 for k, t in a.items() if k.endswith("lora_B"))
    # Adam's first steps move each entry by about lr whatever its gradient's size, so an entry whose gradient is
    # ~0 may move either way: lr bounds that (measured: 4.9e-5)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=LR)
    merged_a = checkpoint.load(tmp_path / "fsdp/final").model.state_dict()
    merged_b = checkpoint.load(tmp_path / "single/final").model.state_dict()
    for k in merged_b:
        torch.testing.assert_close(merged_a[k], merged_b[k], rtol=0, atol=1e-4)  # measured: 2.9e-6


def test_bf16_mixed_precision_computes_in_bf16_over_fp32_master_shards(runs, tmp_path):
    spawn("bf16", out=str(tmp_path))
    dtypes = json.loads((tmp_path / "dtypes.json").read_text())
    assert dtypes == {"compute": ["torch.bfloat16"], "master": ["torch.float32"]}
    got, fp32 = losses(tmp_path), losses(runs / "fsdp")[:4]
    # Steps 1 and 2 start from the same weights as the fp32 run's (its schedule differs from step 3 on). bf16
    # keeps ~3 significant digits and flips a few near-tie expert choices: measured 0.5% and 1.2%.
    assert all(abs(a["loss"] - b["loss"]) < 0.03 * b["loss"] for a, b in zip(got[:2], fp32[:2]))
    assert got[0]["loss"] != fp32[0]["loss"]  # and it really ran in bf16


def test_activation_checkpointing_recomputes_each_layer_and_changes_nothing_else(tmp_path):
    def run(**kw):
        model, calls = fresh(), []
        model.layers[1].mlp.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
        records = Trainer(model, random_source, cfg(steps=3, self_cond_prob=0.0, **kw), tmp_path / str(kw)).train()
        return records, calls
    (a, plain), (b, checkpointed) = run(), run(activation_checkpointing=True)
    assert plain == [True] * 3  # one forward per step
    assert checkpointed == [True] * 6  # and one more in each backward: the recompute
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]


def test_a_parameter_no_example_reached_steps_with_a_zero_gradient_as_on_any_number_of_ranks(tmp_path):
    """With a None gradient AdamW would skip the self-conditioning MLP in a step without self-conditioned rows, while
    DDP and FSDP (which reduce zeros) move it by its momentum: the curves split (seed 2 above, by 0.07)."""
    tr = Trainer(fresh(), random_source, cfg(steps=2, self_cond_prob=0.0), tmp_path)
    sc = {n: p.detach().clone() for n, p in tr.model.self_conditioning.named_parameters()}
    tr.train_step()
    grads = {n: p.grad for n, p in tr.model.self_conditioning.named_parameters()}
    assert all(g is not None and not g.any() for g in grads.values())
    assert tr.optimizer.state[tr.model.self_conditioning.gate_proj.weight]["step"] == 1
    # weight decay alone moves the matrices (lr * wd); nothing else does with zero moments
    for n, p in tr.model.self_conditioning.named_parameters():
        assert torch.equal(p.detach(), sc[n]) or p.ndim == 2, n


def test_fsdp_needs_a_process_group_and_mixed_precision_needs_fsdp(corpus, tmp_path, capsys, monkeypatch):  # noqa: F811
    with pytest.raises(ValueError, match="torchrun"):
        Trainer(fresh(), random_source, cfg(parallel="fsdp"), tmp_path)
    with pytest.raises(ValueError, match="fsdp"):
        cfg(param_dtype="bfloat16")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from dgemma.train.cli import main
    for extra, message in ((["--parallel", "fsdp"], "torchrun --nproc-per-node N"),
                           (["--param-dtype", "bfloat16"], "needs --parallel fsdp")):
        assert main(base_args(corpus, tmp_path / "cli", 2, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cli").exists()  # refused before anything was written


@pytest.fixture
def one_rank():
    """A process group of this process alone (FSDP with N = 1), removed afterwards."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_fsdp_on_one_rank_matches_the_plain_trainer_and_refuses_a_ddp_checkpoint(one_rank, tmp_path):
    plain = Trainer(fresh(), random_source, cfg(steps=3, save_every=2), tmp_path / "plain").train()
    sharded = Trainer(fresh(), random_source, cfg(steps=3, parallel="fsdp"), tmp_path / "fsdp").train()
    for a, b in zip(plain, sharded):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    # the unsharded run's checkpoints cannot seed a sharded resume: a clear error, not a silent fallback or restart
    with pytest.raises(ValueError, match="written by the unsharded trainer.*--parallel ddp"):
        Trainer(fresh(), random_source, cfg(steps=4, parallel="fsdp"), tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain/checkpoints").glob("step-*")) == ["step-00000002",
                                                                                        "step-00000003"]


def test_torchrun_launches_fsdp_from_the_command_line_and_resumes(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def launch(steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "dgemma.train.cli",
               *base_args(corpus, out, steps, "--parallel", "fsdp", "--save-every", "2")]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)

    first = launch(2)
    assert first.returncode == 0, first.stderr[-2000:]
    second = launch(4)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 2" in second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["final"] == str(out / "final")
    assert [x["step"] for x in losses(out)] == [1, 2, 3, 4]
    assert (out / "final/tokenizer.json").is_file()
    checkpoint.load(out / "final")
