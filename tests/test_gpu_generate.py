"""benchmarks/gpu_generate.py without a GPU: the memory and floor arithmetic at the released size (on the meta
device), the bf16 materialisation, and a CPU dry run of the whole script at tiny widths."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dgemma.model import DiffusionGemma
from dgemma.rope import inv_frequencies

_spec = importlib.util.spec_from_file_location(
    "gpu_generate", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_generate.py")
gpu_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_generate)


@pytest.fixture(scope="module")
def released_meta():
    """The released 26B-A4B model in bf16 on the meta device: shapes and dtypes, no memory."""
    with torch.device("meta"):
        return DiffusionGemma(gpu_generate.model_config()).to(torch.bfloat16)


def test_released_weights_fit_an_80gb_card_in_bf16_only(released_meta):
    params = list(released_meta.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert 50e9 < sum(p.numel() * 2 for p in params) < 51e9
    assert sum(p.numel() * 4 for p in params) > 100e9  # why the weights must never exist in fp32, even briefly


def test_default_run_plans_within_an_80gb_card_in_both_modes():
    # prompt 1,024 + 1,024 new tokens + one canvas; an H100's 80 GB shows as about 79.1 GiB free
    for exact in (False, True):
        plans = gpu_generate.memory_plans(gpu_generate.model_config(), [1, 8], 2304, exact, "cuda",
                                          available=int(79.1 * 2**30))
        assert all(p.fits for p in plans.values()), plans[8].describe()
        assert dict(plans[8].parts)["weights"] < 51e9


def test_step_bytes_is_the_52_gb_floor_at_the_released_size(released_meta):
    per_step = gpu_generate.step_bytes(released_meta)
    assert per_step == pytest.approx(52.0e9, rel=0.01)
    # 15.5 ms on an H100 SXM, 10.8 ms on an H200 (gpu-readiness notes)
    assert per_step / 3.35e12 == pytest.approx(15.5e-3, rel=0.01)
    assert per_step / 4.8e12 == pytest.approx(10.8e-3, rel=0.01)
    e = released_meta.layers[0].experts
    per_expert = (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) * 2
    assert per_step - gpu_generate.step_bytes(released_meta, 100.0) == 30 * 28 * per_expert


def test_materialise_allocates_bf16_weights_and_keeps_rope_in_fp32():
    cfg = gpu_generate.model_config(layers=6, experts=8, tiny=True)
    model = gpu_generate.materialise(cfg, "cpu", torch.bfloat16, seed=0)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    assert all(torch.isfinite(p.float()).all() for p in params.values())
    assert 0.015 < params["layers.0.experts.gate_up_proj"].float().std() < 0.025  # init_weights ran (std 0.02)
    assert torch.equal(params["norm.weight"].float(), torch.ones(cfg.text.hidden_size))
    t = cfg.text
    for lt, dim in (("sliding_attention", t.head_dim), ("full_attention", t.global_head_dim)):
        buf = getattr(model, f"inv_freq_{lt}")
        assert buf.dtype == torch.float32
        assert torch.equal(buf, inv_frequencies(t.rope[lt], dim))
    assert all(b.dtype == torch.bfloat16 for n, b in model.named_buffers() if "layer_scalar" in n)


def test_cpu_dry_run_of_the_whole_script(tmp_path):
    out = tmp_path / "gpu.json"
    r = gpu_generate.main(["--device", "cpu", "--tiny", "--layers", "6", "--experts", "8", "--prompt", "32",
                           "--new-tokens", "300", "--steps", "2", "--batches", "1", "2", "--peak-tbps", "0.05",
                           "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert not r["batch_invariant"]  # the server's mode
    for b in (1, 2):
        row = r["batches"][str(b)]
        assert row["tokens"] == 300 * b
        assert row["denoising_steps"] == 2 * 2  # two canvases, exactly two steps each
        assert 1 <= row["mean_experts_hit_per_layer"] <= 8
        floor = 4 * r["bytes_per_step_all_experts_gb"] * 1e9 / 0.05e12
        assert row["floor_s_all_experts"] == pytest.approx(floor)
        assert row["fraction_of_floor_all_experts"] == pytest.approx(floor / row["seconds"])


def test_compile_option_reaches_the_engine_or_is_refused_clearly():
    from dataclasses import fields

    from dgemma.engine import EngineConfig

    assert gpu_generate.engine_options(False) == {}
    if "compile" in {f.name for f in fields(EngineConfig)}:
        assert EngineConfig(**gpu_generate.engine_options(True)).compile is True
    else:
        with pytest.raises(SystemExit, match="no EngineConfig.compile"):
            gpu_generate.engine_options(True)


def test_cpu_dry_run_without_a_known_bandwidth_reports_no_floor(tmp_path, capsys):
    r = gpu_generate.main(["--device", "cpu", "--tiny", "--layers", "2", "--experts", "4", "--prompt", "8",
                           "--new-tokens", "8", "--steps", "1", "--batches", "1", "--out", str(tmp_path / "g.json")])
    row = r["batches"]["1"]
    assert r["peak_bandwidth_bytes_s"] is None and row["tokens"] == 8
    assert not any(k.startswith(("floor", "fraction")) for k in row)
    assert "n/a" in capsys.readouterr().out
