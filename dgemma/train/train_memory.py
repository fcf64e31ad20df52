"""`dgemma train plan MODEL_OR_CONFIG`: per-rank GPU memory of FSDP training at N ranks, from the config alone.

    dgemma train plan google/diffusiongemma-26B-A4B-it                       # full fine-tuning, N = 1 .. 128
    dgemma train plan ckpt/ --lora-rank 16 --tokens 4096 --ranks 1 2 4 8 --json

What one rank holds under `--parallel fsdp` (fsdp.py), counted from the model built on the meta device:
- sharded: the trainable parameters' fp32 master copy, their fp32 gradients and AdamW's two fp32 moments, i.e.
  16 bytes per trainable parameter over N ranks; frozen parameters (the LoRA base, the router with
  --freeze-router) 4 bytes over N. The vision tower is frozen and replicated (4 bytes per parameter on every rank).
- gathered: FSDP all-gathers one unit (a layer, or the root: embedding = LM head, final norm, self-conditioning MLP)
  at a time in the compute dtype, and the next one is prefetched: the two largest units; plus, for the unit being
  reduced, its unsharded gradient in the compute dtype and in fp32 (the reduce dtype).
- activations (an estimate, with per-layer activation checkpointing): each layer's input kept for the recompute,
  one layer's internals live during its recompute and backward (attention score matrices left out: the objective
  runs attention per segment, see objective.py), and the LM head's fp32 logits over every encoder and canvas token of
  the micro-batch (logits, soft-capped logits and their gradient), which are not chunked.
The plan adds nothing for the CUDA context and the allocator: it fits a card when it stays under 90% of it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import torch

from ..cli import Parser

GiB = 2**30
HEADROOM = 0.90
CARDS = (24, 48, 80)


@dataclass(frozen=True)
class TrainMemory:
    ranks: int
    trainable: int  # parameters trained (full: every text parameter; LoRA: the adapters)
    frozen: int  # text parameters kept frozen (sharded, fp32)
    replicated: int  # vision tower parameters (frozen, on every rank)
    sharded_bytes: int
    replicated_bytes: int
    gathered_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.sharded_bytes + self.replicated_bytes + self.gathered_bytes + self.activation_bytes

    def fits(self, gib: float) -> bool:
        return self.total_bytes <= HEADROOM * gib * GiB


def _units(model) -> list[tuple[int, int]]:
    """(trainable, total) parameter counts of each FSDP unit: every layer, then the root's own parameters."""
    def count(params):
        params = list(params)
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    layer_ids = {id(p) for layer in model.layers for p in layer.parameters()}
    units = [count(layer.parameters()) for layer in model.layers]
    root = (p for n, p in model.named_parameters() if id(p) not in layer_ids and not n.startswith("vision."))
    units.append(count(root))
    return units


def counts(config, lora_rank: int, freeze_router: bool) -> tuple[list[tuple[int, int]], int]:
    """Per-unit (trainable, total) counts and the vision tower's size, from the model built on the meta device."""
    from ..model import DiffusionGemma
    from .lora import LoRAConfig, apply_lora
    with torch.device("meta"):
        model = DiffusionGemma(config)
        vision = 0
        if isinstance(config.raw.get("vision_config"), dict):
            from ..vision import Vision, VisionConfig
            v = Vision(VisionConfig.from_model_dict(config.raw, config.text.hidden_size, config.source))
            vision = sum(p.numel() for p in v.parameters())
        if lora_rank:
            apply_lora(model, LoRAConfig(rank=lora_rank))
        elif freeze_router:
            for n, p in model.named_parameters():
                p.requires_grad_(".router." not in f".{n}")
    return _units(model), vision


def estimate(config, ranks: int, tokens: int = 2048, examples: int = 1, lora_rank: int = 0,
             freeze_router: bool = False, compute_bytes: int = 2, counted=None) -> TrainMemory:
    """Per-rank memory of FSDP training (module docstring). `tokens`: encoder tokens per rank and micro-batch
    (prompt + response), `examples`: examples in it (each adds one canvas of the config's length); `counted`:
    `counts(config, lora_rank, freeze_router)` when already made."""
    units, vision = counted or counts(config, lora_rank, freeze_router)
    trainable = sum(t for t, _ in units)
    frozen = sum(n for _, n in units) - trainable
    sharded = (16 * trainable + 4 * frozen) // ranks
    sizes = sorted((n for _, n in units), reverse=True)
    grads = max(t for t, _ in units)
    gathered = compute_bytes * sum(sizes[:2]) + (compute_bytes + 4) * grads
    t = config.text
    canvas = examples * config.canvas_length
    flow = tokens + canvas  # tokens through the stack: encoder and decoder rows together
    attn = t.num_attention_heads * max(t.head_dim, t.global_head_dim) + 2 * t.num_key_value_heads * t.head_dim
    per_token = 2 * (10 * t.hidden_size + 2 * attn + 3 * t.intermediate_size
                     + t.top_k_experts * (3 * t.moe_intermediate_size + t.hidden_size))  # forward + gradient
    layer = compute_bytes * flow * per_token
    saved = compute_bytes * flow * t.hidden_size * t.num_hidden_layers
    logits = 3 * 4 * flow * t.vocab_size
    return TrainMemory(ranks, trainable, frozen, vision, sharded, 4 * vision, gathered, saved + layer + logits)


def table(config, ranks: list[int], lora_rank: int = 0, freeze_router: bool = False, **kw) -> list[TrainMemory]:
    counted = counts(config, lora_rank, freeze_router)
    return [estimate(config, n, lora_rank=lora_rank, freeze_router=freeze_router, counted=counted, **kw)
            for n in ranks]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="dgemma train plan", description=__doc__.split("\n")[0])
    p.add_argument("model", help="config.json, checkpoint folder, or a shipped config "
                   "(google/diffusiongemma-26B-A4B-it)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128], help="FSDP world sizes")
    p.add_argument("--tokens", type=int, default=2048, help="encoder tokens per rank and micro-batch")
    p.add_argument("--examples", type=int, default=1, help="examples per rank and micro-batch (one canvas each)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--freeze-router", action="store_true", help="as `dgemma train --freeze-router`")
    p.add_argument("--param-dtype", choices=["bfloat16", "float32"], default="bfloat16", help="FSDP compute dtype")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    from ..config import ConfigError
    from ..plan import find_config
    try:
        if any(n <= 0 for n in args.ranks) or args.tokens <= 0 or args.examples <= 0 or args.lora_rank < 0:
            raise ValueError("--ranks, --tokens and --examples must be positive, --lora-rank >= 0")
        target = find_config(args.model)
    except (ConfigError, ValueError) as e:
        print(f"dgemma train plan: error: {e}", file=sys.stderr)
        return 2
    rows = table(target.config, sorted(set(args.ranks)), tokens=args.tokens, examples=args.examples,
                 lora_rank=args.lora_rank, freeze_router=args.freeze_router,
                 compute_bytes=2 if args.param_dtype == "bfloat16" else 4)
    smallest = {gib: next((r.ranks for r in rows if r.fits(gib)), None) for gib in CARDS}
    if args.json:
        print(json.dumps({"config": target.where, "rows": [{**asdict(r), "total_bytes": r.total_bytes} for r in rows],
                          "smallest_ranks": {f"{g}GB": n for g, n in smallest.items()}}, indent=1))
        return 0
    r0 = rows[0]
    print(f"{target.where}: {r0.trainable / 1e9:.2f}B trainable, {r0.frozen / 1e9:.2f}B frozen, "
          f"{r0.replicated / 1e9:.2f}B vision (replicated); {args.tokens} tokens + {args.examples} canvas per rank")
    print(f"{'ranks':>6} {'sharded':>9} {'vision':>8} {'gathered':>9} {'activ.':>8} {'total GiB':>10}  fits")
    for r in rows:
        fits = " ".join(f"{g}GB" for g in CARDS if r.fits(g)) or "-"
        print(f"{r.ranks:>6} {r.sharded_bytes / GiB:>9.1f} {r.replicated_bytes / GiB:>8.1f} "
              f"{r.gathered_bytes / GiB:>9.1f} {r.activation_bytes / GiB:>8.1f} {r.total_bytes / GiB:>10.1f}  {fits}")
    print("smallest N: " + ", ".join(f"{g} GB: {n if n else 'none listed'}" for g, n in smallest.items()))
    return 0
