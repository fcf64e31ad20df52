"""Rotary position embeddings: `default` RoPE for sliding layers, `proportional` RoPE for full layers.

Rotate-half convention (dimension i pairs with i + d/2). Proportional RoPE rotates only the first
`partial_rotary_factor * d/2` frequency slots, with exponents taken over the *full* head size, and leaves the rest at
frequency 0 (cos 1, sin 0): position-free channels that the 26B model's 512-wide full-attention heads rely on.
"""

from __future__ import annotations

import torch

from .config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies."""
    if rope.rope_type == "proportional":
        rotated = int(rope.partial_rotary_factor * head_dim // 2)
        exps = torch.arange(0, 2 * rotated, 2, dtype=torch.float32) / head_dim
        inv = torch.cat([1.0 / (rope.theta ** exps), torch.zeros(head_dim // 2 - rotated)])
    else:
        inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv / rope.factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, d]; cos/signed_sin [..., d] broadcast over heads.

    The reference's x * cos + cat(-x2, x1) * sin, as x * cos + roll(x, d/2) * signed_sin: the same products (a sign
    moved from one factor to the other is exact), in four kernels instead of five."""
    return x * cos.unsqueeze(-2) + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin.unsqueeze(-2)


def apply_rope_fused(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with the second product and the sum as one multiply-add (three kernels; the fast path: it may
    round the sum once instead of twice)."""
    return torch.addcmul(x * cos.unsqueeze(-2), torch.roll(x, x.shape[-1] // 2, -1), signed_sin.unsqueeze(-2))


def rope_tables(signed_inv: torch.Tensor, dims: list[tuple[str, int]], positions: torch.Tensor,
                dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """RoPE tables of several layer types at once (four kernels in all), computed in fp32 then cast, as the reference
    does. `signed_inv` holds each type's frequencies twice in a row, the first copy negated ([-inv, inv] per type, in
    the order of `dims`: (type, head_dim)). cos is even and sin odd (exactly so in floating point: both reduce the
    argument symmetrically), so cos and the *signed* sin come straight out: the signed sin carries rotate-half's
    minus sign, -sin for dims [0, d/2), +sin after. Returns {type: (cos, signed sin)}, each
    [*positions.shape, head_dim] (views of one table)."""
    f = positions[..., None].float() * signed_inv.to(positions.device)
    cos, sin = f.cos().to(dtype), f.sin().to(dtype)
    out, start = {}, 0
    for lt, dim in dims:
        out[lt] = (cos[..., start:start + dim], sin[..., start:start + dim])
        start += dim
    return out
