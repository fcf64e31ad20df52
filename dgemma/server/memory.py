"""The memory plan: what the engine will hold at most, counted from config.json alone, against what the device has.

`dgemma serve` refuses a configuration whose plan does not fit, before any weight is read, with the breakdown and
the largest `--max-num-seqs` that would fit; `dgemma plan` (dgemma/plan.py) prints the same plan without a device.
Everything the engine keeps is allocated up front or bounded by construction, so a plan that fits at start-up
cannot run out of memory later. What is counted, per engine mode (docs/serving.md, "Memory"):

- **weights**: every parameter and buffer of the text model (counted on the meta device) at the serving dtype, plus
  the vision tower's when the checkpoint has one. The fused q/k/v and gate/up matrices of the fast path are views.
- **KV cache**, exactly as `KVCache` allocates it (docs/kv_cache.md): the full layers' paged *pool*
  (`num_kv_blocks` blocks of `block_size` positions; by default all the memory left after everything else, at most
  `max_num_seqs` full-length requests' worth, and at least one or the plan does not fit), and *per slot* only the
  sliding layers' rings (`sliding_window - 1` positions plus a `canvas_length` head for the fast decode's canvas)
  and the full layers' canvas scratch blocks.
- **attention workspace**, the transient buffers of the attention the mode runs (SDPA never materialises scores
  here: the CUDA memory-efficient kernel and the CPU flash kernel are tiled). The worst encode is one row (both modes
  attend one row at a time, `EncodeSegment`) encoding a chunk against a full context: per layer, its cached prefix
  gathered through the block table, the concatenation with the new keys, the grouped-KV expansion to every query
  head (`repeat_interleave`), for K and V; the boolean and additive masks of one piece of queries (at most
  `kv_cache.MASK_PAIRS` query x key pairs); on the CPU, SDPA's flash kernel copies the expanded K and V once more
  (measured; CUDA's memory-efficient kernel reads them through strides, not measured here). The fast decode reads
  the sliding layers' K/V in place; its full layers read the pool in place with FlexAttention when the step is
  compiled on CUDA, and otherwise gather every row's blocks, padded to the longest row (counted as the eager
  decode's workspace).
- **activations of one forward**: the prefill budget (`max_num_batched_tokens`) plus one canvas commit per slot
  (and, in exact mode, the denoising canvases, which share the forward); an fp32 upper bound per token of the
  residual stream, norms, projections, dense MLP, router and the MoE's grouped-GEMM intermediates (k rows per
  token).
- **logits slab**: `[rows, canvas, vocab]` fp32 logits in slabs of the rows `logits_budget_bytes` admits (at
  least one), with the sampler's temporaries: the bf16 product, the tempered logits, the probabilities, the
  self-conditioning probabilities, and the top-k/top-p filter's sort (values and indices) and masks.
- **CUDA-graph pool** (fast mode with CUDA graphs, the CUDA default): the captured decode step allocates its
  intermediates from a private pool that eager prefills cannot reuse; all (batch, key-length) graphs share one pool
  (torch.compile's CUDA-graph trees), sized by the largest step: one decode forward's activations and the logits
  slab. An estimate, not a measurement.
- **vision tower** (checkpoints with one): its weights, and one tower call's temporaries, which are freed before the
  text forward of the same step: only the larger of the two transients counts (a negative "reuse" entry).
- the slot-indexed denoising state, and the queued prompts (Python lists bounded by the waiting queue: host memory,
  counted only when the model runs on the CPU).

Weights, KV cache and denoising state are exact to the byte. Terms that depend on kernels are estimates: on the CPU
the attention workspace plus activations came within 4% of the measured peak of an encode forward (1 and 2 rows,
exact and fast, 8k to 32k keys; benchmarks/plan_memory.py); the CUDA terms and the graph pool are not measured here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, TextConfig
from ..kv_cache import MASK_PAIRS, KVCache

GiB = 2**30
HEADROOM = 0.90  # plan against 90% of what is available: the allocator, Python objects and the OS need the rest
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# Bytes per [canvas position x vocabulary] element that sampling one logits slab holds at its peak: fp32 logits (4),
# the bf16 head product before the cast (2), tempered logits (4), probabilities (4), self-conditioning probabilities
# (2), and the top-k/top-p filter: sorted values (4), their order (8), softmax and cumsum (4 + 4), two masks (1 + 1).
SAMPLER_BYTES_PER_ELEMENT = 4 + 2 + 4 + 4 + 2 + 4 + 8 + 4 + 4 + 1 + 1


class MemoryPlanError(RuntimeError):
    """The requested configuration cannot fit in the device's memory."""


@dataclass(frozen=True)
class MemoryPlan:
    parts: tuple[tuple[str, int], ...]  # (what, bytes)
    available: int | None  # bytes the device has free now (None: unknown)
    device: str
    max_num_seqs: int
    max_model_len: int
    notes: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (what, how it is counted)
    mode: str = "exact"  # "exact" (batch-invariant) or "fast"
    kv_bytes_per_slot: int = 0  # sliding rings and canvas scratch of one slot
    num_kv_blocks: int = 0  # blocks of the full layers' pool
    block_size: int = 64
    blocks_per_request: int = 1  # blocks of one full-length request

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    def requests_fit(self, tokens: int | None = None) -> int:
        """Requests of `tokens` positions (default: full-length) the pool holds at once, at most max_num_seqs; none
        when the plan does not fit at all."""
        if not (self.available is None or self.total <= HEADROOM * self.available):
            return 0
        need = self.blocks_per_request if tokens is None else -(-tokens // self.block_size)
        return min(self.max_num_seqs, self.num_kv_blocks // need)

    @property
    def usable(self) -> int | None:
        return None if self.available is None else int(HEADROOM * self.available)

    @property
    def fits(self) -> bool:
        """Everything fits, and the pool holds at least one full-length request."""
        room = self.available is None or self.total <= HEADROOM * self.available
        return room and self.num_kv_blocks >= self.blocks_per_request

    def describe(self) -> str:
        rows = [f"  {name:<40} {b / GiB:10.3f} GiB" for name, b in self.parts]
        rows.append(f"  {'total (' + self.mode + ' mode)':<40} {self.total / GiB:10.3f} GiB")
        if self.available is not None:
            where = f"available on {self.device} (x{HEADROOM:.2f})"
            rows.append(f"  {where:<40} {HEADROOM * self.available / GiB:10.3f} GiB")
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


def kv_bytes_per_position(t: TextConfig, elem: int) -> tuple[int, int]:
    """(full layers, sliding layers): K and V bytes one cached position costs, summed over the layers of a kind."""
    full = sliding = 0
    for i in range(t.num_hidden_layers):
        b = 2 * t.layer_kv_heads(i) * t.layer_head_dim(i) * elem
        if t.is_sliding(i):
            sliding += b
        else:
            full += b
    return full, sliding


def _activation_bytes(t: TextConfig, tokens: int) -> int:
    # Per token of one forward, fp32 upper bound (the model upcasts norms, router and softmax): residual stream and
    # norms, q/k/v/o projections (the widest head geometry), dense MLP, router scores, and the MoE's grouped-GEMM
    # intermediates for the k rows of each token (gathered input, gate/up, activation, fp32 down output).
    hd = max(t.head_dim, t.global_head_dim)
    k = t.top_k_experts
    per_token = 4 * (8 * t.hidden_size + 3 * t.intermediate_size + 2 * t.num_experts + 4 * t.num_attention_heads * hd
                     + k * (2 * t.hidden_size + 3 * t.moe_intermediate_size))
    return tokens * per_token


def _layer_kinds(t: TextConfig) -> list[tuple[bool, int, int]]:
    """(sliding, kv heads, head dim) of each distinct layer geometry."""
    return sorted({(t.is_sliding(i), t.layer_kv_heads(i), t.layer_head_dim(i)) for i in range(t.num_hidden_layers)})


def encode_workspace(t: TextConfig, rows: int, new: int, max_model_len: int, elem: int, batch_invariant: bool,
                     cpu: bool = False) -> int:
    """Transient bytes of the attention of the worst encode forward (module doc): a row encoding `new` tokens
    whose keys fill its context. Both modes attend one row at a time (kv_cache.EncodeSegment), so `rows` and the
    mode change nothing: per layer, the row's cached prefix gathered through the block table (full layers; a
    sliding ring is a view), its concatenation with the new keys, the grouped-KV expansion to every query head,
    SDPA's additive mask and the boolean one. `cpu`: the CPU's flash kernel also copies its expanded K and V."""
    per_layer = 0
    for sliding, hkv, d in _layer_kinds(t):
        keys = min(max_model_len, t.sliding_window - 1 + new) if sliding else max_model_len  # cached + new
        rep = t.num_attention_heads // hkv
        gathered = 0 if sliding else keys - new
        copies = (gathered + keys) * hkv * d * elem * 2  # gathered prefix + concatenation, K and V
        expand = keys * t.num_attention_heads * d * elem * 2 if rep > 1 else 0  # repeat_interleave to every head
        expand *= 2 if cpu else 1
        piece = min(new, max(1, MASK_PAIRS // keys))  # queries attend in pieces (kv_cache.MASK_PAIRS)
        masks = piece * keys * (elem * 2 + 1)  # SDPA's additive mask and its aligned copy, and the boolean one
        per_layer = max(per_layer, copies + expand + masks)
    return per_layer


def decode_workspace(t: TextConfig, rows: int, max_model_len: int, canvas: int, elem: int,
                     gather: bool = False, block_size: int = 64) -> int:
    """Transient bytes of the fast decode's attention (`CanvasSegment`): the folded queries, the output and the
    [rows, 1, 1, keys] mask; sliding layers read K/V in place. Full layers: with the GATHER backend, one copy of
    every row's blocks (K and V), padded to the longest row; with FLEX, the pool is read in place and the block
    mask costs a fill count per row and pool block (counted with the pool)."""
    hd = max(t.head_dim, t.global_head_dim)
    ws = rows * canvas * t.num_attention_heads * hd * elem * 2 + rows * (max_model_len + canvas) * elem
    if gather:
        fulls = [(hkv, d) for sliding, hkv, d in _layer_kinds(t) if not sliding]
        keys = -(-max_model_len // block_size) * block_size + -(-canvas // block_size) * block_size
        ws += max((rows * keys * hkv * d * elem * 2 for hkv, d in fulls), default=0)
    return ws


def pool_block_bytes(t: TextConfig, elem: int, block_size: int) -> int:
    """Bytes of one block of the full layers' pool (K and V of `block_size` positions in every full layer)."""
    return kv_bytes_per_position(t, elem)[0] * block_size


def plan(cfg: ModelConfig, dtype: torch.dtype, *, device: str = "cpu", max_num_seqs: int, max_model_len: int,
         max_waiting: int = 64, prefill_chunk: int = 2048, logits_budget_bytes: int = 512 * 2**20,
         batch_invariant: bool = True, cuda_graphs: bool = False, params: int | None = None,
         available: int | None = -1, extra: tuple[tuple[str, int], ...] = (),
         weight_bytes: int | None = None, block_size: int = 64, num_kv_blocks: int | None = None,
         max_num_batched_tokens: int | None = None, tensor_parallel_size: int = 1) -> MemoryPlan:
    """The plan for one configuration (module doc). `available=-1` asks the device; pass a number to plan against
    it. `batch_invariant` picks the engine mode (exact: True, fast: False); `cuda_graphs`: the fast step is
    captured (fast mode on CUDA by default; its full layers then read the pool with FlexAttention, otherwise by a
    gather). `weight_bytes` replaces params x dtype size (FP8 weights: fp8.weight_bytes). `num_kv_blocks=None`
    sizes the pool from the memory left (at most `max_num_seqs` full-length requests' worth; all of that when the
    memory is unknown)."""
    t, S, C, V = cfg.text, max_num_seqs, cfg.canvas_length, cfg.text.vocab_size
    elem = torch.empty((), dtype=dtype).element_size()
    tp = tensor_parallel_size
    if params is None:
        params = count_parameters(cfg) if tp == 1 else rank_parameters(cfg, tp)
    if tp > 1:  # [parallel] one rank's share (`params` counts its weight slices), its KV heads (parallel.py)
        t = parallel_text(t, tp)
    budget = max_num_batched_tokens or prefill_chunk
    new = min(max(min(prefill_chunk, budget), C), max_model_len)  # tokens one row encodes in a forward
    per_request = -(-max_model_len // block_size)  # blocks of one full-length request
    engine_row_bytes = C * V * 4 * 3  # what the engine divides its logits budget by (engine.py)
    rows_per_slab = min(S, max(1, logits_budget_bytes // engine_row_bytes))
    slab = rows_per_slab * C * V * SAMPLER_BYTES_PER_ELEMENT
    kv_slot = KVCache.bytes_needed(t, 1, max_model_len, dtype, scratch=C, block_size=block_size, num_blocks=0)
    block_bytes = pool_block_bytes(t, elem, block_size)
    flex = cuda_graphs and not batch_invariant
    cpu = torch.device(device).type == "cpu"
    workspace = encode_workspace(t, S, new, max_model_len, elem, batch_invariant, cpu)
    if not batch_invariant and not cuda_graphs:  # the eager fast decode runs in its own forward
        workspace = max(workspace, decode_workspace(t, S, max_model_len, C, elem, gather=True,
                                                    block_size=block_size))
    # One forward: the prompt chunks (at most the budget), a canvas commit per slot, and in exact mode the
    # denoising canvases (the fast step decodes in a forward of its own).
    tokens = min(budget, S * new) + S * C + (S * C if batch_invariant else 0)
    full, sliding = kv_bytes_per_position(t, elem)
    parts = [
        ("weights", params * elem if weight_bytes is None else weight_bytes),
        ("KV per slot (sliding rings, canvas scratch)", kv_slot * S),
        ("attention workspace", workspace),
        ("activations of one forward", _activation_bytes(t, tokens)),
    ]
    notes = [
        ("weights", f"{params:,} parameters and buffers x {elem} bytes"),
        ("KV per slot (sliding rings, canvas scratch)",
         f"{S} slot(s) x {kv_slot:,} B: sliding layers {min(max_model_len, t.sliding_window - 1)} + {C} positions "
         f"x {sliding:,} B, full layers' canvas scratch {-(-C // block_size)} block(s) of {block_size}"),
        ("attention workspace", f"one row at a time (both modes): {new} new tokens against {max_model_len} keys "
                                "(prefix gathered through the block table, grouped-KV expansion, masks); SDPA "
                                "tiles, no scores materialised"),
        ("activations of one forward", f"{tokens} tokens (prefill budget {budget}, a canvas commit per slot"
                                       f"{', the denoising canvases' if batch_invariant else ''}), fp32 upper "
                                       "bound incl. MoE grouped-GEMM intermediates"),
        ("logits slab (sampler)", f"{rows_per_slab} row(s) x {C} x {V} x {SAMPLER_BYTES_PER_ELEMENT} B "
                                  "(fp32 logits and the sampler's temporaries, top-k/top-p included)"),
    ]
    if cuda_graphs and not batch_invariant:  # the decode step and its sampler run from the graphs' private pool
        graph = _activation_bytes(t, S * C) + decode_workspace(t, S, max_model_len, C, elem, gather=not flex,
                                                                  block_size=block_size) + slab
        parts.append(("CUDA-graph pool (estimate)", graph))
        notes.append(("CUDA-graph pool (estimate)", "one captured decode step (its activations for every slot's "
                                                    "canvas, folded queries, and the logits slab below), shared by "
                                                    "every captured shape"))
    else:
        parts.append(("logits slab (sampler)", slab))
    if tp > 1:  # [parallel] the LM head's local columns and the all-gather's buffer and reordered copy
        parts.append(("tensor-parallel logits gather", rows_per_slab * C * (-(-V // tp) + 2 * V) * 4))
        notes.append(("tensor-parallel logits gather", f"per rank of {tp}: local logit columns, the gathered "
                                                       "buffer and its vocabulary-ordered copy (fp32)"))
    parts.append(("denoising state (canvas, self-cond.)", S * C * (8 + 8 + t.hidden_size * elem) + S * 8))
    if str(device) == "cpu":  # host memory: it shares the budget only when the model runs on the CPU
        parts.append(("queued and running prompts", (S + max_waiting) * max_model_len * 36))  # Python int lists
    notes.append(("denoising state (canvas, self-cond.)", "per slot: canvas, previous argmax, self-conditioning "
                                                          "embeddings, counters"))
    if extra:
        notes += [("vision tower weights", "the image tower and its embedder at the serving dtype"),
                  ("vision tower activations", "one tower call: IMAGES_PER_CALL images at the soft-token budget "
                                               "(fp32 bound) and one image's scores on the math path")]
    parts += list(extra)  # [vision] the image tower's weights and activations (vision_parts)
    vision_act = dict(extra).get("vision tower activations", 0)
    if vision_act:  # the tower runs before its step's text forward and frees its temporaries first
        forward = workspace + _activation_bytes(t, tokens)
        parts.append(("vision temporaries reuse the forward's", -min(vision_act, forward)))
        notes.append(("vision temporaries reuse the forward's", "the tower's temporaries and the text forward's "
                                                                "are never alive together: only the larger counts"))
    if available == -1:
        available = available_bytes(device)
    # The pool: what is asked, or what the memory left holds (at most S full-length requests' worth). Each block
    # also costs its rows in the block tables and, with FLEX, a fill count per decode row.
    per_block = block_bytes + (S * 8 if flex else 0)
    if num_kv_blocks is None:
        blocks = S * per_request
        if available is not None and per_block:  # (a model without full layers has an empty pool)
            room = int(HEADROOM * available) - sum(b for _, b in parts)
            blocks = max(0, min(blocks, room // per_block))
    else:
        blocks = num_kv_blocks
    parts.insert(1, ("KV pool (full layers)", blocks * per_block))
    notes.insert(1, ("KV pool (full layers)", f"{blocks:,} blocks of {block_size} positions x {full:,} B "
                     f"({blocks // per_request} full-length request(s) of {max_model_len}); "
                     + ("sized to the memory left, at most --max-num-seqs full-length requests"
                        if num_kv_blocks is None else "--num-kv-blocks")))
    return MemoryPlan(tuple(parts), available, str(device), S, max_model_len, tuple(notes),
                      "exact" if batch_invariant else "fast", kv_slot, blocks, block_size, per_request)


def rank_parameters(cfg: ModelConfig, tp: int) -> int:
    """[parallel] Parameters and buffers one rank of `tp` holds (parallel.rank_parameters)."""
    from ..parallel import rank_parameters
    return rank_parameters(cfg, tp)


def parallel_text(t: TextConfig, tp: int) -> TextConfig:
    """[parallel] The attention geometry of one rank of `tp` (its KV cache)."""
    from ..parallel import Layout
    return Layout(0, tp).local_text(t)


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


def engine_mode(device: str, batch_invariant: bool | None) -> tuple[bool, bool]:
    """(batch_invariant, cuda_graphs) the engine will use: exact on the CPU and fast elsewhere unless told, and the
    fast step captured as CUDA graphs on CUDA (EngineConfig's defaults)."""
    kind = torch.device(device).type
    cuda = kind == "cuda"
    bi = kind == "cpu" if batch_invariant is None else batch_invariant
    return bi, (cuda and not bi)


def check_checkpoint(path: Path, *, dtype: str | None, device: str, max_num_seqs: int, max_model_len: int | None,
                     canvas_length: int | None, max_waiting: int, batch_invariant: bool | None = None,
                     available: int | None = -1, quantization: str | None = None, block_size: int = 64,
                     num_kv_blocks: int | None = None, max_num_batched_tokens: int | None = None,
                     language_model_only: bool = False, tensor_parallel_size: int = 1) -> MemoryPlan:
    """Plan for a checkpoint folder as `LLM` would load it; raise MemoryPlanError if it cannot fit.
    `language_model_only`: the vision tower is not loaded, so not planned."""
    from ..checkpoint import parse_dtype

    cfg = ModelConfig.from_file(Path(path) / "config.json")
    if canvas_length is not None:
        cfg = cfg.with_canvas_length(canvas_length)
    want = parse_dtype(dtype) or checkpoint_dtype(Path(path))
    max_len = max_model_len or min(cfg.text.max_position_embeddings, 8192)  # LLM's default
    params = count_parameters(cfg) if tensor_parallel_size == 1 else rank_parameters(cfg, tensor_parallel_size)
    if available == -1:
        available = available_bytes(device)
    extra = () if language_model_only else vision_parts(Path(path), cfg, want)  # [vision]
    bi, graphs = engine_mode(device, batch_invariant)
    from .. import fp8

    scheme = fp8.Fp8Scheme.from_config(cfg.raw) or (fp8.Fp8Scheme() if quantization == "fp8" else None)
    weights = None if scheme is None else fp8.weight_bytes(cfg, want, scheme)  # FP8 weights: 1 byte + scales

    def make(s: int) -> MemoryPlan:
        return plan(cfg, want, device=device, max_num_seqs=s, max_model_len=max_len, max_waiting=max_waiting,
                    params=params, available=available, extra=extra, batch_invariant=bi, cuda_graphs=graphs,
                    weight_bytes=weights, block_size=block_size, num_kv_blocks=num_kv_blocks,
                    max_num_batched_tokens=max_num_batched_tokens,
                    tensor_parallel_size=tensor_parallel_size)

    if tensor_parallel_size > 1 and available is not None and torch.device(device).type == "cpu":
        available //= tensor_parallel_size  # [parallel] CPU ranks share the host's memory
    p = make(max_num_seqs)
    if not p.fits:
        raise MemoryPlanError(refusal(p, make, cfg, want))
    return p


def refusal(p: MemoryPlan, make, cfg: ModelConfig, dtype: torch.dtype) -> str:
    """The message of a plan that does not fit: the breakdown, and what would fit."""
    best = largest_fitting(make, p.max_num_seqs)
    hint = (f"--max-num-seqs {best} would fit with --max-model-len {p.max_model_len}" if best else
            f"even one sequence of {p.max_model_len} tokens does not fit: lower --max-model-len or use a smaller dtype")
    if p.num_kv_blocks < p.blocks_per_request:
        hint = (f"the KV pool has {p.num_kv_blocks} blocks; one {p.max_model_len}-token request needs "
                f"{p.blocks_per_request}\n" + hint)
    return (f"not enough memory for --max-num-seqs {p.max_num_seqs} --max-model-len {p.max_model_len} "
            f"(canvas {cfg.canvas_length}, vocabulary {cfg.text.vocab_size}, {dtype}, {p.mode} mode): needs "
            f"{p.total / GiB:.2f} GiB, {p.usable / GiB:.2f} GiB usable\n{p.describe()}\n{hint}")


def vision_parts(path: Path, cfg: ModelConfig, dtype: torch.dtype) -> tuple[tuple[str, int], ...]:
    """[vision] Plan entries for a checkpoint with a vision tower: its weights, and one tower call's activations
    (IMAGES_PER_CALL images at the soft-token budget, plus one image's attention scores on the math path)."""
    from ..checkpoint import _vision_for, weight_files

    with torch.device("meta"):
        vision = _vision_for(cfg, weight_files(path))
    if vision is None:
        return ()
    return _vision_entries(vision, dtype)


def vision_parts_from_config(cfg: ModelConfig, dtype: torch.dtype) -> tuple[tuple[str, int], ...]:
    """[vision] The same entries for a config.json alone (no weights to look at): a tower is counted when the
    config declares one."""
    from ..vision import Vision, VisionConfig

    if not isinstance(cfg.raw.get("vision_config"), dict):
        return ()
    with torch.device("meta"):
        vision = Vision(VisionConfig.from_model_dict(cfg.raw, cfg.text.hidden_size, cfg.source))
    return _vision_entries(vision, dtype)


def _vision_entries(vision, dtype: torch.dtype) -> tuple[tuple[str, int], ...]:
    from ..vision import cost
    from ..vision_prompt import IMAGES_PER_CALL

    elem = torch.empty((), dtype=dtype).element_size()
    c = cost(vision.cfg, vision.cfg.soft_tokens_per_image, elem)
    return (("vision tower weights", sum(t.numel() for t in vision.state_dict().values()) * elem),
            ("vision tower activations", IMAGES_PER_CALL * c.activation_bytes + c.attention_bytes))


def kv_usage(cache: KVCache) -> tuple[int, int]:
    """(bytes holding committed tokens, bytes allocated) of a live cache: each slot's kept positions (full layers
    its length, sliding layers at most the window) at their per-layer cost. Host lengths only: no device sync."""
    used = 0
    for layer, size in enumerate(cache.kept_size):
        per = cache.k[layer][0, 0].numel() * cache.k[layer].element_size() * 2
        used += per * sum(min(n, size) for n in cache.host_lengths)
    return used, cache.nbytes()
