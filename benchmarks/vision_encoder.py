"""The image encoder's cost per image: FLOPs and bytes at the released shapes, and measured time at tiny widths on CPU.

    python benchmarks/vision_encoder.py --threads 1

Part 1 (analytic, `dgemma.vision.cost`; its FLOPs equal torch's FLOP counter, see tests/test_vision.py): the
released google/diffusiongemma-26B-A4B-it vision tower (hidden 1152, 27 layers, 16 heads x 72, patch 16, pooling 3)
in bf16, for every soft-token budget the Gemma-4 processor accepts (280 is the release's default).
Part 2 (measured): random vision towers of the released depth ratio at tiny widths, fp32 on this CPU, one image at
the full budget, best of --repeats after a warm-up; the measured FLOP rate puts the analytic count in seconds.
Prints two tables and writes benchmarks/results/vision_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dgemma import image_processing as ip
from dgemma.vision import RELEASED_VISION, Vision, VisionConfig, cost

BUDGETS = (70, 140, 280, 560, 1120)
TINY = [  # (hidden, intermediate, layers, heads, head_dim)
    (64, 224, 2, 4, 16),
    (128, 448, 4, 4, 32),
    (256, 896, 4, 8, 32),
]


def released_config() -> VisionConfig:
    top = {"vision_config": RELEASED_VISION, "vision_soft_tokens_per_image": 280, "text_config": {}}
    return VisionConfig.from_model_dict(top, text_hidden_size=2816)


def full_image(cfg: VisionConfig, soft: int):
    """A picture whose resize fills the budget exactly (3:4, a common photo shape), preprocessed."""
    proc = ip.ImageProcessorConfig(cfg.patch_size, cfg.pooling_kernel_size, soft)
    from PIL import Image

    img = Image.effect_noise((1200, 900), 64).convert("RGB")
    return ip.preprocess(img, proc)


def measure(hidden, inter, layers, heads, head_dim, soft: int, repeats: int) -> dict:
    d = dict(RELEASED_VISION, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim)
    cfg = VisionConfig.from_model_dict({"vision_config": d, "text_config": {}, "vision_soft_tokens_per_image": soft},
                                       text_hidden_size=hidden)
    torch.manual_seed(0)
    model = Vision(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    im = full_image(cfg, soft)
    pv, pos = im.pixel_values[None], im.positions[None]
    with torch.no_grad():
        model(pv, pos)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(pv, pos)
            times.append(time.perf_counter() - t0)
    c = cost(cfg, im.num_soft_tokens, 4)
    best = min(times)
    return {"hidden": hidden, "layers": layers, "heads": heads, "head_dim": head_dim, "soft_tokens": im.num_soft_tokens,
            "patches": c.patches, "gflops": c.flops / 1e9, "seconds": best, "gflops_per_s": c.flops / best / 1e9,
            "weight_mb": c.weight_bytes / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vision_encoder.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = released_config()
    released = []
    print("released vision tower, bf16, per image (analytic)")
    print(f"{'budget':>7} {'patches':>8} {'GFLOPs':>9} {'attn %':>7} {'weights MB':>11} {'act. MB':>9} "
          f"{'scores MB':>10}")
    for soft in BUDGETS:
        c = cost(cfg, soft, 2)
        attn = 2 * 2 * c.patches ** 2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
        row = {"soft_tokens": soft, "patches": c.patches, "gflops": c.flops / 1e9, "attention_share": attn / c.flops,
               "weight_mb": c.weight_bytes / 2**20, "activation_mb": c.activation_bytes / 2**20,
               "attention_scores_mb": c.attention_bytes / 2**20}
        released.append(row)
        print(f"{soft:>7} {c.patches:>8} {row['gflops']:>9.1f} {100 * row['attention_share']:>6.1f}% "
              f"{row['weight_mb']:>11.1f} {row['activation_mb']:>9.1f} {row['attention_scores_mb']:>10.1f}")

    print(f"\nmeasured on CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s)), fp32, "
          "one image at the budget, best of", args.repeats)
    print(f"{'hidden':>7} {'layers':>7} {'budget':>7} {'GFLOPs':>8} {'seconds':>8} {'GFLOP/s':>8}")
    measured = []
    for h, i, n, heads, hd in TINY:
        for soft in (70, 280):
            r = measure(h, i, n, heads, hd, soft, args.repeats)
            measured.append(r)
            print(f"{h:>7} {n:>7} {soft:>7} {r['gflops']:>8.2f} {r['seconds']:>8.3f} {r['gflops_per_s']:>8.1f}")
    rate = max(r["gflops_per_s"] for r in measured)
    est = {row["soft_tokens"]: row["gflops"] / rate for row in released}
    print(f"\nat the best measured rate ({rate:.1f} GFLOP/s) the released tower would take "
          + ", ".join(f"{v:.1f} s ({k} tokens)" for k, v in est.items()) + " per image on this CPU")
    out = {"released_bf16": released, "measured_cpu_fp32": measured, "threads": args.threads,
           "cpu_seconds_per_image_at_best_rate": est, "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
