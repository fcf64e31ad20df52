"""The start-up memory plan: what `dgemma serve` will hold at most, checked against what the device has.

Everything the engine keeps is allocated up front or bounded by construction: the weights, the KV cache (one slot
of `max_model_len` positions per concurrent request), the slot-indexed denoising state, the logits slab (the engine
samples [rows, canvas, vocab] fp32 in row chunks bounded by `logits_budget_bytes`), one forward's activations (at
most `max_num_seqs` rows of max(canvas, prefill chunk) tokens) and the queued prompts (the waiting queue is bounded).
So if the plan fits at start-up, no request can run the process out of memory later. The plan is computed from
config.json and the safetensors header only, before any weight is read, so a configuration that cannot fit is
refused in a second with the breakdown and the largest `--max-num-seqs` that would fit.

Activation and attention terms are upper-bound estimates (fp32 temporaries, the math attention path that
materialises scores); the rest is exact to the byte.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, TextConfig
from ..kv_cache import KVCache

GiB = 2**30
HEADROOM = 0.90  # plan against 90% of what is available: the allocator, Python objects and the OS need the rest
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class MemoryPlanError(RuntimeError):
    """The requested configuration cannot fit in the device's memory."""


@dataclass(frozen=True)
class MemoryPlan:
    parts: tuple[tuple[str, int], ...]  # (what, bytes)
    available: int | None  # bytes the device has free now (None: unknown)
    device: str
    max_num_seqs: int
    max_model_len: int

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= HEADROOM * self.available

    def describe(self) -> str:
        rows = [f"  {name:<34} {b / GiB:10.3f} GiB" for name, b in self.parts]
        rows.append(f"  {'total':<34} {self.total / GiB:10.3f} GiB")
        if self.available is not None:
            rows.append(f"  {'available on ' + self.device + ' (x0.90)':<34} {HEADROOM * self.available / GiB:10.3f} GiB")
        return "\n".join(rows)


def checkpoint_dtype(path: Path) -> torch.dtype:
    """The floating dtype of the first floating tensor in the checkpoint, read from a safetensors header only."""
    from ..checkpoint import weight_files

    with open(weight_files(path)[0], "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    for name, info in header.items():
        if name != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[info["dtype"]]
    return torch.float32


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters and buffers of the text model, counted on the meta device (no memory is touched)."""
    from ..model import DiffusionGemma

    with torch.device("meta"):
        model = DiffusionGemma(cfg)
    return sum(t.numel() for t in list(model.parameters()) + list(model.buffers()))


def available_bytes(device: str) -> int | None:
    """Free memory: torch.cuda.mem_get_info on CUDA, MemAvailable from /proc/meminfo on CPU (None if unknown)."""
    if str(device).startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _activation_bytes(t: TextConfig, rows: int, tokens_per_row: int, kv_len: int, batch_invariant: bool) -> int:
    # Per token of one forward, in fp32 (the model upcasts norms and softmax): residual stream and norms, q/k/v/o
    # projections, dense MLP, routed experts and router scores. Generous factors: an estimate must not undercount.
    hd = max(t.head_dim, t.global_head_dim)
    per_token = 4 * (8 * t.hidden_size + 3 * t.intermediate_size + 3 * t.top_k_experts * t.moe_intermediate_size
                     + 2 * t.num_experts + 4 * t.num_attention_heads * hd)
    tokens = rows * tokens_per_row
    # Attention scores for the longest query against the whole cache (math path): one row at a time when the
    # engine runs batch-invariant attention, every row at once otherwise; plus the grouped-KV expansion.
    att_rows = 1 if batch_invariant else rows
    scores = att_rows * t.num_attention_heads * tokens_per_row * kv_len * 4 * 3
    kv_expand = att_rows * t.num_attention_heads * kv_len * hd * 4 * 2
    return tokens * per_token + scores + kv_expand


def plan(cfg: ModelConfig, dtype: torch.dtype, *, device: str = "cpu", max_num_seqs: int, max_model_len: int,
         max_waiting: int = 64, prefill_chunk: int = 2048, logits_budget_bytes: int = 512 * 2**20,
         batch_invariant: bool = True, params: int | None = None, available: int | None = -1,
         extra: tuple[tuple[str, int], ...] = (), weight_bytes: int | None = None) -> MemoryPlan:
    """The plan for one configuration. `available=-1` asks the device; pass a number to plan against it.
    `weight_bytes` replaces params x dtype size (FP8 weights: fp8.weight_bytes)."""
    t, S, C, V = cfg.text, max_num_seqs, cfg.canvas_length, cfg.text.vocab_size
    elem = torch.empty((), dtype=dtype).element_size()
    params = count_parameters(cfg) if params is None else params
    row_bytes = C * V * 4 * 3  # logits + two sampler temporaries per canvas row (as the engine budgets it)
    rows_per_slab = min(S, max(1, logits_budget_bytes // row_bytes))
    chunk = min(prefill_chunk, max_model_len)
    parts = (
        ("weights", params * elem if weight_bytes is None else weight_bytes),
        ("KV cache", KVCache.bytes_needed(t, S, max_model_len, dtype)),
        ("denoising state (canvas, self-cond.)", S * C * (8 + 8 + t.hidden_size * elem) + S * 8),
        ("logits slab", rows_per_slab * row_bytes),
        ("activations of one forward", _activation_bytes(t, S, max(C, chunk), max_model_len + C, batch_invariant)),
        ("queued and running prompts", (S + max_waiting) * max_model_len * 36),  # Python int lists, worst case
    ) + tuple(extra)  # [vision] the image tower's weights and activations (vision_parts)
    if available == -1:
        available = available_bytes(device)
    return MemoryPlan(parts, available, str(device), S, max_model_len)


def largest_fitting(make_plan, upper: int) -> int:
    """The largest max_num_seqs in [0, upper] whose plan fits (plans grow with it, so bisect)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make_plan(mid).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_checkpoint(path: Path, *, dtype: str | None, device: str, max_num_seqs: int, max_model_len: int | None,
                     canvas_length: int | None, max_waiting: int, quantization: str | None = None) -> MemoryPlan:
    """Plan for a checkpoint folder as `LLM` would load it; raise MemoryPlanError if it cannot fit."""
    from ..checkpoint import parse_dtype

    cfg = ModelConfig.from_file(Path(path) / "config.json")
    if canvas_length is not None:
        cfg = cfg.with_canvas_length(canvas_length)
    want = parse_dtype(dtype) or checkpoint_dtype(Path(path))
    max_len = max_model_len or min(cfg.text.max_position_embeddings, 8192)  # LLM's default
    params = count_parameters(cfg)
    available = available_bytes(device)
    extra = vision_parts(Path(path), cfg, want)  # [vision]
    from .. import fp8
    scheme = fp8.Fp8Scheme.from_config(cfg.raw) or (fp8.Fp8Scheme() if quantization == "fp8" else None)
    weights = None if scheme is None else fp8.weight_bytes(cfg, want, scheme)  # FP8 weights: 1 byte + scales

    def make(s: int) -> MemoryPlan:
        return plan(cfg, want, device=device, max_num_seqs=s, max_model_len=max_len,
                    max_waiting=max_waiting, params=params, available=available, extra=extra, weight_bytes=weights)

    p = make(max_num_seqs)
    if not p.fits:
        best = largest_fitting(make, max_num_seqs)
        hint = (f"--max-num-seqs {best} would fit with --max-model-len {max_len}" if best else
                f"even one sequence of {max_len} tokens does not fit: lower --max-model-len or use a smaller dtype")
        raise MemoryPlanError(
            f"not enough memory for --max-num-seqs {max_num_seqs} --max-model-len {max_len} "
            f"(canvas {cfg.canvas_length}, vocabulary {cfg.text.vocab_size}, {want}):\n{p.describe()}\n{hint}")
    return p


def vision_parts(path: Path, cfg: ModelConfig, dtype: torch.dtype) -> tuple[tuple[str, int], ...]:
    """[vision] Plan entries for a checkpoint with a vision tower: its weights, and one tower call's activations
    (IMAGES_PER_CALL images at the soft-token budget, plus one image's attention scores on the math path)."""
    from ..checkpoint import _vision_for, weight_files
    from ..vision import cost
    from ..vision_prompt import IMAGES_PER_CALL

    with torch.device("meta"):
        vision = _vision_for(cfg, weight_files(path))
    if vision is None:
        return ()
    elem = torch.empty((), dtype=dtype).element_size()
    c = cost(vision.cfg, vision.cfg.soft_tokens_per_image, elem)
    return (("vision tower weights", sum(t.numel() for t in vision.state_dict().values()) * elem),
            ("vision tower activations", IMAGES_PER_CALL * c.activation_bytes + c.attention_bytes))
