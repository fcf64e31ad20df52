"""The feed-forward half of a layer: the dense GeGLU MLP and the mixture of experts beside it.

The router reads the *raw* residual stream (not the pre-norm output; routing on normed states breaks parity), picks
the top-k experts from an fp32 softmax, renormalises their weights to sum to one and scales each by a learned
per-expert factor. Experts are GeGLU blocks stored as stacked 3-D tensors, gate rows before up rows.

Two ways to run the experts, one result format. Exact mode (batch-invariant on) runs one row-tiled matmul pair per
expert hit, so a token's output never depends on how many tokens share its expert; it reads the group sizes back
to the host once per call. Fast mode runs two grouped GEMMs over all experts with the group offsets computed on the
device: a fixed dozen ops, no host sync, one graph under torch.compile. A grouped GEMM runs each group as one matmul,
so in fp32 a token's output can change in the last bits with its group's size (on this CPU: one row, two or
three rows, and larger groups take different kernels); bf16 showed no such dependence here, but nothing promises it.
Both modes weight the expert outputs in fp32 and sum each token's k of them in fp32, rounding once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import batch_invariant, fp8
from .batch_invariant import EXPERT_TILE, Linear, linear
from .config import TextConfig


_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)  # torch >= 2.8


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    """Gemma-4 RMSNorm: fp32 statistics, weight applied as is (not 1 + w). `with_scale=False` has no weight."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma-4 RMSNorm over the last dim. One fused kernel on CUDA (`_fused_rms_norm`; the CPU build runs it as a
    composite). On the CPU it equals the reference's x.float() * (mean(x^2) + eps)^-0.5 * w.float(), rounded once to
    x's dtype, bit for bit, in fp32 and in bf16 (fp32 statistics inside)."""
    if _FUSED_RMS_NORM is not None:
        return _FUSED_RMS_NORM(x, [x.shape[-1]], weight, eps)[0]
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).type_as(x)


class MLP(nn.Module):
    """Dense GeGLU block: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inner)
        self.up_proj = Linear(hidden, inner)
        self.down_proj = Linear(inner, hidden)

    fused: torch.Tensor | None = None  # [2 * inner, hidden]: gate rows then up rows (fast path)
    fused_scale: torch.Tensor | None = None  # [2 * inner, 1]: their FP8 scales (fp8.py)

    def fuse(self) -> None:
        """One GEMM for gate and up in the fast path (see model.fuse_linears); idempotent. FP8 layers fuse their
        scales alongside."""
        if self.fused is None or self.gate_proj.weight.data_ptr() != self.fused.data_ptr():
            from .model import fuse_linears
            self.fused = fuse_linears([self.gate_proj, self.up_proj])
            self.fused_scale = batch_invariant.fuse_scales([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and not batch_invariant.enabled() and not torch.is_grad_enabled():
            gate, up = batch_invariant.fused_linear(x, self.fused, self.fused_scale,
                                                    self.gate_proj.fp8_activations).chunk(2, dim=-1)
            return self.down_proj(gelu_tanh(gate) * up)
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root = cfg.hidden_size ** -0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = Linear(cfg.hidden_size, cfg.num_experts)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """residual [N, H] -> (weights [N, k] fp32, expert ids [N, k])."""
        # The scale stays a separate multiply: folded into the norm's weight it rounds once instead of twice in bf16,
        # which moves near-tie routing enough to raise the bf16 logit error over seeds (measured: mean 0.126 vs 0.103).
        scores = self.proj(self.norm(residual) * self.scale * self.root)
        if not batch_invariant.enabled():
            # Fast: the renormalised top-k of the softmax computed as the softmax of the top-k scores (equal up to
            # fp32 rounding; 2 kernels fewer). The top-k runs on fp32 scores, so that ties between bf16 scores break
            # as they do on the reference's fp32 probabilities.
            top, idx = torch.topk(scores.float(), self.top_k, dim=-1)
            return torch.softmax(top, dim=-1) * self.per_expert_scale[idx], idx
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    fp8_activations = False  # FP8 experts: quantise activations per token for the FP8 grouped GEMM (fp8.prepare)

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, h, m = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * m, h))  # [E, gate rows | up rows, H]
        self.down_proj = nn.Parameter(torch.empty(e, h, m))  # [E, H, M]
        self._ends: torch.Tensor | None = None  # 1..E, the group ends searched for in the sorted ids (made once)
        self.register_buffer("gate_up_proj_scale", None)  # [E, 2M, 1] fp32 when the experts are FP8 (fp8.py)
        self.register_buffer("down_proj_scale", None)  # [E, H, 1] fp32 when the experts are FP8

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, H]; each token goes through its k experts; outputs are weighted and summed.

        The (token, k) assignments are sorted by expert, so each expert's rows are contiguous. The weighted
        outputs, back in (token, k) order, are summed over k in fp32 and rounded once, as transformers' default
        (`grouped_mm`) experts path does: in bf16 this matches it, where a bf16 running sum would drift by about
        one bf16 step per layer.
        """
        n, k = idx.shape
        local = self.expert_range is not None
        if local:  # [parallel] expert parallel: this rank's experts only; the others' assignments go last and count 0
            e0, e1 = self.expert_range
            mine = (idx >= e0) & (idx < e1)
            idx = torch.where(mine, idx - e0, e1 - e0)
        ids, order = idx.flatten().sort()
        xs = x[order // k]
        ys = self._per_expert(xs, ids) if batch_invariant.enabled() else self._grouped(xs, ids)
        y = torch.empty_like(ys)
        y[order] = ys
        y = y.view(n, k, x.shape[1])
        if local:
            y = y.masked_fill(~mine[..., None], 0)
        return (y * weights[..., None]).sum(1).to(x.dtype)

    expert_range: tuple[int, int] | None = None  # [parallel] (first, end) of the experts this rank holds (EP)

    def _grouped(self, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Fast mode: two grouped GEMMs over all experts, group ends found on the device (no host sync)."""
        w1, w2 = self.gate_up_proj, self.down_proj
        ends = self._ends
        if ends is None or ends.device != ids.device:
            ends = self._ends = torch.arange(1, w1.shape[0] + 1, device=ids.device)
        offs = torch.searchsorted(ids, ends, out_int32=True)
        s1 = s2 = None
        if self.gate_up_proj_scale is not None:
            if self.fp8_activations and not torch.is_autocast_enabled(xs.device.type) \
                    and fp8.scaled_grouped_mm_ok(xs, w1, w2):  # CUDA sm90/sm100: the FP8 grouped GEMM
                gate, up = fp8.scaled_grouped_mm(xs, w1, self.gate_up_proj_scale, offs).chunk(2, dim=-1)
                return fp8.scaled_grouped_mm(gelu_tanh(gate) * up, w2, self.down_proj_scale, offs)
            # Elsewhere (fp8.py): the cast to the activation dtype is exact (e4m3 fits bf16/fp16/fp32); each expert's
            # per-row weight scale multiplies its output columns after the GEMM (a gather of [S, N] scales), so no
            # scaled copy of the stack is made: the GEMM reads the cast stack once.
            w1, w2 = w1.to(xs.dtype), w2.to(xs.dtype)
            s1, s2 = self.gate_up_proj_scale[ids, :, 0], self.down_proj_scale[ids, :, 0]
        if torch.is_autocast_enabled(xs.device.type):  # grouped_mm is not on autocast's list; cast as F.linear would
            dtype = torch.get_autocast_dtype(xs.device.type)
            xs, w1, w2 = xs.to(dtype), w1.to(dtype), w2.to(dtype)
        gate, up = _scaled(_grouped_mm(xs, w1.transpose(1, 2), offs), s1).chunk(2, dim=-1)
        return _scaled(_grouped_mm(gelu_tanh(gate) * up, w2.transpose(1, 2), offs), s2)

    def _per_expert(self, xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact mode: one row-tiled matmul pair per expert hit, so a row's result never depends on its group."""
        counts = torch.bincount(ids, minlength=self.gate_up_proj.shape[0]).tolist()[:self.gate_up_proj.shape[0]]
        ys, start = [], 0
        for e, c in enumerate(counts):
            if c:
                w1, w2 = self.gate_up_proj[e], self.down_proj[e]
                if self.gate_up_proj_scale is not None:  # FP8: dequantise the experts hit, per use
                    w1 = fp8.dequantize(w1, self.gate_up_proj_scale[e], xs.dtype)
                    w2 = fp8.dequantize(w2, self.down_proj_scale[e], xs.dtype)
                gate, up = linear(xs[start:start + c], w1, EXPERT_TILE).chunk(2, dim=-1)
                ys.append(linear(gelu_tanh(gate) * up, w2, EXPERT_TILE))
                start += c
        if start < xs.shape[0]:  # [parallel] assignments to other ranks' experts (sorted last): zeros
            ys.append(xs.new_zeros(xs.shape[0] - start, self.down_proj.shape[1]))
        if not ys:
            return xs.new_empty(0, self.down_proj.shape[1])
        return torch.cat(ys) if len(ys) > 1 else ys[0]


def _scaled(y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """y [S, N] times per-row FP8 weight scales gathered per token [S, N] (fp32, rounded once); None: y."""
    return y if scale is None else (y.float() * scale).to(y.dtype)


# MARK: grouped GEMM in any dtype


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of a [S, K] in group g (offs[g-1]:offs[g]) times b[g] [K, N] -> [S, N]. torch's own op traces under
    torch.compile in bf16 only (its fake kernel refuses other dtypes), so other dtypes go through `grouped_mm`."""
    return F.grouped_mm(a, b, offs=offs) if a.dtype == torch.bfloat16 else grouped_mm(a, b, offs)


@torch.library.custom_op("dgemma::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm as an op that torch.compile sees through in every dtype. With b 3-D: [S, K] x [G, K, N] ->
    [S, N]; with both 2-D (the weight gradient): [K, S] x [S, N] -> [G, K, N], S split into groups by offs."""
    return F.grouped_mm(a, b, offs=offs)


@grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_grad(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors
    grad_a = grouped_mm(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_b = grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


grouped_mm.register_autograd(_grouped_mm_grad, setup_context=_save_inputs)
