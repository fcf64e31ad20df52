"""The Gemma-4 vision tower and the multimodal embedder: image patches in, text-space soft tokens out.

DiffusionGemma's encoder reads images as *soft tokens*: each image's pixels become `n` vectors of the text model's
width that replace the image-token placeholders of the prompt (the decoder and the canvas never see images).

- **patch embedder**: a patch's 16x16x3 pixels in [0, 1] are mapped to [-1, 1] and projected (no bias); a learned
  2-D position embedding (one table for x, one for y, summed) is added. Padding patches get no position.
- **encoder layers**: bidirectional attention over the image's real patches with scale 1.0 (q/k norms instead of
  1/sqrt(d)), a scale-free v norm, and *axial* 2-D RoPE: the first half of each head rotates with the patch's x,
  the second half with its y; then a GeGLU MLP. Four RMSNorms per layer (pre/post attention, pre/post MLP).
- **pooling**: the patch grid is averaged over k x k cells (k = pooling_kernel_size), scaled by sqrt(hidden) in
  fp32, and optionally standardised (`std_bias`, `std_scale`).
- **multimodal embedder**: scale-free RMSNorm, then a linear map to the text width.

Padding patches never enter the computation: each image's real patches are packed together, every per-token
operation runs once over the packed rows, and attention runs per image on its exact length. So an image's soft
tokens do not depend on the images it is batched with (projections honour batch-invariant mode, see
batch_invariant.py).

Module names follow the checkpoint (`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`); see
`checkpoint.py`. Parity with transformers' Gemma4VisionModel + DiffusionGemmaMultimodalEmbedder is tested in
tests/test_vision.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batch_invariant import linear
from .config import ConfigError
from .moe import RMSNorm, gelu_tanh

# The released google/diffusiongemma-26B-A4B-it vision tower (spec 1.1: hidden 1152, 27 layers, 16 heads x 72, patch
# 16, pooling 3, ~550M parameters). intermediate_size and position_embedding_size are the SigLIP-so400m / Gemma-4
# values; the meta-device layout test checks the tensor names and shapes this implies.
RELEASED_VISION = dict(
    model_type="gemma4_vision", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
    num_attention_heads=16, num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
    position_embedding_size=10240, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    rope_parameters={"rope_type": "axial", "rope_theta": 100.0}, use_clipped_linears=False, standardize=False,
)


def _check(cond: bool, source: str, name: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{source}: field 'vision_config.{name}' must be {expected}, got {got!r}")


@dataclass(frozen=True)
class VisionConfig:
    """`vision_config` (model_type gemma4_vision) plus the image-token ids of the top-level config."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    text_hidden_size: int
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10240
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    use_clipped_linears: bool = False
    standardize: bool = False
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    soft_tokens_per_image: int = 280  # the image processor's max_soft_tokens (`vision_soft_tokens_per_image`)
    # text_config.use_bidirectional_attention == "vision" (the release): an image's tokens attend to each other
    # both ways in the encoder; otherwise they are causal like text.
    bidirectional_images: bool = True
    source: str = field(default="config.json", compare=False, repr=False)

    def __post_init__(self) -> None:
        s = self.source
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "patch_size", "pooling_kernel_size",
                     "position_embedding_size", "soft_tokens_per_image"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, s, name, "a positive integer", v)
        _check(self.num_attention_heads % self.num_key_value_heads == 0, s, "num_key_value_heads",
               f"a divisor of num_attention_heads ({self.num_attention_heads})", self.num_key_value_heads)
        _check(self.head_dim % 4 == 0, s, "head_dim", "a multiple of 4 (axial RoPE: x and y halves)", self.head_dim)

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size ** 2

    @classmethod
    def from_model_dict(cls, d: dict, text_hidden_size: int, source: str = "config.json") -> "VisionConfig":
        """From a top-level diffusion_gemma config dict (its `vision_config` and image-token ids)."""
        v = d.get("vision_config")
        if not isinstance(v, dict):
            raise ConfigError(f"{source}: field 'vision_config' is missing or not an object")
        if v.get("model_type", "gemma4_vision") != "gemma4_vision":
            raise ConfigError(f"{source}: field 'vision_config.model_type' must be 'gemma4_vision', "
                              f"got {v.get('model_type')!r}")
        act = v.get("hidden_activation", "gelu_pytorch_tanh")
        _check(act == "gelu_pytorch_tanh", source, "hidden_activation", "'gelu_pytorch_tanh'", act)
        rope = v.get("rope_parameters") or {"rope_type": "axial", "rope_theta": 100.0}
        _check(rope.get("rope_type", "axial") == "axial", source, "rope_parameters.rope_type", "'axial'",
               rope.get("rope_type"))
        heads = v.get("num_attention_heads", 12)
        ids = {k: d[k] for k in ("image_token_id", "boi_token_id", "eoi_token_id") if d.get(k) is not None}
        return cls(
            hidden_size=v.get("hidden_size", 768), intermediate_size=v.get("intermediate_size", 3072),
            num_hidden_layers=v.get("num_hidden_layers", 16), num_attention_heads=heads,
            num_key_value_heads=v.get("num_key_value_heads", heads), head_dim=v.get("head_dim", 64),
            text_hidden_size=text_hidden_size, patch_size=v.get("patch_size", 16),
            pooling_kernel_size=v.get("pooling_kernel_size", 3),
            position_embedding_size=v.get("position_embedding_size", 10240),
            rms_norm_eps=v.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", 100.0)),
            use_clipped_linears=bool(v.get("use_clipped_linears", False)),
            standardize=bool(v.get("standardize", False)),
            soft_tokens_per_image=d.get("vision_soft_tokens_per_image", 280), source=source,
            bidirectional_images=(d.get("text_config") or {}).get("use_bidirectional_attention") == "vision", **ids,
        )


# MARK: layers


class ClippableLinear(nn.Module):
    """A bias-free linear map, optionally clamping its input and output to learned ranges (checkpoint buffers
    `input_min/max`, `output_min/max`). Named `linear` inside, as in the checkpoint."""

    def __init__(self, cfg: VisionConfig, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = cfg.use_clipped_linears
        if self.clipped:
            for name in ("input_min", "output_min"):
                self.register_buffer(name, torch.tensor(-math.inf))
            for name in ("input_max", "output_max"):
                self.register_buffer(name, torch.tensor(math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = x.clamp(self.input_min, self.input_max)
        y = linear(x, self.linear.weight)
        return y.clamp(self.output_min, self.output_max) if self.clipped else y


def axial_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [T, 2] (x, y) -> cos, sin [T, head_dim]: frequencies over head_dim/2 channels, laid out
    x, x, y, y so that each half of the head is a rotate-half RoPE over one axis."""
    half = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half))
    f = positions[..., None].float() * inv  # [T, 2, half/2]
    fx, fy = f[:, 0], f[:, 1]
    ang = torch.cat([fx, fx, fy, fy], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; each half of d is rotated (rotate-half) with its own axis' angles."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    h = x.shape[-1] // 2
    q = h // 2

    def rot(t):  # rotate-half within each axis half
        a, b = t[..., :h], t[..., h:]
        return torch.cat([-a[..., q:], a[..., :q], -b[..., q:], b[..., :q]], dim=-1)

    return x * cos + rot(x) * sin


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = ClippableLinear(cfg, h, self.heads * d)
        self.k_proj = ClippableLinear(cfg, h, self.kv_heads * d)
        self.v_proj = ClippableLinear(cfg, h, self.kv_heads * d)
        self.o_proj = ClippableLinear(cfg, self.heads * d, h)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """x [T, H]: the packed real patches of several images, `lengths` patches each."""
        t, d = x.shape[0], self.head_dim
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(t, self.heads, d)), cos, sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(t, self.kv_heads, d)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(t, self.kv_heads, d))
        rep = self.heads // self.kv_heads
        outs = []
        for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            qi, ki, vi = qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)  # [heads, n, d]
            if rep > 1:
                ki, vi = ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0)
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=1.0).transpose(0, 1).reshape(qi.shape[1], -1))
        return self.o_proj(torch.cat(outs) if len(outs) > 1 else outs[0])


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = ClippableLinear(cfg, cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = ClippableLinear(cfg, cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = ClippableLinear(cfg, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, x, cos, sin, lengths):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, lengths))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches [T, 3*p*p] in [0, 1]; positions [T, 2] (x, y) of real patches -> [T, H]."""
        w = self.input_proj.weight
        x = linear((2 * (patches - 0.5)).to(w.dtype), w)
        table = self.position_embedding_table
        return x + (table[0][positions[:, 0]] + table[1][positions[:, 1]])


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """Gemma4VisionModel: patches -> pooled, scaled (and optionally standardised) features [n, hidden]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = Encoder(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N, P, 3*p*p], positions [N, P, 2] with (-1, -1) for padding -> per image [n_i, hidden]."""
        cfg, k = self.cfg, self.cfg.pooling_kernel_size
        real = (positions != -1).any(-1)  # [N, P]
        lengths = real.sum(1).tolist()
        if any(n == 0 or n % (k * k) for n in lengths):
            raise ValueError(f"each image needs a positive multiple of {k * k} real patches, got {lengths}")
        pos = positions[real]  # [T, 2], images one after another
        x = self.patch_embedder(pixel_values[real], pos)
        cos, sin = axial_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, lengths)
        out = []
        for xi, pi in zip(x.split(lengths), pos.split(lengths)):
            out.append(self._pool(xi, pi))
        return out

    def _pool(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Average each k x k cell of one image's patch grid (cells numbered row by row), scale, standardise."""
        k = self.cfg.pooling_kernel_size
        cells_x = (int(pos[:, 0].max()) + 1) // k
        cell = (pos[:, 0] // k) + cells_x * (pos[:, 1] // k)
        n = x.shape[0] // (k * k)
        pooled = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
        pooled.index_add_(0, cell, x.float() / (k * k))
        # sqrt(hidden) can leave the fp16 range: the scale and the standardisation stay in fp32.
        pooled = pooled * self.cfg.hidden_size ** 0.5
        if self.cfg.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled.to(x.dtype)


class MultimodalEmbedder(nn.Module):
    """Soft tokens of the vision width -> the text width: scale-free RMSNorm, then a bias-free projection."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(cfg.hidden_size, cfg.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.embedding_pre_projection_norm(x), self.embedding_projection.weight)


class Vision(nn.Module):
    """What the checkpoint calls `model.encoder.vision_tower` and `model.encoder.embed_vision`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg)
        self.embed_vision = MultimodalEmbedder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_vision.embedding_projection.weight.dtype

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N, P, 3*p*p], positions [N, P, 2] -> per image its soft tokens [n_i, text hidden]."""
        feats = self.vision_tower(pixel_values, positions)
        return [self.embed_vision(f) for f in feats]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# MARK: cost


@dataclass(frozen=True)
class VisionCost:
    """What encoding one image costs at a given soft-token budget (analytic, from the config)."""

    patches: int
    soft_tokens: int
    flops: int  # multiply-adds x 2, matrix products and attention (norms, RoPE, GELU are O(T*H) and left out)
    weight_bytes: int  # every weight of the tower and the embedder, read once per call
    activation_bytes: int  # per image: fp32 upper bound of one layer's per-token temporaries
    attention_bytes: int  # one image's attention scores if materialised (math path; fused kernels need none)


def cost(cfg: VisionConfig, soft_tokens: int, dtype_bytes: int = 2) -> VisionCost:
    k2 = cfg.pooling_kernel_size ** 2
    t = soft_tokens * k2
    h, i, d, nq, nkv = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads, \
        cfg.num_key_value_heads
    per_layer = 2 * t * h * d * (2 * nq + 2 * nkv) + 2 * t * 3 * h * i + 2 * 2 * t * t * nq * d
    flops = 2 * t * cfg.patch_dim * h + cfg.num_hidden_layers * per_layer + 2 * soft_tokens * h * cfg.text_hidden_size
    params = (cfg.patch_dim * h + 2 * cfg.position_embedding_size * h
              + cfg.num_hidden_layers * (h * d * (2 * nq + 2 * nkv) + 3 * h * i + 4 * h + 2 * d)
              + h * cfg.text_hidden_size + (2 * h if cfg.standardize else 0))
    per_token = 4 * (8 * h + 3 * i + 4 * nq * d)
    return VisionCost(t, soft_tokens, flops, params * dtype_bytes, t * per_token, 3 * nq * t * t * 4)
