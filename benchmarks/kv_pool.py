"""Many short requests on a KV pool sized for a few full-length ones: what paging buys over per-slot preallocation.

    python benchmarks/kv_pool.py --json benchmarks/results/kv_pool.json

The default model (dgemma/assets/shakespeare, canvas 64), max_model_len 4,096, fast mode, one thread. The pool
holds 8 full-length requests (8 x 4,096 / block size blocks: the memory 8 preallocated slots took). 64 requests
with short prompts (20 to 60 tokens, distinct) and 128 new tokens each arrive at once:
- paged: --max-num-seqs 64 on that pool; each request reserves ceil((prompt + 64) / block) blocks (its prompt and
  its one committed canvas), so all 64 run together;
- preallocated equivalent: --max-num-seqs 8 (what that memory allowed before): 8 at a time.
Reported: requests running at once, peak blocks used, wall time, output tokens per second.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from dgemma import checkpoint
from dgemma.engine import Engine, EngineConfig
from dgemma.llm import default_model_path
from dgemma.sampling_params import SamplingParams


def run(model, generation, prompts, max_num_seqs, block_size, num_blocks, max_len):
    eng = Engine(model, eos_token_ids=[1], defaults=generation, config=EngineConfig(
        max_num_seqs=max_num_seqs, max_model_len=max_len, block_size=block_size, num_kv_blocks=num_blocks,
        batch_invariant=False))
    for i, p in enumerate(prompts):
        eng.add_request(p, SamplingParams(max_new_tokens=128, seed=i, ignore_eos=True))
    t0, most, peak, tokens = time.perf_counter(), 0, 0, 0
    while eng.has_work():
        for ev in eng.step():
            if ev.kind == "finished":
                tokens += len(ev.output.token_ids)
        most = max(most, eng.num_running)
        peak = max(peak, eng.pool.num_used)
    wall = time.perf_counter() - t0
    return {"max_num_seqs": max_num_seqs, "running_at_once": most, "peak_blocks_used": peak,
            "pool_blocks": num_blocks, "wall_s": round(wall, 2), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "forwards": eng.stats["forwards"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ck = checkpoint.load(default_model_path())
    max_len, bs = 4096, args.block_size
    blocks = 8 * -(-max_len // bs)
    rng = random.Random(0)
    V = ck.config.text.vocab_size
    prompts = [[rng.randrange(3, V) for _ in range(rng.randrange(20, 61))] for _ in range(args.requests)]
    rows = [run(ck.model, ck.generation, prompts, s, bs, blocks, max_len) for s in (args.requests, 8)]
    result = {"model": "dgemma/assets/shakespeare", "mode": "fast", "threads": args.threads, "block_size": bs,
              "max_model_len": max_len, "pool_blocks": blocks, "requests": args.requests,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "runs": rows}
    print(f"pool: {blocks} blocks of {bs} (8 x {max_len} positions); {args.requests} requests, 128 new tokens each")
    print(f"{'max_num_seqs':>12} {'at once':>8} {'peak blocks':>11} {'wall s':>8} {'tok/s':>8}")
    for r in rows:
        print(f"{r['max_num_seqs']:>12} {r['running_at_once']:>8} {r['peak_blocks_used']:>11} {r['wall_s']:>8} "
              f"{r['tokens_per_s']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
