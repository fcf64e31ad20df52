"""`dgemma train plan`: per-rank memory of FSDP training counted from the config (meta device, no weights), and the
released 26B-A4B's smallest rank counts for 24, 48 and 80 GB cards as docs/training.md states them."""

import json

from test_trainer import fresh

from dgemma.train.cli import main as train_main
from dgemma.train.lora import LoRAConfig, apply_lora
from dgemma.train.train_memory import GiB, estimate

RELEASED = "google/diffusiongemma-26B-A4B-it"


def test_the_plan_counts_the_models_parameters_and_shards_them():
    model = fresh()
    n = sum(p.numel() for p in model.parameters())
    one, four = estimate(model.config, 1), estimate(model.config, 4)
    assert one.trainable == n and one.sharded_bytes == 16 * n and four.sharded_bytes == 16 * n // 4
    assert one.gathered_bytes == four.gathered_bytes and one.activation_bytes == four.activation_bytes
    apply_lora(model, LoRAConfig(rank=4))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = estimate(model.config, 2, lora_rank=4)
    assert (lora.trainable, lora.frozen) == (adapters, n)
    assert lora.sharded_bytes == (16 * adapters + 4 * n) // 2
    assert estimate(model.config, 1, tokens=4096).activation_bytes > one.activation_bytes


def test_released_model_smallest_rank_counts(capsys):
    assert train_main(["plan", RELEASED, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["smallest_ranks"] == {"24GB": 128, "48GB": 16, "80GB": 8}
    rows = {r["ranks"]: r for r in out["rows"]}
    assert 25.0e9 < rows[1]["trainable"] < 25.5e9  # the "26B" counts the vision tower and the tied head once
    assert rows[8]["total_bytes"] / GiB < 0.9 * 80 < rows[4]["total_bytes"] / GiB
    assert train_main(["plan", RELEASED, "--tokens", "1024", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["smallest_ranks"]["24GB"] == 64
    assert train_main(["plan", RELEASED, "--lora-rank", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["smallest_ranks"] == {"24GB": 16, "48GB": 4, "80GB": 2}


def test_bad_plan_input_is_one_line(capsys):
    assert train_main(["plan", "no/such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma train plan: error:") and len(err.strip().splitlines()) == 1
