"""Batch-invariant matrix products: a row's result must not depend on the rows it is batched with.

BLAS libraries pick kernels (and reduction orders) by matrix shape, so `x @ W` for one row differs in the last
bits depending on how many other rows share the call. Diffusion sampling turns such bits into different tokens
(a multinomial draw or an entropy sort near a tie), which would make a request's output depend on its batch mates.

The cure is to call the kernel on row tiles of one fixed size only, zero-padding the last tile: every row then
goes through the same kernel with the same reduction order, whatever the batch. It costs a little speed, so it is
a mode: the engine turns it on around its forwards (`EngineConfig.batch_invariant`); training leaves it off.
Attention is made invariant separately, by running each row with its own exact key length (see kv_cache.py).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8

_state = threading.local()

DENSE_TILE = 64  # rows per kernel call for the dense layers
EXPERT_TILE = 32  # expert groups are small: a smaller tile wastes less padding


def enabled() -> bool:
    return getattr(_state, "on", False)


@contextlib.contextmanager
def mode(on: bool = True, dense_tile: int = DENSE_TILE):
    """Turn the mode on (or off) in this thread. The engine passes its canvas length as the dense tile, so a
    denoising forward (rows x canvas tokens) needs no padding at all."""
    prev = enabled(), getattr(_state, "tile", DENSE_TILE)
    _state.on, _state.tile = on, dense_tile
    try:
        yield
    finally:
        _state.on, _state.tile = prev


def linear(x: torch.Tensor, weight: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """F.linear(x, weight), row-tiled with a fixed tile size when batch-invariant mode is on."""
    if not enabled():
        return F.linear(x, weight)
    tile = tile or _state.tile
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # out= records no gradient
        if m % tile:
            x2 = torch.cat([x2, x2.new_zeros(tile - m % tile, shape[-1])])
        out = torch.cat([F.linear(x2[i:i + tile], weight) for i in range(0, x2.shape[0], tile)])
        return out[:m].reshape(*shape[:-1], weight.shape[0])
    full = m - m % tile
    # Each tile's product goes straight into its rows of one output buffer (no concatenation); only a partial last
    # tile is copied into a zero-padded tile-sized buffer.
    out = x2.new_empty(m, weight.shape[0])
    wt = weight.t()
    for i in range(0, full, tile):
        torch.mm(x2[i:i + tile], wt, out=out[i:i + tile])
    if full < m:
        last = x2.new_zeros(tile, shape[-1])
        last[:m - full] = x2[full:]
        out[full:] = torch.mm(last, wt)[:m - full]
    return out.reshape(*shape[:-1], weight.shape[0])


def fused_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                 fp8_activations: bool = False) -> torch.Tensor:
    """The fast path's product with fused weights (model.fuse_linears): F.linear, or for FP8 weights (their scales
    fused alongside, `fuse_scales`) the FP8 GEMM where it runs and the dequantised weight elsewhere."""
    if scale is None:
        return F.linear(x, weight)
    if fp8_activations and fp8.scaled_mm_ok(x, weight):
        return fp8.scaled_linear(x, weight, scale)
    return F.linear(x, fp8.dequantize(weight, scale, x.dtype))


def fuse_scales(linears: list["Linear"]) -> torch.Tensor | None:
    """The FP8 scales of `linears` as one [rows, 1] tensor, each layer's `weight_scale` re-pointed at its rows (the
    companion of model.fuse_linears); None for float layers."""
    if linears[0].weight_scale is None:
        return None
    fused = torch.cat([lin.weight_scale for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight_scale.shape[0]
        lin.weight_scale = fused[start:start + n]
        start += n
    return fused


class Linear(nn.Linear):
    """nn.Linear (no bias) that honours batch-invariant mode. An FP8 layer (fp8.prepare) holds a float8 weight and
    `weight_scale` [out, 1]: fast mode on a capable GPU runs an FP8 GEMM, elsewhere the weight is dequantised per use."""

    fp8_activations = False  # FP8 layer: quantise activations per token for the FP8 GEMM (fp8.prepare sets it)

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("weight_scale", None)  # [out, 1] fp32 on FP8 layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            return linear(x, self.weight)
        if self.fp8_activations and not enabled() and fp8.scaled_mm_ok(x, self.weight):
            return fp8.scaled_linear(x, self.weight, self.weight_scale)
        return linear(x, fp8.dequantize(self.weight, self.weight_scale, x.dtype))
