"""The feed-forward half of a layer: the dense GeGLU MLP and the mixture of experts beside it.

The router reads the *raw* residual stream (not the pre-norm output; routing on normed states breaks parity), picks
the top-k experts from an fp32 softmax, renormalises their weights to sum to one and scales each by a learned
per-expert factor. Experts are GeGLU blocks stored as stacked 3-D tensors, gate rows before up rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import batch_invariant
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

    def fuse(self) -> None:
        """One GEMM for gate and up in the fast path (see model.fuse_linears); idempotent."""
        if self.fused is None or self.gate_proj.weight.data_ptr() != self.fused.data_ptr():
            from .model import fuse_linears
            self.fused = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and not batch_invariant.enabled():
            gate, up = F.linear(x, self.fused).chunk(2, dim=-1)
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
        if not batch_invariant.enabled():
            # Fast path: the scale folded into the norm's weight; the renormalised top-k of a softmax is the softmax
            # of the top-k scores (2 kernels, not 4). The same experts; weights equal to fp32 rounding.
            scores = self.proj(rms_norm(residual, self.scale * self.root, self.norm.eps))
            top, idx = torch.topk(scores, self.top_k, dim=-1)
            return torch.softmax(top, dim=-1, dtype=torch.float32) * self.per_expert_scale[idx], idx
        scores = self.proj(self.norm(residual) * self.scale * self.root)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, h, m = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * m, h))  # [E, gate rows | up rows, H]
        self.down_proj = nn.Parameter(torch.empty(e, h, m))  # [E, H, M]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, H]; each token goes through its k experts; outputs are weighted and summed.

        Tokens are grouped by expert (one matmul per expert hit). Each token's k contributions are then added in
        ascending expert order, starting from zero, which is the reference's accumulation order, so the sum is
        bit-identical to it, without a scatter-add.
        """
        n, k = idx.shape
        idx, perm = idx.sort(dim=-1)  # per token: experts ascending
        weights = weights.gather(-1, perm)
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        xs = x[order // k]
        ws = weights.flatten()[order, None]
        ys = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                gate, up = linear(xs[start:start + c], self.gate_up_proj[e], EXPERT_TILE).chunk(2, dim=-1)
                ys.append(linear(gelu_tanh(gate) * up, self.down_proj[e], EXPERT_TILE) * ws[start:start + c])
                start += c
        y = torch.empty(n * k, x.shape[1], dtype=torch.promote_types(x.dtype, ws.dtype), device=x.device)
        y[order] = torch.cat(ys) if len(ys) > 1 else ys[0]
        y = y.to(x.dtype).view(n, k, -1)
        out = torch.zeros_like(x)
        for j in range(k):
            out = out + y[:, j]
        return out
