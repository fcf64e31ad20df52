"""`dgemma plan MODEL_OR_CONFIG ...`: the serving memory plan of a model, from its config.json alone, no weights read.

    dgemma plan google/diffusiongemma-26B-A4B-it --max-model-len 262144 --gpu-memory-gib 80 --json
    dgemma plan ./my-checkpoint --max-num-seqs 16 --max-model-len 8192 --gpu-memory-gib 24 --batch-invariant
    dgemma plan google/diffusiongemma-26B-A4B-it --quantization fp8 --language-model-only --max-model-len 10240 \
        --max-num-seqs 1 --gpu-memory-gib 32

MODEL_OR_CONFIG is a config.json, a checkpoint folder, a Hub id whose config.json is in the local Hugging Face
cache (never downloaded), or the name of a config shipped in `dgemma/assets/configs/` (the released
`google/diffusiongemma-26B-A4B-it`). The plan is `dgemma.server.memory.plan`, the one `dgemma serve` checks at
start-up: the component table, the paged KV pool (its blocks and what they hold), how many full-length and how many
8k-token requests fit at once, and the largest `--max-num-seqs` that starts. `--language-model-only` plans the
text model alone (as `serve --language-model-only` loads it: no vision tower). Exit status: 0 if the configuration
fits, 1 if not, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli import Parser
from .config import ConfigError, ModelConfig
from .server import memory
from .server.memory import GiB, HEADROOM

ASSET_CONFIGS = Path(__file__).parent / "assets" / "configs"
SHORT_REQUEST = 8192  # tokens of the "short request" the plan reports beside full-length ones
_FIT_LIMIT = 1 << 16  # the largest slot count searched


@dataclass(frozen=True)
class PlanTarget:
    config: ModelConfig
    where: str  # the config.json the plan was made from
    checkpoint: Path | None  # its folder when it holds weights (the vision tower is then looked up there)


def find_config(model: str) -> PlanTarget:
    """A config.json path, a checkpoint folder, a cached Hub id, or a shipped config name (module doc)."""
    p = Path(model).expanduser()
    if p.is_file():
        return PlanTarget(ModelConfig.from_file(p), str(p), None)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p}: no config.json in this folder")
        weights = any(p.glob("*.safetensors"))
        return PlanTarget(ModelConfig.from_file(p / "config.json"), str(p / "config.json"), p if weights else None)
    cached = _hub_cache(model)
    if cached is not None:
        return PlanTarget(ModelConfig.from_file(cached), str(cached), None)
    asset = ASSET_CONFIGS / model.split("/")[-1] / "config.json"
    if "/" not in model.strip("/") or model.startswith("google/"):
        if asset.is_file():
            return PlanTarget(ModelConfig.from_file(asset), str(asset), None)
    shipped = sorted(d.name for d in ASSET_CONFIGS.iterdir() if (d / "config.json").is_file())
    raise ConfigError(f"{model}: not a file or folder, not in the local Hugging Face cache, and not a shipped config "
                      f"(shipped: {', '.join('google/' + s for s in shipped)})")


def _hub_cache(model: str) -> Path | None:
    """config.json of a Hub id from the local cache only (nothing is downloaded)."""
    if model.count("/") != 1 or model.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(model, "config.json")
    except Exception:
        return None
    return Path(hit) if isinstance(hit, str) else None


@dataclass(frozen=True)
class PlanRequest:
    max_model_len: int
    max_num_seqs: int
    gpu_memory_gib: float
    dtype: torch.dtype
    canvas_length: int | None = None
    batch_invariant: bool = False
    cuda_graphs: bool = True
    prefill_chunk: int = 2048
    max_waiting: int = 64
    quantization: str | None = None  # "fp8": FP8 weights (docs/fp8.md); an FP8 config is planned as FP8 anyway
    language_model_only: bool = False  # the text model alone: the vision tower is neither loaded nor planned
    block_size: int = 64
    num_kv_blocks: int | None = None  # None: the pool takes the memory left (at most max_num_seqs full lengths)
    max_num_batched_tokens: int | None = None
    tensor_parallel_size: int = 1  # [parallel] plan one rank of N (docs/parallel.md)


def make_plan(target: PlanTarget, req: PlanRequest) -> dict:
    """The plan as a JSON-ready dict: components, fit, and how many full-length and 8k-token requests fit."""
    cfg = target.config
    if req.canvas_length is not None:
        cfg = cfg.with_canvas_length(req.canvas_length)
    if req.max_model_len > cfg.text.max_position_embeddings:
        raise ConfigError(f"--max-model-len {req.max_model_len} exceeds the model's max_position_embeddings "
                          f"{cfg.text.max_position_embeddings}")
    params = memory.count_parameters(cfg)
    if req.tensor_parallel_size > 1:  # [parallel]
        if req.quantization == "fp8" or fp8_config(cfg):
            raise ConfigError("tensor parallelism does not take FP8 weights yet")
        params = memory.rank_parameters(cfg, req.tensor_parallel_size)  # one rank's share
    extra = (() if req.language_model_only else memory.vision_parts(target.checkpoint, cfg, req.dtype)
             if target.checkpoint is not None else memory.vision_parts_from_config(cfg, req.dtype))
    available = int(req.gpu_memory_gib * GiB)
    graphs = req.cuda_graphs and not req.batch_invariant
    from . import fp8

    scheme = fp8.Fp8Scheme.from_config(cfg.raw) or (fp8.Fp8Scheme() if req.quantization == "fp8" else None)
    weights = None if scheme is None else fp8.weight_bytes(cfg, req.dtype, scheme)

    def make(s: int, max_len: int = req.max_model_len) -> memory.MemoryPlan:
        return memory.plan(cfg, req.dtype, device="cuda", max_num_seqs=s, max_model_len=max_len,
                           max_waiting=req.max_waiting, prefill_chunk=req.prefill_chunk,
                           batch_invariant=req.batch_invariant, cuda_graphs=graphs, params=params,
                           available=available, extra=extra, weight_bytes=weights, block_size=req.block_size,
                           num_kv_blocks=req.num_kv_blocks, max_num_batched_tokens=req.max_num_batched_tokens,
                           tensor_parallel_size=req.tensor_parallel_size)

    p = make(req.max_num_seqs)
    short_len = min(SHORT_REQUEST, req.max_model_len)
    notes = dict(p.notes)
    pool_bytes = dict(p.parts)["KV pool (full layers)"]
    return {
        "model": target.where,
        "dtype": str(req.dtype).removeprefix("torch."),
        "mode": p.mode,
        "cuda_graphs": graphs,
        "language_model_only": req.language_model_only,
        "kv_backend": "flex" if graphs else "gather",
        "canvas_length": cfg.canvas_length,
        "max_model_len": req.max_model_len,
        "max_num_seqs": req.max_num_seqs,
        "tensor_parallel_size": req.tensor_parallel_size,
        "prefill_chunk": req.prefill_chunk,
        "max_num_batched_tokens": req.max_num_batched_tokens or req.prefill_chunk,
        "gpu_memory_gib": req.gpu_memory_gib,
        "usable_bytes": p.usable,
        "headroom": HEADROOM,
        "components": [{"name": n, "bytes": b, "gib": round(b / GiB, 3), "how": notes.get(n, "")} for n, b in p.parts],
        "total_bytes": p.total,
        "total_gib": round(p.total / GiB, 3),
        "fits": p.fits,
        "kv_cache_bytes_per_slot": p.kv_bytes_per_slot,
        "kv_pool": {"block_size": p.block_size, "num_blocks": p.num_kv_blocks, "bytes": pool_bytes,
                    "blocks_per_full_length_request": p.blocks_per_request,
                    "sized": "from the memory left" if req.num_kv_blocks is None else "--num-kv-blocks"},
        "full_length_requests_fit": p.requests_fit(),
        "requests_8k": {
            "tokens": short_len,  # 8192, or --max-model-len if smaller
            "fit": p.requests_fit(short_len),
            "in_pool": p.num_kv_blocks // -(-short_len // p.block_size),
            "why": f"the paged pool holds {p.num_kv_blocks} blocks of {p.block_size}; a {short_len}-token request "
                   f"reserves {-(-short_len // p.block_size)} of them (its prompt and canvases), a full-length one "
                   f"{p.blocks_per_request}; at most --max-num-seqs {req.max_num_seqs} run at once",
        },
        "max_num_seqs_fit": memory.largest_fitting(make, _FIT_LIMIT),
    }


def fp8_config(cfg: ModelConfig) -> bool:
    from . import fp8
    return fp8.Fp8Scheme.from_config(cfg.raw) is not None


def render(plan: dict) -> str:
    tp = plan.get("tensor_parallel_size", 1)
    lines = [f"memory plan {'per rank of %d tensor-parallel ranks ' % tp if tp > 1 else ''}for {plan['model']} "
             f"({plan['dtype']}, {plan['mode']} mode"
             f"{', CUDA graphs' if plan['cuda_graphs'] else ''}"
             f"{', text model only' if plan['language_model_only'] else ''}, canvas {plan['canvas_length']}, "
             f"--max-model-len {plan['max_model_len']}, --max-num-seqs {plan['max_num_seqs']})"]
    lines += [f"  {c['name']:<44} {c['gib']:10.3f} GiB" for c in plan["components"]]
    lines.append(f"  {'total':<44} {plan['total_gib']:10.3f} GiB")
    lines.append(f"  {'usable (x%.2f of %g GiB)' % (plan['headroom'], plan['gpu_memory_gib']):<44} "
                 f"{plan['usable_bytes'] / GiB:10.3f} GiB")
    pool = plan["kv_pool"]
    lines.append(f"fits: {'yes' if plan['fits'] else 'NO'}")
    lines.append(f"KV pool: {pool['num_blocks']:,} blocks of {pool['block_size']} positions ({pool['sized']}); "
                 f"a full-length request takes {pool['blocks_per_full_length_request']:,}")
    lines.append(f"full-length ({plan['max_model_len']}-token) requests that fit at once: "
                 f"{plan['full_length_requests_fit']}")
    short = plan["requests_8k"]
    lines.append(f"{short['tokens']}-token requests that fit at once: {short['fit']} (the pool holds "
                 f"{short['in_pool']}; --max-num-seqs {plan['max_num_seqs']})")
    lines.append(f"largest --max-num-seqs that starts: {plan['max_num_seqs_fit']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dgemma plan", description="Print the serving memory plan of a model without loading weights.",
               epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="config.json, checkpoint folder, cached Hub id or shipped config name")
    p.add_argument("--max-model-len", type=int, required=True, help="prompt + output tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=8, help="concurrent requests (KV cache slots)")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="device memory to plan against, in GiB")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    p.add_argument("--canvas-length", type=int, default=None, help="override the config's canvas_length")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=False,
                   help="plan the exact (batch-invariant) engine mode instead of the fast one (the CUDA default)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="fast mode: the decode step is captured as CUDA graphs (the CUDA default)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens a request encodes per step")
    p.add_argument("--max-waiting", type=int, default=64)
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="plan FP8 weights (as `serve --quantization fp8` loads them)")
    p.add_argument("--language-model-only", action="store_true",
                   help="plan the text model alone: no vision tower (as `serve --language-model-only` loads it)")
    p.add_argument("--block-size", type=int, default=64, help="positions per KV block (full layers)")
    p.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", dest="num_kv_blocks", type=int, default=None,
                   help="blocks in the KV pool (default: what the memory left holds)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="prompt tokens per step (default: "
                   "--prefill-chunk)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="plan one rank of N tensor-parallel ranks (its weight shards and KV heads)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import parse_dtype

    args = build_parser().parse_args(argv)
    try:
        for name in ("max_model_len", "max_num_seqs", "prefill_chunk", "block_size", "num_kv_blocks",
                     "max_num_batched_tokens"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if args.canvas_length is not None and args.canvas_length < 1:
            raise ValueError(f"--canvas-length must be positive, got {args.canvas_length}")
        if args.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be positive, got {args.tensor_parallel_size}")
        if not args.gpu_memory_gib > 0:
            raise ValueError(f"--gpu-memory-gib must be positive, got {args.gpu_memory_gib}")
        dtype = parse_dtype(args.dtype)
        if dtype is None:
            raise ValueError("--dtype auto needs weights: pass bfloat16, float16 or float32")
        req = PlanRequest(args.max_model_len, args.max_num_seqs, args.gpu_memory_gib, dtype, args.canvas_length,
                          args.batch_invariant, args.cuda_graphs, args.prefill_chunk, args.max_waiting,
                          args.quantization, args.language_model_only, args.block_size, args.num_kv_blocks,
                          args.max_num_batched_tokens,
                          tensor_parallel_size=args.tensor_parallel_size)
        plan = make_plan(find_config(args.model), req)
    except (ConfigError, ValueError) as e:
        print(f"dgemma plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
