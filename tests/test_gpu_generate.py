"""benchmarks/gpu_generate.py without a GPU: the memory and floor arithmetic at the released size (on the meta
device), the bf16 materialisation and the FP8 one (quantised as it materialises: the bf16 draws, quantised, and
never the bf16 model in memory), and a CPU dry run of the whole script at tiny widths."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma import fp8
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


def test_fp8_run_plans_fp8_weights_and_fits_32_gib_at_batch_1():
    cfg = gpu_generate.model_config()
    plans = {q: gpu_generate.memory_plans(cfg, [1, 8], 2304, False, "cuda", available=int(31.5 * 2**30),
                                          quantization=q) for q in (None, "fp8")}
    assert dict(plans["fp8"][1].parts)["weights"] == fp8.weight_bytes(cfg, torch.bfloat16) < 27e9
    assert plans["fp8"][1].fits and not plans[None][1].fits and not plans["fp8"][8].fits


def test_fp8_materialise_is_the_bf16_draws_quantised():
    """Quantising as it materialises gives exactly `fp8.quantize_model` of the bf16 model of the same seed."""
    cfg = gpu_generate.model_config(layers=6, experts=8, tiny=True)
    want = fp8.quantize_model(gpu_generate.materialise(cfg, "cpu", seed=3))
    got = gpu_generate.materialise(cfg, "cpu", seed=3, quantization="fp8")
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and any(fp8.is_quantized(t) for t in b.values())
    for k, t in a.items():
        bits = (lambda x: x.view(torch.uint8)) if fp8.is_quantized(t) else (lambda x: x)
        assert b[k].dtype == t.dtype and torch.equal(bits(b[k]), bits(t)), k
    assert got.config.raw["quantization_config"] == want.config.raw["quantization_config"]
    assert got.layers[0].experts.fp8_activations and got.layers[0].self_attn.q_proj.fp8_activations


MATERIALISE_PEAK = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("g", sys.argv[1])
g = importlib.util.module_from_spec(spec)
spec.loader.exec_module(g)
from dgemma import fp8
from dgemma.config import ModelConfig, release_26b_a4b_text
from dgemma.model import DiffusionGemma
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
def config(**kw):
    text = release_26b_a4b_text(vocab_size=4096, hidden_size=1024, intermediate_size=1024, moe_intermediate_size=512,
                                **kw)
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": text})
g.materialise(config(num_hidden_layers=1, num_experts=2, top_k_experts=1), "cpu", quantization="fp8")  # warm-up
cfg = config(num_hidden_layers=3, num_experts=8, top_k_experts=2)
before = status("VmRSS")
m = g.materialise(cfg, "cpu", quantization="fp8")
with torch.device("meta"):
    bf16 = DiffusionGemma(cfg).to(torch.bfloat16)
print(json.dumps({"peak": status("VmHWM") - before, "fp8": fp8.parameter_bytes(m),
                  "bf16": sum(t.numel() * t.element_size() for t in list(bf16.parameters()) + list(bf16.buffers())),
                  "largest": max(p.numel() * 2 for p in bf16.parameters())}))
"""


def test_fp8_materialise_never_holds_the_bf16_model():
    """Peak resident memory of materialising a 185 MB (bf16) model in FP8, in a fresh process: the FP8 model
    (100 MB) plus at most one bf16 tensor (16 MB) and a few MB of slabs (measured: 112 MB), where quantising after
    materialising held the whole bf16 model first (measured: 190 MB)."""
    script = Path(gpu_generate.__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parents[1])}
    out = subprocess.run([sys.executable, "-c", MATERIALISE_PEAK, str(script)], capture_output=True, text=True,
                         env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.5 < r["fp8"] / r["bf16"] < 0.55
    # Alone it measures ~0.61x; the full suite once saw 0.80x (allocator and page noise): the bound separates the
    # two designs, not the last megabyte.
    assert r["peak"] < 0.9 * r["bf16"], r  # quantising after: 1.03x


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
