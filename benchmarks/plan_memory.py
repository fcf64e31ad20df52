"""The memory plan's attention workspace against the measured peak of one encode forward, on the CPU.

    python benchmarks/plan_memory.py                  # 6 cases, about a minute; --json OUT to write elsewhere

Each case runs in a fresh process: a 6-layer model with the released attention geometry (16 query heads; sliding
layers 8 KV heads x 256, full layers 2 KV heads x 512; tiny MLP and experts), bf16, one thread, a KV cache filled
with a prefix of `keys - new` tokens per row, then one `EncodeSegment` forward of `new` tokens per row in the given
mode. Measured: the peak resident memory of the forward (VmHWM after resetting it, minus VmRSS before). Planned:
`memory.encode_workspace` + `memory._activation_bytes` for the same shape. Prints a table and writes
benchmarks/results/plan_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASE = """
import json, sys, torch
from dgemma import batch_invariant
from dgemma.config import ModelConfig, release_26b_a4b_text
from dgemma.kv_cache import EncodeSegment, KVCache
from dgemma.model import DiffusionGemma
from dgemma.server import memory

torch.set_num_threads(1)
rows, exact, keys, new = int(sys.argv[1]), sys.argv[2] == "exact", int(sys.argv[3]), int(sys.argv[4])
text = release_26b_a4b_text(num_hidden_layers=6, hidden_size=256, intermediate_size=256, num_experts=4,
                            top_k_experts=2, moe_intermediate_size=64, vocab_size=1024)
cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 64, "text_config": text})
model = DiffusionGemma(cfg).to(torch.bfloat16).eval()
cache = KVCache(cfg.text, rows, keys, torch.bfloat16, scratch=64)
for t in cache.k + cache.v:
    t.normal_()
cache.set_lengths(list(range(rows)), [keys - new] * rows)


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


with torch.no_grad(), batch_invariant.mode(exact):
    seg = EncodeSegment(cache, torch.randint(0, 1024, (rows, new)), list(range(rows)), [new] * rows)
    before = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
    model([seg])
    peak = status("VmHWM:") - before
planned = memory.encode_workspace(cfg.text, rows, new, keys, 2, exact, cpu=True) + \\
    memory._activation_bytes(cfg.text, rows * new)
print(json.dumps({"rows": rows, "mode": "exact" if exact else "fast", "keys": keys, "new": new,
                  "measured_bytes": peak, "planned_bytes": planned, "scores_fp32_bytes": 16 * new * keys * 4 * rows}))
"""

CASES = [(1, "fast", 8192), (1, "fast", 16384), (1, "fast", 32768), (2, "fast", 16384), (2, "exact", 16384),
         (1, "exact", 16384)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=256, help="tokens each row encodes")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "plan_memory.json"))
    args = ap.parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    results = []
    print(f"{'rows':>4} {'mode':>5} {'keys':>6} {'measured MB':>12} {'planned MB':>11} {'ratio':>6} {'scores MB':>10}")
    for rows, mode, keys in CASES:
        out = subprocess.run([sys.executable, "-c", CASE, str(rows), mode, str(keys), str(args.new)], cwd=root,
                             capture_output=True, text=True, check=True, env={"PYTHONPATH": root, "PATH": ""})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["ratio"] = round(r["measured_bytes"] / r["planned_bytes"], 3)
        results.append(r)
        print(f"{rows:>4} {mode:>5} {keys:>6} {r['measured_bytes'] / 1e6:>12,.0f} {r['planned_bytes'] / 1e6:>11,.0f} "
              f"{r['ratio']:>6.3f} {r['scores_fp32_bytes'] / 1e6:>10,.0f}")
    report = {"new_tokens": args.new, "cases": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
