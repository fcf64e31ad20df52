"""Tensor-parallel experts against expert parallel: one rank's MoE time on this CPU, at the released expert shapes.

    python benchmarks/tp_experts.py --tp 2 4 --json benchmarks/results/tp_experts.json

One MoE layer of the released 26B-A4B (hidden 2,816, 128 experts of intermediate 704, top-8), bf16, the fast path
(grouped GEMMs), for the tokens of one denoising step (batch x canvas 256), routed by a random router. For each N
it times the work of every rank of N in this one process, one rank after the other (the same code a rank runs,
`Experts.forward` on that rank's slices): tensor-parallel experts (every expert, 704/N of its rows) and expert
parallel (E/N whole experts; the other experts' assignments masked). Both feed the same one all-reduce, so their
communication is identical (benchmarks/tp_comm.py counts it); only the compute differs. A step waits for its
slowest rank: `max_ms`. Best of 3 after a warm-up, one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgemma.config import ModelConfig  # noqa: E402
from dgemma.moe import Experts, Router  # noqa: E402
from dgemma.parallel import Layout  # noqa: E402

RELEASED = Path(__file__).resolve().parents[1] / "dgemma/assets/configs/diffusiongemma-26B-A4B-it/config.json"


def rank_experts(full: Experts, layout: Layout, text) -> Experts:
    """The Experts module rank `layout.rank` holds (the slices parallel.shard_model would give it)."""
    e = Experts(text)
    gate_up, down = layout.expert_shards(text)
    e.gate_up_proj = torch.nn.Parameter(gate_up.take(full.gate_up_proj.detach()), requires_grad=False)
    e.down_proj = torch.nn.Parameter(down.take(full.down_proj.detach()), requires_grad=False)
    if layout.expert_parallel:
        e.expert_range = layout.span(text.num_experts)
    return e


def best_ms(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    text = ModelConfig.from_file(RELEASED).text
    g = torch.Generator().manual_seed(0)
    full = Experts(text)
    with torch.no_grad():
        full.gate_up_proj = torch.nn.Parameter(torch.randn(full.gate_up_proj.shape, generator=g).mul_(0.02)
                                               .to(torch.bfloat16), requires_grad=False)
        full.down_proj = torch.nn.Parameter(torch.randn(full.down_proj.shape, generator=g).mul_(0.02)
                                            .to(torch.bfloat16), requires_grad=False)
        router = Router(text)
        router.proj.weight.normal_(0, 0.02, generator=g)
        tokens = args.batch * 256
        x = torch.randn(tokens, text.hidden_size, generator=g).to(torch.bfloat16)
        weights, idx = router(x.float())
    out = {"shape": {"hidden": text.hidden_size, "experts": text.num_experts, "moe_intermediate":
                     text.moe_intermediate_size, "top_k": text.top_k_experts, "tokens": tokens, "dtype": "bfloat16"},
           "runs": []}
    with torch.no_grad():
        one = best_ms(lambda: full(x, weights, idx))
        out["tp1_ms"] = one
        for n in args.tp:
            for ep in (False, True):
                per_rank = []
                for r in range(n):
                    e = rank_experts(full, Layout(r, n, ep), text)
                    per_rank.append(best_ms(lambda: e(x, weights, idx)))
                hits = [int(((idx >= a) & (idx < b)).sum()) for a, b in
                        (Layout(r, n, True).span(text.num_experts) for r in range(n))] if ep else None
                out["runs"].append({"tp": n, "expert_parallel": ep, "per_rank_ms": per_rank, "max_ms": max(per_rank),
                                    "mean_ms": sum(per_rank) / n, "assignments_per_rank": hits})
    print(f"one process, all experts: {one:.1f} ms for {tokens} tokens")
    print(f"{'N':>3} {'experts':>14} {'max rank ms':>12} {'mean rank ms':>13}  assignments per rank")
    for r in out["runs"]:
        kind = "whole (EP)" if r["expert_parallel"] else "split (TP)"
        print(f"{r['tp']:>3} {kind:>14} {r['max_ms']:>12.1f} {r['mean_ms']:>13.1f}  {r['assignments_per_rank'] or ''}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
