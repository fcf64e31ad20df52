"""Peak resident memory while loading a checkpoint, as a ratio to the file size, as loaded and quantised to FP8.

    python benchmarks/load_memory.py     # builds a ~1.1 GB bf16 checkpoint in a temp folder, then loads it twice

The checkpoint is written by one process; for each mode (bf16 as stored; `quantization="fp8"`, target 0.6x) a fresh
process imports torch and dgemma, records its resident memory (VmRSS), loads the checkpoint and records the peak
(VmHWM, the high-water mark of resident memory: anonymous and file-backed pages). The ratio is (peak - before) / file
size. Weights kept in their dtype on the CPU stay memory-mapped (file-backed, shared with the page cache), so the
load itself touches little; the last column reads every weight once and reports the resident memory then. Prints a
table and writes benchmarks/results/load_memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD = """
import sys, torch
from dgemma import checkpoint
from dgemma.config import ModelConfig, release_26b_a4b_text
text = release_26b_a4b_text(num_hidden_layers=3, num_experts=16, top_k_experts=4, vocab_size=32768)
text["layer_types"] = ["sliding_attention", "sliding_attention", "full_attention"]
cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": text})
with torch.device("meta"):
    from dgemma.model import DiffusionGemma
    m = DiffusionGemma(cfg)
m = m.to_empty(device="cpu").to(torch.bfloat16)
m.init_weights()
checkpoint.save(m, sys.argv[1], max_shard_bytes=400 * 2**20)
"""

LOAD = """
import json, sys, torch
from dgemma import checkpoint
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out
before = status()["VmRSS"]
ck = checkpoint.load(sys.argv[1], quantization=sys.argv[2] if sys.argv[2] != "none" else None)
s = status()
n = sum(p.numel() * p.element_size() for p in list(ck.model.parameters()) + list(ck.model.buffers()))
with torch.no_grad():  # read every weight once: file-backed pages become resident
    total = sum(float(p.float().sum()) for p in ck.model.parameters() if p.dtype != torch.float8_e4m3fn)
    total += sum(float(p.view(torch.uint8).sum()) for p in ck.model.parameters() if p.dtype == torch.float8_e4m3fn)
print(json.dumps({"before": before, "after": s["VmRSS"], "peak": s["VmHWM"], "anon_after": s["RssAnon"],
                  "file_after": s["RssFile"], "touched": status()["VmRSS"], "param_bytes": n}))
"""


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ck"
        subprocess.run([sys.executable, "-c", BUILD, str(path)], check=True)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for quantization in ("none", "fp8"):
            out = subprocess.run([sys.executable, "-c", LOAD, str(path), quantization], check=True,
                                 capture_output=True, text=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"quantization": quantization, "file_bytes": size, **m,
                         "peak_over_file": (m["peak"] - m["before"]) / size,
                         "model_over_file": m["param_bytes"] / size,
                         "resident_after_reading_all_weights_over_file": (m["touched"] - m["before"]) / size})
    print(f"{'load':>6} | {'file GB':>7} | {'RSS before GB':>13} | {'peak GB':>7} | {'(peak-before)/file':>18} | "
          f"{'model/file':>10} | {'after reading all weights / file':>32}")
    for r in rows:
        print(f"{r['quantization']:>6} | {r['file_bytes'] / 1e9:>7.2f} | {r['before'] / 1e9:>13.2f} | "
              f"{r['peak'] / 1e9:>7.2f} | {r['peak_over_file']:>18.3f} | {r['model_over_file']:>10.3f} | "
              f"{r['resident_after_reading_all_weights_over_file']:>32.3f}")
    out_path = Path(__file__).parent / "results" / "load_memory.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
