"""Kernel launches and host syncs of one denoising step, counted on the CPU at the released 26B-A4B structure.

    python benchmarks/step_ops.py --json benchmarks/results/step_ops.json
    python benchmarks/step_ops.py --vocab 262144 --batches 1 --json /tmp/step_ops_262k.json

Builds a random model with the released structure at tiny widths (`dgemma.op_count.tiny_release_config`: 30
layers in the released sliding/full pattern, 128 experts, top-8, canvas 256, sliding window 1,024; hidden 64, head
sizes 16/32, 4 query heads; vocabulary 4,096 unless `--vocab`), gives the engine `batch` random 1,024-token prompts,
prefills them, runs two denoising steps as warm-up and counts the third (`dgemma.op_count.count_decode_step`), in
fast mode (`batch_invariant=False`) and exact mode (`batch_invariant=True`).

Counted: non-view aten ops (a proxy for GPU kernel launches) and host syncs (`.tolist()`, `.item()`-style scalar
reads, blocking copies to the CPU); see dgemma/op_count.py for the rules. The count depends on the structure (and,
in today's engine, on the vocabulary through its row-chunked soft-cap and sampler slabs, and slightly on routing),
not on the widths. Prints a table and writes JSON:
{"fast": {"1": {"ops_per_step", "syncs_per_step", "top_ops", "syncs_by_kind", "sync_sites"}, "8": ...}, "exact": ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dgemma.op_count import DEFAULT_VOCAB, TINY_WIDTHS, build_tiny_model, count_decode_step

MODES = {"fast": False, "exact": True}  # mode name -> EngineConfig.batch_invariant


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["fast", "exact"])
    ap.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help="vocabulary size (released: 262144)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens per request")
    ap.add_argument("--top", type=int, default=10, help="most frequent ops to list per run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = build_tiny_model(layers=args.layers, vocab=args.vocab)
    results: dict = {"config": {"layers": args.layers, "vocab": args.vocab, "prompt": args.prompt,
                                "canvas": model.config.canvas_length, "experts": model.text.num_experts,
                                "top_k": model.text.top_k_experts, "widths": TINY_WIDTHS,
                                "torch": torch.__version__, "machine": platform.machine()}}
    rows = []
    for mode in args.modes:
        results[mode] = {}
        for b in args.batches:
            t = time.perf_counter()
            c = count_decode_step(model, b, MODES[mode], prompt_len=args.prompt)
            results[mode][str(b)] = {
                "ops_per_step": c.ops, "syncs_per_step": c.syncs, "top_ops": c.top(args.top),
                "syncs_by_kind": dict(c.by_sync), "sync_sites": dict(c.sync_sites.most_common()),
                "seconds_to_measure": round(time.perf_counter() - t, 1),
            }
            rows.append((mode, b, c))
            print(f"  {mode} batch {b}: {c.ops} ops, {c.syncs} syncs ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"\nOne denoising step, {args.layers} layers, 128 experts top-8, canvas 256, prompt {args.prompt}, "
          f"vocab {args.vocab}")
    head = f"{'mode':>5} | {'batch':>5} | {'ops/step':>8} | {'syncs/step':>10} | top ops"
    print(head + "\n" + "-" * 100)
    for mode, b, c in rows:
        top = ", ".join(f"{k} {v}" for k, v in c.top(5).items())
        print(f"{mode:>5} | {b:>5} | {c.ops:>8} | {c.syncs:>10} | {top}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
