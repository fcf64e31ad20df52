"""GPU speed at the real size: the 26B-A4B configuration with random bf16 weights.

    python benchmarks/gpu_generate.py                      # batch 1, prompt 1024, output 1024, 16 steps/canvas
    python benchmarks/gpu_generate.py --layers 6 --experts 32   # a scaled-down smoke run

Reports generation tokens/s and the fraction of the memory-bandwidth floor: every weight that a canvas step
touches (all dense weights, the embedding twice (head and self-conditioning), and each expert routed to at least
once, counted from the actual routing), read once per step at the card's peak bandwidth. Prints a table and writes
benchmarks/results/gpu_generate.json. Needs CUDA; the weights are created on the GPU, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dgemma.config import ModelConfig, release_26b_a4b_text
from dgemma.engine import Engine, EngineConfig
from dgemma.model import DiffusionGemma
from dgemma.moe import Experts
from dgemma.sampling_params import SamplingParams

PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s (SXM)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--batch-invariant", action="store_true", help="measure with the batch-invariant mode on")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run of the script)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_generate.json"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_generate.py needs a CUDA GPU (or --device cpu for a smoke run)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)

    text = release_26b_a4b_text(num_hidden_layers=args.layers, num_experts=args.experts,
                                top_k_experts=min(8, args.experts))
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": text,
                                 "eos_token_id": [1, 106, 50]})
    torch.manual_seed(0)
    with torch.device(args.device):
        model = DiffusionGemma(cfg).to(torch.bfloat16)
    model.init_weights()
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    hit = []  # experts routed to per layer call
    orig = Experts.forward

    def counting(self, x, weights, idx):
        hit.append(int(torch.unique(idx).numel()))
        return orig(self, x, weights, idx)

    engine = Engine(model, eos_token_ids=[], config=EngineConfig(
        max_num_seqs=1, max_model_len=args.prompt + args.new_tokens + 256, batch_invariant=args.batch_invariant))
    prompt = torch.randint(3, text["vocab_size"], (args.prompt,)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, max_denoising_steps=args.steps,
                            confidence_threshold=0.0, seed=0, ignore_eos=True)
    engine.run([(prompt, SamplingParams(max_new_tokens=256, max_denoising_steps=2, confidence_threshold=0.0,
                                        seed=1, ignore_eos=True))])  # warm-up
    sync()
    Experts.forward = counting
    t = time.perf_counter()
    out = engine.run([(prompt, params)])[0]
    sync()
    elapsed = time.perf_counter() - t
    Experts.forward = orig

    e = model.layers[0].experts
    expert_bytes = (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) * 2
    all_expert_bytes = args.layers * args.experts * expert_bytes
    dense_bytes = weight_bytes - all_expert_bytes
    embed_bytes = model.embed_tokens.weight.numel() * 2
    n_layer_calls = len(hit) or 1
    mean_hit = sum(hit) / n_layer_calls
    step_bytes = dense_bytes + embed_bytes + args.layers * mean_hit * expert_bytes  # head + SC read the embedding
    steps = out.decoder_forwards
    floor_s = steps * step_bytes / peak if peak else None
    r = {
        "device": name, "layers": args.layers, "experts": args.experts, "prompt": args.prompt,
        "new_tokens": len(out.token_ids), "steps_per_canvas": out.steps_per_canvas, "seconds": elapsed,
        "tokens_per_s": len(out.token_ids) / elapsed, "weight_gb": weight_bytes / 1e9,
        "bytes_per_step_gb": step_bytes / 1e9, "mean_experts_hit_per_layer": mean_hit,
        "memory_floor_s": floor_s, "fraction_of_floor": (floor_s / elapsed) if floor_s else None,
        "floor_tokens_per_s": (len(out.token_ids) / floor_s) if floor_s else None,
        "batch_invariant": args.batch_invariant,
    }
    print(f"{name}: {r['tokens_per_s']:.1f} tok/s, {steps} decoder steps, {r['bytes_per_step_gb']:.1f} GB/step, "
          f"experts hit/layer {mean_hit:.1f}/{args.experts}")
    if floor_s:
        print(f"memory-bandwidth floor: {r['floor_tokens_per_s']:.0f} tok/s; reached {100 * r['fraction_of_floor']:.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
