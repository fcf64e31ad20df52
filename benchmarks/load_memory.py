"""Peak resident memory while loading a checkpoint, as a ratio to the file size (target: at most 1.2).

    python benchmarks/load_memory.py                 # builds a ~1 GB bf16 checkpoint in a temp folder, then loads it
    python benchmarks/load_memory.py --quantization fp8   # the same, quantised to FP8 as it loads (target: 0.6)

The checkpoint is written by one process; a fresh process imports torch and dgemma, records its resident memory,
loads the checkpoint and records the peak (`ru_maxrss`). The ratio is (peak - before) / file size. Weights whose
dtype is kept stay memory-mapped (file-backed, shared with the page cache), so the load itself touches little; the
last column reads every weight once and reports the resident memory then. Prints a table
and writes benchmarks/results/load_memory.json.
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
import json, resource, sys, torch
from dgemma import checkpoint
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
ck = checkpoint.load(sys.argv[1], quantization=sys.argv[2] if len(sys.argv) > 2 else None)
after = rss()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n = sum(p.numel() * p.element_size() for p in ck.model.parameters())
with torch.no_grad():  # read every weight once: file-backed pages become resident
    total = sum(float(p.float().sum()) for p in ck.model.parameters() if p.dtype != torch.float8_e4m3fn)
    total += sum(float(p.view(torch.uint8).sum()) for p in ck.model.parameters() if p.dtype == torch.float8_e4m3fn)
touched = rss()
peak_touched = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after, "peak": peak, "touched": touched, "param_bytes": n}))
"""


def main() -> None:
    quantization = sys.argv[sys.argv.index("--quantization") + 1] if "--quantization" in sys.argv else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ck"
        subprocess.run([sys.executable, "-c", BUILD, str(path)], check=True)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", LOAD, str(path)] + ([quantization] if quantization else []),
                             check=True, capture_output=True, text=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
    r = {"quantization": quantization, "file_bytes": size, **m, "peak_over_file": (m["peak"] - m["before"]) / size,
         "resident_after_reading_all_weights_over_file": (m["touched"] - m["before"]) / size}
    print(f"{'file GB':>8} | {'RSS before GB':>13} | {'peak during load GB':>19} | {'(peak-before)/file':>18} | "
          f"{'after reading all weights / file':>32}")
    print(f"{size / 1e9:>8.2f} | {m['before'] / 1e9:>13.2f} | {m['peak'] / 1e9:>19.2f} | {r['peak_over_file']:>18.3f} | "
          f"{r['resident_after_reading_all_weights_over_file']:>32.3f}")
    out_path = Path(__file__).parent / "results" / f"load_memory{'_' + quantization if quantization else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
