"""Tensor-parallel communication per denoising step, counted, and the compute-to-communication ratio it implies.

    python benchmarks/tp_comm.py --tp 2 4 --batches 1 --json benchmarks/results/tp_comm.json

For each N, N gloo processes on this CPU run the engine's fast denoising step (`Engine._fast_step`) on a model
with the released 26B-A4B structure and every width that enters a collective at its real size: hidden 2,816,
vocabulary 262,144, 30 layers (25 sliding, 5 full), 16 query heads, 8 / 2 KV heads, 128 experts, top-8, canvas
256. Widths that never leave a rank (head size, MLP and expert intermediate sizes) are shrunk so the model fits
this machine; they change no byte of communication. Each rank counts the bytes of every collective it enters
(`parallel.CommStats`): the step's all-reduces (one per block half, the embedding lookup, the self-conditioning
product), and the logits all-gather. The dtype is bf16, as served.

The ratio is a MODEL, not a measurement (no GPU here): compute time per step for one rank of the real config =
max(FLOPs / peak, bytes of weights and KV read / HBM bandwidth), communication time = ring traffic / NVLink
bandwidth + collective count x latency, with the H200 figures below (assumptions, printed in the JSON).
Also reported: the wall time of one step on this (shared, 2-core) CPU at N = 1 and N, which says little about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgemma import parallel  # noqa: E402
from dgemma.config import ModelConfig  # noqa: E402
from dgemma.engine import Engine, EngineConfig  # noqa: E402
from dgemma.model import DiffusionGemma  # noqa: E402
from dgemma.sampling_params import SamplingParams  # noqa: E402

RELEASED = Path(__file__).resolve().parents[1] / "dgemma/assets/configs/diffusiongemma-26B-A4B-it/config.json"
SHRUNK = dict(head_dim=16, global_head_dim=32, intermediate_size=64, moe_intermediate_size=64)  # never communicated
PROMPT = 64
# Assumptions of the ratio (NVIDIA H200 SXM, public figures): dense bf16 peak, HBM3e bandwidth, NVLink 4 bandwidth
# per direction per GPU, and a per-collective latency for small NCCL all-reduces within a node.
H200 = {"bf16_tflops": 989.0, "hbm_tb_s": 4.8, "nvlink_gb_s_per_direction": 450.0, "collective_latency_us": 15.0}


def bench_config(layers: int) -> ModelConfig:
    cfg = ModelConfig.from_file(RELEASED)
    text = cfg.text
    types = text.layer_types[:layers]
    text = replace(text, num_hidden_layers=layers, layer_types=types, **SHRUNK)
    return replace(cfg, text=text)


def one_step(cfg: ModelConfig, batch: int, tp: parallel.TensorParallel | None) -> dict:
    """Prefill `batch` prompts, run one warm-up step, then count and time one fast denoising step."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    if tp is not None:
        parallel.shard_model(model, tp)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.reset_rope()
    g = torch.Generator().manual_seed(1234)  # random weights: their values change no byte of communication
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g) if p.ndim > 1 else p.fill_(1.0)
    model.eval()
    engine = Engine(model, config=EngineConfig(max_num_seqs=batch, max_model_len=PROMPT + 2 * cfg.canvas_length,
                                               batch_invariant=False, compile=False))
    for i in range(batch):
        engine.add_request([(7 * i + j) % 1000 + 3 for j in range(PROMPT)],
                           SamplingParams(max_new_tokens=cfg.canvas_length, seed=i, max_denoising_steps=4,
                                          confidence_threshold=0.0, ignore_eos=True))
    while not all(s is not None and s.denoising for s in engine.slots):  # prefill (and the first canvas start)
        engine.step()
    engine.step()  # warm-up step
    if tp is not None:
        tp.stats.reset()
    t0 = time.perf_counter()
    engine.step()
    wall = time.perf_counter() - t0
    out = {"wall_s": wall}
    if tp is not None:
        out["bytes"] = dict(tp.stats.bytes)
        out["calls"] = dict(tp.stats.calls)
    return out


def _rank(rank: int, n: int, port: int, layers: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    tp = parallel.init(parallel.ParallelConfig(n, timeout_s=600), rank, "cpu", f"tcp://127.0.0.1:{port}")
    try:
        res = one_step(bench_config(layers), batch, tp)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        tp.close()


def step_flops_and_bytes(cfg: ModelConfig, batch: int, n: int) -> tuple[float, float]:
    """FLOPs and HBM bytes (weights + KV read, bf16) of one fast step for ONE rank of n, at the REAL widths."""
    t = cfg.text
    tokens, h, keys = batch * cfg.canvas_length, t.hidden_size, PROMPT + cfg.canvas_length
    macs = weights = kv = 0.0
    for i in range(t.num_hidden_layers):
        d, kvh = t.layer_head_dim(i), t.layer_kv_heads(i)
        kv_local = max(1, kvh // n)
        attn_w = h * d * (2 * t.num_attention_heads / n + kv_local * (2 if t.is_sliding(i) else 1))
        macs += tokens * attn_w + 2 * tokens * keys * d * t.num_attention_heads / n  # projections, QK^T and PV
        kv += 2 * batch * keys * kv_local * d
        mlp = 3 * h * t.intermediate_size / n
        expert = 3 * h * t.moe_intermediate_size / n
        macs += tokens * (mlp + t.top_k_experts * expert + h * t.num_experts)
        hit = min(t.num_experts, tokens * t.top_k_experts)  # experts whose weights the step reads
        weights += attn_w + mlp + hit * expert + h * t.num_experts
    vocab = t.vocab_size / n
    macs += tokens * 2 * vocab * h + tokens * 3 * h * t.intermediate_size  # LM head, self-cond. product, input MLP
    weights += vocab * h + 3 * h * t.intermediate_size
    return 2 * macs, 2 * (weights + kv)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    cfg = bench_config(args.layers)
    real = ModelConfig.from_file(RELEASED)
    results = {"config": {"structure": "released 26B-A4B", "layers": args.layers, "hidden": cfg.text.hidden_size,
                          "vocab": cfg.text.vocab_size, "canvas": cfg.canvas_length, "prompt": PROMPT,
                          "dtype": "bfloat16", "shrunk_local_widths": SHRUNK},
               "assumptions_h200": H200, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "runs": []}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"tp_comm_{os.getpid()}.json"
    for batch in args.batches:
        torch.set_num_threads(1)
        base = one_step(cfg, batch, None)
        for n in args.tp:
            mp.spawn(_rank, args=(n, parallel.free_port(), args.layers, batch, str(tmp)), nprocs=n, join=True)
            got = json.loads(tmp.read_text())
            comm = {k: v for k, v in got["bytes"].items() if k != "plan_broadcast"}
            total = sum(comm.values())
            calls = sum(v for k, v in got["calls"].items() if k != "plan_broadcast")
            flops, hbm = step_flops_and_bytes(real, batch, n)
            compute_s = max(flops / (H200["bf16_tflops"] * 1e12), hbm / (H200["hbm_tb_s"] * 1e12))
            # ring all-reduce moves 2 (N-1)/N of the buffer per rank, a ring all-gather (N-1)/N of the output
            ring = 2 * (n - 1) / n * comm.get("all_reduce", 0) + (n - 1) * comm.get("all_gather", 0)
            comm_s = ring / (H200["nvlink_gb_s_per_direction"] * 1e9) + calls * H200["collective_latency_us"] * 1e-6
            run = {"tp": n, "batch": batch, "counted_bytes_per_rank": comm, "counted_total_bytes_per_rank": total,
                   "collectives_per_step": calls, "calls": got["calls"], "plan_broadcast_bytes":
                   got["bytes"].get("plan_broadcast", 0), "ring_traffic_bytes_per_rank": ring,
                   "model_compute_ms_per_rank": compute_s * 1e3, "model_flops_per_rank": flops,
                   "model_hbm_bytes_per_rank": hbm, "model_comm_ms": comm_s * 1e3,
                   "compute_to_comm_ratio": compute_s / comm_s,
                   "cpu_wall_s": {"tp1": base["wall_s"], f"tp{n}": got["wall_s"]}}
            results["runs"].append(run)
    tmp.unlink(missing_ok=True)
    print(f"{'N':>3} {'batch':>5} {'all-reduce MB':>14} {'all-gather MB':>14} {'collectives':>11} "
          f"{'compute ms':>10} {'comm ms':>8} {'ratio':>6}")
    for r in results["runs"]:
        b = r["counted_bytes_per_rank"]
        print(f"{r['tp']:>3} {r['batch']:>5} {b.get('all_reduce', 0) / 1e6:>14.2f} {b.get('all_gather', 0) / 1e6:>14.2f}"
              f" {r['collectives_per_step']:>11} {r['model_compute_ms_per_rank']:>10.3f} {r['model_comm_ms']:>8.3f}"
              f" {r['compute_to_comm_ratio']:>6.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
