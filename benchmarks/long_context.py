"""Long context on the CPU: peak resident memory against prompt length, with the paged KV cache.

    python benchmarks/long_context.py --json benchmarks/results/long_context.json

A random model of the released structure at tiny widths (`dgemma.op_count.tiny_release_config`, 6 layers: 5
sliding with window 1,024 and 1 full; hidden 64, vocabulary 4,096, canvas 64), fp32, exact mode, one thread. Each
length runs in a fresh process: an engine with one slot whose pool holds exactly that request (max_model_len =
prompt + 2 canvases), a random prompt prefilled in 2,048-token chunks, then one canvas denoised. Reported per
length: the KV pool (full layers) and the slot's sliding rings as allocated, the KV the request filled, and the
process's peak RSS above its RSS once the model was built (VmHWM - VmRSS from /proc/self/status). The sliding
rings stay the same at every length (O(window)); the pool and the encode workspace (one row's keys, gathered
through the block table, with the grouped-KV expansion) grow linearly with the context.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def one(length: int) -> dict:
    from dgemma.engine import Engine, EngineConfig
    from dgemma.op_count import build_tiny_model
    from dgemma.sampling_params import SamplingParams
    from dgemma.server.memory import kv_usage

    torch.set_num_threads(1)
    model = build_tiny_model(layers=6, vocab=4096, canvas=64)
    base = status_kib("VmRSS")
    C = model.config.canvas_length
    eng = Engine(model, eos_token_ids=[], config=EngineConfig(max_num_seqs=1, max_model_len=length + 2 * C))
    cache = eng.cache
    pool = sum(cache.kv[i].numel() * cache.kv[i].element_size() for i in cache.kv)
    rings = cache.nbytes() - pool
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 4096, (length,), generator=g).tolist()
    eng.add_request(prompt, SamplingParams(max_new_tokens=C, seed=0, ignore_eos=True, max_denoising_steps=8))
    t0, filled = time.perf_counter(), 0
    while eng.has_work():
        eng.step()
        filled = max(filled, kv_usage(cache)[0])
    return {"prompt_tokens": length, "kv_pool_bytes": pool, "sliding_ring_and_scratch_bytes": rings,
            "kv_filled_bytes": filled, "pool_blocks": eng.pool.num_blocks,
            "peak_rss_above_model_bytes": (status_kib("VmHWM") - base) * 1024,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one)))
        return {}
    rows = []
    for n in args.lengths:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    peak = "peak_rss_above_model_bytes"
    slope = [(b[peak] - a[peak]) / (b["prompt_tokens"] - a["prompt_tokens"]) for a, b in zip(rows, rows[1:])]
    result = {"model": "op_count.tiny_release_config(layers=6, vocab=4096, canvas=64), fp32", "mode": "exact",
              "threads": 1, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "runs": rows, "peak_rss_bytes_per_prompt_token": [round(s) for s in slope]}
    print(f"{'prompt':>7} {'pool MiB':>9} {'rings MiB':>9} {'filled MiB':>10} {'peak RSS MiB':>12} {'s':>6}")
    for r in rows:
        print(f"{r['prompt_tokens']:>7} {r['kv_pool_bytes'] / 2**20:>9.2f} "
              f"{r['sliding_ring_and_scratch_bytes'] / 2**20:>9.2f} {r['kv_filled_bytes'] / 2**20:>10.2f} "
              f"{r['peak_rss_above_model_bytes'] / 2**20:>12.1f} {r['seconds']:>6}")
    print(f"peak RSS per prompt token between lengths: {result['peak_rss_bytes_per_prompt_token']} B")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
