"""The renoising sampler: one denoising step over a batch of live canvas rows, as pure tensor code.

`step` reproduces one inner iteration of HF `DiffusionGemmaGenerationMixin.generate` (transformers 5.23, the
oracle; see docs/hf_generate_notes.md) after the decoder forward:

    z = mask_top_k_top_p(logits) / T(n),  T(n) = t_min + (t_max - t_min) * n / N     (n = steps left, N..1)
    argmax = argmax(z);  x ~ Categorical(softmax(z));  H = entropy(softmax(z))
    accepted = entropy-bound prefix of positions sorted by H (lowest always accepted)
    canvas' = where(accepted, x, uniform ids over [0, V))                            (renoise)
    converged = argmax equal over the last stability_threshold + 1 steps  &  mean(H) < confidence_threshold
    sc_embeds = softmax(z) @ embedding  (compact self-conditioning signal for the next step)

Every floating-point operation mirrors HF's, in the same order and dtype, so results match bit for bit on CPU
(the self-conditioning GEMM given the same row count; see "Memory").
The model is not involved: logits come in, already soft-capped, in fp32.

Memory: the [rows, C, V] work is done on slabs of at most `chunk_elems` elements (whole canvas rows when one fits,
else equal parts of a row), so a 262,144 vocabulary costs a few slabs of temporaries rather than several
[B, 256, V] fp32 copies. Tokens, accepted masks, stop flags and entropies do not depend on the slab size on CPU
(every op is per position; cross-position work runs on small [B, C] tensors afterwards). The self-conditioning
matmul is a GEMM whose rounding depends on its row count, and on CUDA so do long reductions; both are fixed by the
slab shape. With one canvas row per slab (the default at the released size) a row's results are exactly HF's at
batch size 1 and never depend on batch mates; more rows per slab read the embedding matrix fewer times.

Randomness comes from a `DrawSource`: one generator per request (`PerRequestDraws`, the exact mode) or counter-based
draws keyed by seed and draw number (`draws.py`, the fast mode), so a request's output depends only on its own seed. The categorical draw uses inverse-CDF with one uniform per position: it is chunk-invariant, needs C numbers
per step instead of C x V, and can be replayed into HF (see docs/hf_generate_notes.md, "Parity design").

Frozen rows: the engine calls `step` only for rows still denoising. A row whose `done` flag is set keeps its last
`argmax` (that canvas is committed) and leaves the batch: no more forwards, no more draws. This equals HF's
semantics (finished rows keep canvas, argmax and self-conditioning logits while batch mates continue), except that
HF keeps drawing random numbers for finished rows from its shared global generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dgemma.sampling_params import DenoiseSettings

DEFAULT_CHUNK_ELEMS = 1 << 26  # one 256 x 262,144 canvas row per slab: 256 MiB of fp32 per temporary
CPU_SUB_SLAB_ELEMS = 1 << 17  # per-position passes on the CPU: 512 KiB of fp32 per temporary, cache-resident


def slab_positions(canvas_length: int, vocab_size: int, chunk_elems: int) -> int:
    """Positions per slab: as many whole canvas rows as fit in chunk_elems, else the largest divisor of the canvas
    length that fits (at least 1). Slab boundaries thus fall on row boundaries and every row is cut the same way."""
    rows = chunk_elems // (canvas_length * vocab_size)
    if rows >= 1:
        return rows * canvas_length
    fit = max(1, chunk_elems // vocab_size)
    return max(d for d in range(1, min(fit, canvas_length) + 1) if canvas_length % d == 0)


# MARK: random draws


class DrawSource(Protocol):
    """The only source of randomness of the sampler. Row b of every result comes from row b's own stream.

    Per step the order of draws for a row is: `uniforms` (the categorical draw), then `renoise`; HF's order is the
    same (multinomial, then randint). `initial_canvas` starts each canvas.
    """

    def initial_canvas(self, canvas_length: int, vocab_size: int) -> Tensor: ...  # [B, C] int64 in [0, V)

    def uniforms(self, canvas_length: int) -> Tensor: ...  # [B, C] fp32 in [0, 1)

    def renoise(self, canvas_length: int, vocab_size: int) -> Tensor: ...  # [B, C] int64 in [0, V)

    def categorical(self, probs: Tensor) -> Tensor: ...  # [B, C, V] probabilities -> [B, C] int64


class PerRequestDraws:
    """A DrawSource over one `torch.Generator` per row (per request). Rows never share a stream."""

    def __init__(self, generators: Sequence[torch.Generator], device: torch.device | str = "cpu"):
        self.generators = tuple(generators)
        self.device = torch.device(device)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int], device: torch.device | str = "cpu") -> PerRequestDraws:
        return cls([torch.Generator(device=device).manual_seed(s) for s in seeds], device)

    def select(self, rows: Sequence[int]) -> PerRequestDraws:
        """The same streams (not copies) for a subset of rows, e.g. the rows still denoising."""
        return PerRequestDraws([self.generators[r] for r in rows], self.device)

    def _stack(self, draw, shape_tail: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if not self.generators:
            return torch.empty((0, *shape_tail), dtype=dtype, device=self.device)
        return torch.stack([draw(g) for g in self.generators])

    def _tokens(self, canvas_length: int, vocab_size: int) -> Tensor:
        return self._stack(
            lambda g: torch.randint(0, vocab_size, (canvas_length,), generator=g, device=self.device),
            (canvas_length,),
            torch.int64,
        )

    def initial_canvas(self, canvas_length: int, vocab_size: int) -> Tensor:
        return self._tokens(canvas_length, vocab_size)

    def renoise(self, canvas_length: int, vocab_size: int) -> Tensor:
        return self._tokens(canvas_length, vocab_size)

    def uniforms(self, canvas_length: int) -> Tensor:
        return self._stack(
            lambda g: torch.rand(canvas_length, generator=g, device=self.device), (canvas_length,), torch.float32
        )

    def categorical(self, probs: Tensor) -> Tensor:
        rows, canvas_length, vocab_size = probs.shape
        u = self.uniforms(canvas_length).reshape(-1)
        return inverse_cdf_sample(probs.reshape(-1, vocab_size), u).view(rows, canvas_length)


_SCALARS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _scalar(value: int, like: Tensor) -> Tensor:
    """A 0-dim `value` of `like`'s dtype and device (a constant, made once)."""
    key = (value, like.dtype, like.device)
    if key not in _SCALARS:
        _SCALARS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return _SCALARS[key]


def _zero(like: Tensor) -> Tensor:
    return _scalar(0, like)


def _one(like: Tensor) -> Tensor:
    return _scalar(1, like)


def inverse_cdf_sample(probs: Tensor, u: Tensor, *, inplace: bool = False) -> Tensor:
    """Index of the first cumulative probability above u * total, per row of probs [M, V]; u is [M] in [0, 1).

    Never returns a zero-probability index (e.g. one masked by top-k): the target stays strictly below the total,
    and a zero-probability index does not raise the cumulative sum above the previous index.
    """
    cdf = probs.cumsum_(-1) if inplace else probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, _zero(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


ARGMAX_BLOCK = 64


def first_argmax(z: Tensor) -> Tensor:
    """`z.argmax(-1)` for z [M, V], the same indices (the first maximum; NaN counts as the maximum), computed from
    block maxima: the CPU's index-tracking argmax does not vectorise, amax does, so this is ~5x faster there."""
    m, v = z.shape
    if z.device.type != "cpu" or v % ARGMAX_BLOCK or not z.is_contiguous():
        return z.argmax(dim=-1)
    blocks = z.view(m, v // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # the first block holding the row's maximum
    inner = blocks[_arange(m, z.device), best].argmax(dim=-1)  # its first maximum inside that block
    return torch.add(inner, best, alpha=ARGMAX_BLOCK)


_ARANGES: dict[tuple[int, torch.device], Tensor] = {}


def _arange(n: int, device: torch.device) -> Tensor:
    """arange(n) on device (a constant, made once)."""
    if (n, device) not in _ARANGES:
        _ARANGES[(n, device)] = torch.arange(n, device=device)
    return _ARANGES[(n, device)]


# MARK: the pieces of a step, each identical to HF's arithmetic


def temperature(steps_left: Tensor, max_steps: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
    """T = t_min + (t_max - t_min) * n / N in fp32, rounded exactly like HF's LinearTemperatureScheduleLogitsProcessor.

    HF computes `py_t_min + (py_t_max - py_t_min) * (int32_tensor_n / py_int_N)`: the span is a Python double cast
    to fp32, and n / N is an fp32 division (on CUDA, PyTorch turns division by a Python scalar into multiplication
    by its fp32 reciprocal, so we do the same there). t_min/t_max should be float64 tensors for the span to match.
    """
    n = steps_left.to(torch.float32)
    total = max_steps.to(torch.float32)
    frac = n * total.reciprocal() if n.device.type == "cuda" else n / total
    span = (t_max.to(torch.float64) - t_min.to(torch.float64)).to(torch.float32)
    return t_min.to(torch.float32) + span * frac


def mask_top_k_top_p(x: Tensor, top_k: Tensor, top_p: Tensor, max_top_k: int, use_top_p: bool) -> Tensor:
    """vLLM-style filter on logits x [M, V]: top_k [M] (0 = off; ties with the k-th value kept), then top_p [M]
    (float64, 1 = off) on the top-k-filtered distribution. Removed logits become -inf; x is not modified."""
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    if max_top_k > 0:
        k = min(max_top_k, x.shape[-1])
        top = torch.topk(x, k, dim=-1).values  # [M, k], descending
        kth = top.gather(-1, (top_k.clamp(1, k) - 1)[:, None])
        kth = torch.where((top_k > 0)[:, None], kth, neg_inf)
        x = x.masked_fill(x < kth, neg_inf)
    if use_top_p:
        sorted_x, order = torch.sort(x, dim=-1)  # ascending, like vLLM and HF TopPLogitsWarper
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - top_p.to(torch.float64)).to(torch.float32)[:, None]
        remove[:, -1] = False  # the most likely token always survives
        remove &= (top_p < 1)[:, None]
        x = x.masked_fill(torch.zeros_like(remove).scatter_(-1, order, remove), neg_inf)
    return x


def entropy(z: Tensor, *, inplace: bool = False, finite: bool = False) -> Tensor:
    """Entropy of softmax(z) over the last dim, with exactly the ops of
    `torch.distributions.Categorical(logits=z).entropy()` (what HF calls), so values match bit for bit.
    -inf logits contribute 0. With inplace=True, z is used as scratch. `finite=True` promises no -inf in z (no
    top-k/top-p mask): the clamp that guards -inf * 0 is then a no-op and is skipped (one kernel less)."""
    log_p = z.sub_(z.logsumexp(dim=-1, keepdim=True)) if inplace else z - z.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(log_p, dim=-1)
    if not finite:
        log_p = log_p.clamp_(min=torch.finfo(z.dtype).min)
    return -log_p.mul_(p).sum(-1)


def accept_by_entropy(token_entropy: Tensor, entropy_bound: Tensor) -> Tensor:
    """Entropy-bound acceptance (arXiv 2505.24857): sort positions by entropy and accept the prefix whose entropy sum
    minus its max (= the sum of the earlier ones) is <= bound; the lowest-entropy position is always accepted.
    token_entropy [B, C] fp32, entropy_bound [B] fp32 (HF compares in fp32). Ties follow torch.sort, as in HF."""
    sorted_h, order = torch.sort(token_entropy, dim=-1)
    keep_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= entropy_bound[:, None]
    return keep_sorted.scatter(-1, order, keep_sorted)  # order is a permutation: every entry is overwritten


def self_conditioning_probs(z: Tensor, dtype: torch.dtype, *, probs: Tensor | None = None) -> Tensor:
    """softmax(z) as HF computes it for self-conditioning: the scaled logits stored in the embedding dtype,
    soft-maxed in fp32, cast back to that dtype. `probs` = softmax(z) in fp32 may be passed (used when dtype is
    fp32, where it is the same tensor)."""
    if probs is None or dtype != torch.float32:
        probs = torch.softmax(z.to(dtype), dim=-1, dtype=torch.float32)
    return probs.to(dtype)


def self_conditioning_matmul(probs: Tensor, embedding: Tensor, embed_scale: float | None = None) -> Tensor:
    """probs [..., V] (embedding dtype) @ embedding [V, hidden], times embed_scale rounded to that dtype if given
    (HF's `* embed_tokens.embed_scale`). Under tensor parallelism `embedding` is this rank's vocabulary shard
    (padded): the partial products are all-reduced (parallel.py)."""
    if probs.shape[-1] == embedding.shape[0]:
        out = torch.matmul(probs, embedding)
    else:
        out = _vocab_parallel(probs, embedding)
    if embed_scale is not None:
        out = out * torch.tensor(embed_scale, dtype=torch.float32, device=out.device).to(embedding.dtype)
    return out


def _vocab_parallel(probs: Tensor, shard: Tensor) -> Tensor:
    from . import parallel

    tp = parallel.current()
    if tp is None:
        raise ValueError(f"probabilities over {probs.shape[-1]} tokens against an embedding of {shard.shape[0]} rows")
    return tp.vocab_matmul(probs, shard)


def self_conditioning_embeddings(
    z: Tensor, embedding: Tensor, embed_scale: float | None = None, *, probs: Tensor | None = None
) -> Tensor:
    """Compact self-conditioning signal softmax(z) @ embedding -> [..., hidden], in embedding.dtype, with HF's
    casts (`self_conditioning_probs`, then `self_conditioning_matmul`)."""
    return self_conditioning_matmul(self_conditioning_probs(z, embedding.dtype, probs=probs), embedding, embed_scale)


# MARK: per-row settings, state and result


@dataclass(frozen=True)
class RowParams:
    """Per-row sampler settings, one entry per batch row (slot)."""

    max_steps: Tensor  # [B] int32, N
    t_min: Tensor  # [B] float64 (float64 so t_max - t_min rounds as HF's Python arithmetic does)
    t_max: Tensor  # [B] float64
    entropy_bound: Tensor  # [B] float32 (HF compares in fp32)
    confidence_threshold: Tensor  # [B] float32
    stability_threshold: Tensor  # [B] int32
    top_k: Tensor  # [B] int64, 0 = off
    top_p: Tensor  # [B] float64, 1.0 = off
    t_min32: Tensor  # [B] fp32 t_min, and the span and N of the schedule as `temperature` rounds them: made once
    t_span32: Tensor  # [B] fp32 (t_max - t_min), the difference taken in float64
    steps32: Tensor  # [B] fp32 N (its reciprocal on CUDA, where HF multiplies by it)
    max_top_k: int = 0  # host-side max of top_k: lets the step skip or size the filter without a device sync
    use_top_p: bool = False  # host-side: some row has top_p < 1

    @classmethod
    def from_settings(cls, settings: Sequence[DenoiseSettings], device: torch.device | str = "cpu") -> RowParams:
        def col(name: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([getattr(s, name) for s in settings], dtype=dtype, device=device)

        t_min, t_max = col("t_min", torch.float64), col("t_max", torch.float64)
        steps32 = col("max_denoising_steps", torch.float32)
        return cls(
            t_min32=t_min.to(torch.float32),
            t_span32=(t_max - t_min).to(torch.float32),
            steps32=steps32.reciprocal() if steps32.device.type == "cuda" else steps32,
            max_steps=col("max_denoising_steps", torch.int32),
            t_min=col("t_min", torch.float64),
            t_max=col("t_max", torch.float64),
            entropy_bound=col("entropy_bound", torch.float32),
            confidence_threshold=col("confidence_threshold", torch.float32),
            stability_threshold=col("stability_threshold", torch.int32),
            top_k=col("top_k", torch.int64),
            top_p=col("top_p", torch.float64),
            max_top_k=max((s.top_k for s in settings), default=0),
            use_top_p=any(s.top_p < 1 for s in settings),
        )

    def temperature(self, steps_left: Tensor) -> Tensor:
        """`temperature(steps_left, max_steps, t_min, t_max)` from the precomputed parts (4 kernels, the same bits)."""
        n = steps_left.to(torch.float32)
        frac = n * self.steps32 if n.device.type == "cuda" else n / self.steps32
        return self.t_min32 + self.t_span32 * frac

    def select(self, rows: Tensor) -> RowParams:
        """Rows `rows` (an index tensor). The host-side hints are kept: they stay valid upper bounds."""
        picked = {n: v.index_select(0, rows) for n, v in vars(self).items() if isinstance(v, Tensor)}
        return RowParams(**picked, max_top_k=self.max_top_k, use_top_p=self.use_top_p)


@dataclass(frozen=True)
class StepResult:
    canvas: Tensor  # [B, C] int64: accepted samples, every other position renoised; the next decoder input
    argmax: Tensor  # [B, C] int64: argmax of the scaled logits; committed when the canvas is done
    accepted: Tensor  # [B, C] bool
    stable_run: Tensor  # [B] int32: consecutive steps (this one included) with an identical argmax canvas
    converged: Tensor  # [B] bool: stable and confident (HF's StableAndConfidentStoppingCriteria)
    done: Tensor  # [B] bool: converged, or this was the last allowed step (n == 1); commit `argmax`
    mean_entropy: Tensor  # [B] fp32
    sc_embeds: Tensor | None  # [B, C, hidden] in the embedding dtype (None if no embedding was given)


def start_canvas(draws: DrawSource, canvas_length: int, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """A fresh canvas: (uniform random canvas [B, C], prev_argmax [B, C] = -1, stable_run [B] = 0).
    -1 never equals a token, so a canvas always runs at least two steps when stability_threshold > 0 (as in HF)."""
    canvas = draws.initial_canvas(canvas_length, vocab_size)
    return canvas, torch.full_like(canvas, -1), torch.zeros(canvas.shape[0], dtype=torch.int32, device=canvas.device)


# MARK: the step


def _per_position(logits, temp_rows, u, top_k, top_p, params, embedding, embed_scale):
    """All per-position passes over logits [B, C, V] at once: argmax, sample, entropy and the self-conditioning
    signal, flat over positions. The same values as the sub-slab loop in `step` (temperature broadcast per row)."""
    rows, c, v = logits.shape
    if top_k is not None:
        logits = mask_top_k_top_p(logits.view(rows * c, v), top_k, top_p, params.max_top_k,
                                  params.use_top_p).view(rows, c, v)
    z = (logits / temp_rows[:, None, None]).view(rows * c, v)
    argmax = first_argmax(z)
    probs = torch.softmax(z, dim=-1)
    sc = None
    if embedding is not None:
        sc = self_conditioning_matmul(self_conditioning_probs(z, embedding.dtype, probs=probs), embedding,
                                      embed_scale)
    sampled = inverse_cdf_sample(probs, u, inplace=True)
    del probs
    return argmax, sampled, entropy(z, inplace=True, finite=top_k is None), sc


def step(
    logits: Tensor,
    steps_left: Tensor,
    params: RowParams,
    prev_argmax: Tensor,
    stable_run: Tensor,
    draws: DrawSource,
    *,
    embedding: Tensor | None = None,
    embed_scale: float | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    cpu_sub_slabs: bool = True,
) -> StepResult:
    """One denoising step for B live rows.

    logits [B, C, V] fp32 (soft-capped decoder output); steps_left [B] int32 (n: N on the first step, 1 on the
    last); prev_argmax [B, C] and stable_run [B] from the previous step (or `start_canvas`); embedding [V, hidden]
    for the self-conditioning signal. No host sync happens here. `cpu_sub_slabs=False` runs the per-position
    passes on whole slabs on the CPU too (fewer, larger kernels: the fast path, and what a compiled step wants).
    """
    if logits.dtype != torch.float32 or logits.dim() != 3:
        raise ValueError(f"logits must be fp32 [B, C, V] (got {logits.dtype} {tuple(logits.shape)})")
    rows, canvas_length, vocab_size = logits.shape
    positions = rows * canvas_length
    flat = logits.view(positions, vocab_size)  # needs a contiguous buffer: never copy a [B, C, V] tensor

    # Draw first, in HF's per-row order (categorical, then renoise), so replay into HF lines up.
    if hasattr(draws, "step_draws"):  # both draws in one pass (the fast step's draws.StepDraws)
        u, noise = draws.step_draws(canvas_length, vocab_size)
    else:
        u, noise = draws.uniforms(canvas_length), draws.renoise(canvas_length, vocab_size)
    u = u.reshape(positions)

    temp_rows = params.temperature(steps_left)
    filtering = params.max_top_k > 0 or params.use_top_p
    if filtering:
        top_k = params.top_k.repeat_interleave(canvas_length)
        top_p = params.top_p.repeat_interleave(canvas_length)

    slab = slab_positions(canvas_length, vocab_size, chunk_elems)
    # On the CPU the per-position passes run on cache-sized sub-slabs (every op is per position, so the values are
    # the same; ~2.5x faster than streaming [slab, V] temporaries through memory). At least 2 positions: a
    # multi-threaded CPU reduction with a single output splits the reduced dim differently (two-pass), which
    # would change the last bits. The self-conditioning GEMM keeps the slab's row count, which fixes its rounding.
    # On CUDA the kernels' reduction order may depend on the row count, so the sub-slab is the whole slab there.
    sub = slab if logits.device.type != "cpu" or not cpu_sub_slabs else \
        min(slab, max(2, CPU_SUB_SLAB_ELEMS // vocab_size))
    if sub >= positions:  # one pass over everything (the fast path): no output buffers, the same ops
        argmax, sampled, token_entropy, sc = _per_position(logits, temp_rows, u, top_k if filtering else None,
                                                          top_p if filtering else None, params, embedding,
                                                          embed_scale)
    else:
        temp = temp_rows.repeat_interleave(canvas_length)
        argmax = torch.empty(positions, dtype=torch.int64, device=logits.device)
        sampled = torch.empty_like(argmax)
        token_entropy = torch.empty(positions, dtype=torch.float32, device=logits.device)
        sc = None
        if embedding is not None:
            sc = torch.empty(positions, embedding.shape[1], dtype=embedding.dtype, device=logits.device)
        for s in range(0, positions, slab):
            e = min(s + slab, positions)
            sc_probs = None if sc is None else torch.empty(e - s, vocab_size, dtype=embedding.dtype,
                                                           device=logits.device)
            for a in range(s, e, sub):
                b = min(a + sub, e)
                x = flat[a:b]
                if filtering:
                    x = mask_top_k_top_p(x, top_k[a:b], top_p[a:b], params.max_top_k, params.use_top_p)
                z = x / temp[a:b, None]  # a tensor divisor: true division, as HF's 0-dim temperature tensor
                argmax[a:b] = first_argmax(z)
                probs = torch.softmax(z, dim=-1)
                if sc_probs is not None:
                    sc_probs[a - s:b - s] = self_conditioning_probs(z, embedding.dtype, probs=probs)
                sampled[a:b] = inverse_cdf_sample(probs, u[a:b], inplace=True)
                del probs  # free before the entropy pass allocates its own temporaries
                token_entropy[a:b] = entropy(z, inplace=True, finite=not filtering)
            if sc is not None:
                sc[s:e] = self_conditioning_matmul(sc_probs, embedding, embed_scale)

    token_entropy = token_entropy.view(rows, canvas_length)
    argmax = argmax.view(rows, canvas_length)
    accepted = accept_by_entropy(token_entropy, params.entropy_bound)
    canvas = torch.where(accepted, sampled.view(rows, canvas_length), noise)

    same = (argmax == prev_argmax).all(dim=-1)
    stable_run = torch.addcmul(_one(stable_run), stable_run, same)  # +1 on an identical argmax canvas, else 1
    mean_entropy = torch.mean(token_entropy, dim=-1)
    # stable_run > k  <=>  this argmax equals each of the previous k argmax canvases (HF's history test).
    converged = (stable_run > params.stability_threshold) & (mean_entropy < params.confidence_threshold)
    return StepResult(
        canvas=canvas,
        argmax=argmax,
        accepted=accepted,
        stable_run=stable_run,
        converged=converged,
        done=converged | (steps_left <= 1),
        mean_entropy=mean_entropy,
        sc_embeds=None if sc is None else sc.view(rows, canvas_length, -1),
    )
