"""GPU speed at the real size: the 26B-A4B configuration with random bf16 weights, against the bandwidth floor.

    python benchmarks/gpu_generate.py                          # batches 1 and 8, fast mode, bf16 (fits an 80 GB card)
    python benchmarks/gpu_generate.py --compile                # with EngineConfig.compile, where the engine has it
    python benchmarks/gpu_generate.py --batch-invariant        # exact mode instead of the server's fast mode
    python benchmarks/gpu_generate.py --quantization fp8       # FP8 weights (dgemma/fp8.py): batch 1 plans into 32 GB
    python benchmarks/gpu_generate.py --device cpu --tiny --layers 6 --experts 8 --prompt 32 --new-tokens 32 \
        --steps 2 --batches 1 2 --peak-tbps 0.05               # a dry run of the same code on the CPU (tests/)

The weights are built on the meta device and materialised once, directly in bf16 on the GPU (50.5 GB; in fp32 they
would be 101 GB), then filled with random values; the RoPE inverse frequencies stay fp32 on the device. With
`--quantization fp8` the model is built in the FP8 layout on the meta device and materialised in it (26 GB): each
quantised weight is drawn in bf16 on the device and quantised there as it materialises, so the device holds the FP8
model plus one bf16 tensor (at most 1.0 GB: a layer's expert gate/up stack), never the bf16 model. The draws are
those of the bf16 run, so its FP8 weights are exactly `fp8.quantize_model` of the bf16 ones. The engine's memory
plan (`dgemma.server.memory.plan`, with FP8 weights under `--quantization fp8`) is checked first, so a configuration
that cannot fit is refused before anything is allocated. Nothing is downloaded.

Each batch size gets its own engine in fast mode (`batch_invariant=False`, what the server runs on a GPU) unless
`--batch-invariant`; it is warmed up with one canvas, then one generation of `--new-tokens` per request with
exactly `--steps` denoising steps per canvas (confidence threshold 0) is timed with CUDA events. A routing probe
(a forward hook on every router, counting the experts hit) runs afterwards, outside the timed region.

The floor: one denoising step reads every dense weight once, the embedding twice (LM head and self-conditioning)
and every expert that the canvas routes to. A 256-token canvas with top-8 of 128 touches essentially all of them:
~52.0 GB per step, 15.5 ms on an H100 SXM (3.35 TB/s), 10.8 ms on an H200 (4.8 TB/s). `fraction_of_floor` is
(denoising steps x bytes per step / peak bandwidth) / measured time, for all experts and for the experts the probe
saw hit. Prints a table and writes benchmarks/results/gpu_generate.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from dgemma import fp8
from dgemma.checkpoint import to_checkpoint_name
from dgemma.config import FULL, SLIDING, ModelConfig, release_26b_a4b_text
from dgemma.engine import Engine, EngineConfig
from dgemma.model import DiffusionGemma
from dgemma.moe import Router
from dgemma.op_count import TINY_WIDTHS
from dgemma.rope import inv_frequencies
from dgemma.sampling_params import SamplingParams

# Peak HBM bandwidth in bytes/s, matched against torch.cuda.get_device_name() in this order (first match wins).
PEAK_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12),
                  ("A100", 2.0e12))
TINY_VOCAB = 4096


def model_config(layers: int = 30, experts: int = 128, tiny: bool = False, canvas: int = 256) -> ModelConfig:
    """The released 26B-A4B text config (spec 1.2), optionally with fewer layers/experts or tiny widths."""
    over = dict(num_hidden_layers=layers, num_experts=experts, top_k_experts=min(8, experts))
    if tiny:
        over.update(TINY_WIDTHS, vocab_size=TINY_VOCAB)
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas,
                                  "text_config": release_26b_a4b_text(**over), "eos_token_id": [1, 106, 50]})


def materialise(cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, quantization: str | None = None) -> DiffusionGemma:
    """Random weights built on `meta` and allocated once, in `dtype`, on `device` (never a full fp32 copy); with
    quantization "fp8", in the FP8 layout, each quantised weight drawn in `dtype` and quantised as it materialises
    (module doc)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = DiffusionGemma(cfg).to(dtype)
        if quantization == "fp8":
            fp8.prepare(model, fp8.Fp8Scheme(), to_checkpoint_name)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    if quantization == "fp8":
        fill_quantized(model, dtype, generator)
    else:
        model.init_weights(generator=generator)
    t = cfg.text
    for lt, dim in ((SLIDING, t.head_dim), (FULL, t.global_head_dim)):  # fp32, on the device: not rounded to bf16
        if hasattr(model, f"inv_freq_{lt}"):
            setattr(model, f"inv_freq_{lt}", inv_frequencies(t.rope[lt], dim).to(device))
    return model.eval()


@torch.no_grad()
def fill_quantized(model: DiffusionGemma, dtype: torch.dtype, generator: torch.Generator,
                   slab_bytes: int = 1 << 22) -> None:
    """`DiffusionGemma.init_weights`' draws (normal(0, 0.02) matrices, norms and scalars at one) into a model whose
    quantised weights are FP8: each of those is drawn whole in `dtype`, quantised into its FP8 parameter and scale a
    slab of rows at a time (`fp8.quantize` is per row), then the float draw is freed."""
    for name, p in model.named_parameters():
        if fp8.is_quantized(p):
            owner, _, attr = name.rpartition(".")
            w = torch.empty(p.shape, dtype=dtype, device=p.device).normal_(0.0, 0.02, generator=generator)
            rows, q = w.view(-1, w.shape[-1]), p.view(-1, p.shape[-1])
            scale = getattr(model.get_submodule(owner), attr + fp8.SCALE_SUFFIX).view(-1, 1)
            step = max(1, slab_bytes // (rows.shape[1] * rows.element_size()))
            for i in range(0, rows.shape[0], step):
                q[i:i + step], scale[i:i + step] = fp8.quantize(rows[i:i + step])
            del w, rows
        elif p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=generator)
        else:
            p.fill_(1.0)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)
    fp8.prime(next(model.parameters()).device)
    model.config = replace(model.config, raw={**model.config.raw, "quantization_config": fp8.Fp8Scheme().to_config()})


def step_bytes(model: DiffusionGemma, experts_hit_per_layer: float | None = None) -> int:
    """Bytes one denoising step reads: dense weights once, the embedding twice, `experts_hit_per_layer` experts
    in each layer (None: all)."""
    t = model.text
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    e = model.layers[0].experts
    per_expert = (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) * e.gate_up_proj.element_size()
    all_experts = t.num_hidden_layers * t.num_experts * per_expert
    hit = t.num_experts if experts_hit_per_layer is None else experts_hit_per_layer
    embed = model.embed_tokens.weight
    return round(total - all_experts + embed.numel() * embed.element_size() + t.num_hidden_layers * hit * per_expert)


class Clock:
    """Wall time of a region: CUDA events on a GPU (no host sync inside the region), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def experts_hit(engine: Engine, requests) -> float | None:
    """Mean distinct experts per router call over one untimed run of `requests` (None if no router ran eagerly)."""
    hits = []

    def hook(module, args, out):
        idx = next((o for o in (out if isinstance(out, tuple) else (out,))
                    if isinstance(o, torch.Tensor) and not o.is_floating_point()), None)
        if idx is not None:
            hits.append(torch.unique(idx).numel())

    handles = [m.register_forward_hook(hook) for m in engine.model.modules() if isinstance(m, Router)]
    try:
        engine.run(requests)
    finally:
        for h in handles:
            h.remove()
    return sum(hits) / len(hits) if hits else None


def memory_plans(cfg: ModelConfig, batches, max_model_len: int, batch_invariant: bool, device: str,
                 available: int = -1, quantization: str | None = None) -> dict:
    """The engine's memory plan in bf16 per batch size (`available=-1`: what the device has free now), with FP8
    weights under quantization "fp8"."""
    from dgemma.server.memory import plan

    weights = fp8.weight_bytes(cfg, torch.bfloat16) if quantization == "fp8" else None
    return {b: plan(cfg, torch.bfloat16, device=device, max_num_seqs=b, max_model_len=max_model_len,
                    batch_invariant=batch_invariant, available=available, weight_bytes=weights) for b in batches}


def engine_options(compile: bool) -> dict:
    """EngineConfig keywords for `--compile`: refused clearly by an engine that has no such option."""
    if not compile:
        return {}
    if "compile" not in {f.name for f in fields(EngineConfig)}:
        raise SystemExit("--compile: this engine has no EngineConfig.compile option")
    return {"compile": True}


def peak_bandwidth(device: torch.device, override_tbps: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override_tbps * 1e12 if override_tbps else None
    name = torch.cuda.get_device_name(device)
    if override_tbps:
        return name, override_tbps * 1e12
    return name, next((v for k, v in PEAK_BANDWIDTH if k in name), None)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (no early stop)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--batch-invariant", action="store_true", help="exact mode (default: fast mode, as served)")
    ap.add_argument("--compile", action="store_true", help="EngineConfig(compile=True), if this engine has it")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run of the script)")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (hidden 64, vocab 4096): for dry runs")
    ap.add_argument("--peak-tbps", type=float, help="peak memory bandwidth in TB/s (default: from the GPU's name)")
    ap.add_argument("--quantization", choices=["fp8"], help="FP8 weights, quantised tensor by tensor as they "
                    "materialise")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/gpu_generate[_fp8].json")
    args = ap.parse_args(argv)
    args.out = args.out or str(Path(__file__).parent / "results" /
                               f"gpu_generate{'_' + args.quantization if args.quantization else ''}.json")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_generate.py needs a CUDA GPU (or --device cpu --tiny for a dry run)")
    extra = engine_options(args.compile)
    name, peak = peak_bandwidth(device, args.peak_tbps)
    cfg = model_config(args.layers, args.experts, args.tiny)
    C, V = cfg.canvas_length, cfg.text.vocab_size
    max_len = args.prompt + args.new_tokens + C

    for b, p in memory_plans(cfg, args.batches, max_len, args.batch_invariant, str(device),
                             quantization=args.quantization).items():
        if not p.fits:
            raise SystemExit(f"batch {b} does not fit on {name}:\n{p.describe()}")
    model = materialise(cfg, device, quantization=args.quantization)  # FP8: the floor then counts FP8 bytes
    load_peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    results = {"device": name, "peak_bandwidth_bytes_s": peak, "layers": args.layers, "experts": args.experts,
               "vocab": V, "prompt": args.prompt, "new_tokens_per_request": args.new_tokens,
               "steps_per_canvas": args.steps, "batch_invariant": args.batch_invariant, "compile": args.compile,
               "quantization": args.quantization,
               "weight_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9,
               "materialise_peak_allocated_gb": load_peak,
               "bytes_per_step_all_experts_gb": step_bytes(model) / 1e9, "batches": {}}
    g = torch.Generator().manual_seed(0)
    for b in args.batches:
        engine = Engine(model, eos_token_ids=[], config=EngineConfig(
            max_num_seqs=b, max_model_len=max_len, batch_invariant=args.batch_invariant, **extra))
        prompts = [torch.randint(3, V, (args.prompt,), generator=g).tolist() for _ in range(b)]

        def requests(new_tokens, seed):
            return [(p, SamplingParams(max_new_tokens=new_tokens, max_denoising_steps=args.steps,
                                       confidence_threshold=0.0, seed=seed + i, ignore_eos=True))
                    for i, p in enumerate(prompts)]

        engine.run(requests(C, 1000))  # warm-up: one canvas per request (allocations, compilation, graphs)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with Clock(device) as clock:
            outs = engine.run(requests(args.new_tokens, 0))
        hit = None if args.compile else experts_hit(engine, requests(C, 2000))  # untimed, after the timed run
        tokens = sum(len(o.token_ids) for o in outs)
        steps = max(o.decoder_forwards for o in outs)  # batch rows denoise in the same forwards
        r = {"tokens": tokens, "seconds": clock.seconds, "tokens_per_s": tokens / clock.seconds,
             "denoising_steps": steps, "ms_per_step": 1e3 * clock.seconds / steps,
             "mean_experts_hit_per_layer": hit}
        if device.type == "cuda":
            r["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        for label, nbytes in (("all_experts", step_bytes(model)), ("experts_hit", step_bytes(model, hit))):
            if peak and (label == "all_experts" or hit is not None):
                floor_s = steps * nbytes / peak
                r[f"floor_s_{label}"] = floor_s
                r[f"floor_tokens_per_s_{label}"] = tokens / floor_s
                r[f"fraction_of_floor_{label}"] = floor_s / clock.seconds
        results["batches"][str(b)] = r
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()

    mode = "exact (batch-invariant)" if args.batch_invariant else "fast"
    print(f"\n{name}, {mode} mode{', compiled' if args.compile else ''}, {results['weight_gb']:.1f} GB of "
          f"{args.quantization or 'bf16'} weights, {results['bytes_per_step_all_experts_gb']:.1f} GB read per step (all experts)")
    head = f"{'batch':>5} | {'tok/s':>8} | {'ms/step':>8} | {'floor tok/s':>11} | {'of floor':>8} | {'experts hit':>11}"
    print(head + "\n" + "-" * len(head))
    for b, r in results["batches"].items():
        floor_tps, frac = r.get("floor_tokens_per_s_all_experts"), r.get("fraction_of_floor_all_experts")
        hit = r["mean_experts_hit_per_layer"]
        print(f"{b:>5} | {r['tokens_per_s']:>8.1f} | {r['ms_per_step']:>8.2f} | "
              f"{'n/a' if floor_tps is None else f'{floor_tps:.0f}':>11} | "
              f"{'n/a' if frac is None else f'{100 * frac:.1f}%':>8} | {'n/a' if hit is None else f'{hit:.1f}':>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
