"""The DiffusionGemma network: one Gemma-4 MoE weight stack, run in two modes.

- Encoder mode (causal) writes the KV cache of the prompt and of every committed canvas.
- Decoder mode (bidirectional over the canvas) reads that cache, never writes it, and predicts the clean canvas.

Notable details, each matching the reference (transformers' DiffusionGemmaForBlockDiffusion):
- sliding and full layers; full layers have their own head size and KV heads and no `v_proj`: V is the raw `k_proj`
  output, before `k_norm` and RoPE, passed through a scale-free `v_norm`;
- q/k norms replace the 1/sqrt(d) attention scale (scale 1.0); proportional RoPE on full layers;
- a dense GeGLU MLP beside the MoE, the router reading the raw residual;
- a separate `layer_scalar` per layer for each mode (checkpoints store both);
- decoder input = scale-free RMSNorm(embed(canvas) + self-conditioning MLP(soft embedding of the last step));
- embeddings scaled by sqrt(hidden) in the weight dtype; final logits soft-capped in fp32.

A forward runs over a list of *segments* (see kv_cache.py): groups of rows that are all causal or all
bidirectional. Every per-token operation (projections, norms, MLP, MoE) runs once over the tokens of all segments
packed together; only attention is done per segment. So prefill, commits and denoising share one forward.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batch_invariant import Linear, fuse_scales, fused_linear, linear
from .config import FULL, SLIDING, ModelConfig, TextConfig
from . import batch_invariant
from .moe import MLP, Experts, RMSNorm, Router, rms_norm
from .rope import apply_rope, apply_rope_fused, inv_frequencies, rope_tables


class Segment(Protocol):
    """Rows of one forward that share a mode. The model packs their tokens; the segment does their attention."""

    causal: bool  # encoder mode (True) or decoder mode (False): picks the layer scalar and self-conditioning
    input_ids: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, L] absolute positions, for RoPE
    sc_embeds: torch.Tensor | None  # [B, L, H] soft embeddings of the previous step (decoder only), None = zero

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, L, Hq, d], k/v [B, L, Hkv, d] of the new tokens -> [B, L, Hq, d]."""
        ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scale-1.0 attention with grouped KV heads. q [B, Lq, Hq, d]; k/v [B, Lk, Hkv, d]; mask [B, Lq, Lk] bool
    (None: every key visible)."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None], scale=1.0)
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.head_dim, self.kv_heads, self.heads = cfg.layer_head_dim(layer), cfg.layer_kv_heads(layer), \
            cfg.num_attention_heads
        h, d = cfg.hidden_size, self.head_dim
        self.q_proj = Linear(h, self.heads * d)
        self.k_proj = Linear(h, self.kv_heads * d)
        # Full layers share one projection for K and V (attention_k_eq_v): no v_proj tensor exists for them.
        self.v_proj = Linear(h, self.kv_heads * d) if self.sliding else None
        self.o_proj = Linear(self.heads * d, h)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)

    fused: torch.Tensor | None = None  # [(Hq + Hkv (+ Hkv)) * d, H]: q/k(/v) weights as one matrix (fast path)
    fused_norm: torch.Tensor | None = None  # [Hq + Hkv (+ Hkv), d]: q_norm, k_norm (and 1 for v) weights per head
    fused_scale: torch.Tensor | None = None  # [(Hq + Hkv (+ Hkv)) * d, 1]: FP8 weight scales of `fused` (fp8.py)

    def fuse(self) -> None:
        """One GEMM and one norm for q, k and v in the fast path (see `fuse_linears`); idempotent. FP8 layers
        (fp8.py) fuse their scales alongside."""
        state = self._fuse_state()
        if self.fused is not None and state == self._fused_state:
            return  # weights still views of `fused`, norm weights unchanged since `fused_norm` was built
        linears = [self.q_proj, self.k_proj] + ([self.v_proj] if self.v_proj is not None else [])
        self.fused = fuse_linears(linears)
        self.fused_scale = fuse_scales(linears)
        d = self.head_dim
        norms = [self.q_norm.weight.detach().expand(self.heads, d), self.k_norm.weight.detach().expand(self.kv_heads, d)]
        if self.v_proj is not None:
            norms.append(torch.ones(self.kv_heads, d, dtype=self.q_norm.weight.dtype, device=self.fused.device))
        self.fused_norm = torch.cat(norms)
        self._fused_state = self._fuse_state()

    _fused_state: tuple = ()

    def _fuse_state(self) -> tuple:
        """What `fuse` depends on: where the q weights live, and the norm weights' storage and in-place versions."""
        qn, kn = self.q_norm.weight, self.k_norm.weight
        return self.q_proj.weight.data_ptr(), qn.data_ptr(), qn._version, kn.data_ptr(), kn._version

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, H] -> q [T, Hq, d], k [T, Hkv, d], v [T, Hkv, d]."""
        t, d = x.shape[0], self.head_dim
        if self.fused is not None and not batch_invariant.enabled() and not torch.is_grad_enabled():
            # Fast path (inference only: `fused` is no parameter): one GEMM, one norm (per-head weights after it),
            # one RoPE over q and k together. Full layers have no v_proj: V is the scale-free norm of the raw K, i.e.
            # the normed K before its weight.
            hq, hkv = self.heads, self.kv_heads
            qkv = fused_linear(x, self.fused, self.fused_scale, self.q_proj.fp8_activations)
            normed = rms_norm(qkv.view(t, -1, d), None, self.q_norm.eps)
            qk = apply_rope_fused((normed * self.fused_norm)[:, :hq + hkv], cos, sin)
            v = normed[:, hq + hkv:] if self.v_proj is not None else normed[:, hq:]
            return qk[:, :hq], qk[:, hq:], v
        q = apply_rope(self.q_norm(self.q_proj(x).view(t, self.heads, d)), cos, sin)
        k_raw = self.k_proj(x).view(t, self.kv_heads, d)
        v = self.v_proj(x).view(t, self.kv_heads, d) if self.v_proj is not None else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        return q, k, self.v_norm(v)


def fuse_linears(linears: list[nn.Linear]) -> torch.Tensor:
    """Re-point the weights of `linears` (one input size) at consecutive row blocks of one new matrix, and return
    it: one GEMM then computes them all (the fast path, as vLLM's merged QKV and gate/up layers), while each module
    keeps its own parameter, a view, under its checkpoint name for the exact path and for saving. No extra memory
    once the old tensors are freed."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start:start + n], requires_grad=lin.weight.requires_grad)
        start += n
    return fused


class Layer(nn.Module):
    tp = None  # [parallel] parallel.TensorParallel when the layer is sharded (parallel.shard_model)

    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.index = index
        self.layer_type = cfg.layer_types[index]
        self.self_attn = SelfAttention(cfg, index)
        self.mlp = MLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                     "post_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(h, eps))
        # The checkpoint stores one scalar per mode (decoder under model.decoder, encoder under model.encoder).
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(self, x: torch.Tensor, segments: Sequence[Segment], cos: torch.Tensor, sin: torch.Tensor,
                is_decoder: torch.Tensor | bool) -> torch.Tensor:
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        outs, start = [], 0
        for seg in segments:
            b, n = seg.input_ids.shape
            end = start + b * n
            o = seg.attend(self.index, q[start:end].view(b, n, *q.shape[1:]), k[start:end].view(b, n, *k.shape[1:]),
                           v[start:end].view(b, n, *v.shape[1:]))
            outs.append(o.reshape(b * n, -1))
            start = end
        attn = outs[0] if len(outs) == 1 else torch.cat(outs)
        o = self.self_attn.o_proj(attn)
        if self.tp is not None:  # [parallel] sum the heads' partial outputs before the norm: one all-reduce
            o = self.tp.all_reduce(o)
        h = x + self.post_attention_layernorm(o)

        dense = self.mlp(self.pre_feedforward_layernorm(h))
        weights, idx = self.router(h)
        moe = self.experts(self.pre_feedforward_layernorm_2(h), weights, idx)
        if self.tp is not None:  # [parallel] each branch has its own norm next: both partials, one all-reduce
            dense, moe = self.tp.all_reduce_pair(dense, moe)
        out = h + self.post_feedforward_layernorm(self.post_feedforward_layernorm_1(dense)
                                                  + self.post_feedforward_layernorm_2(moe))
        if isinstance(is_decoder, bool):  # every row in one mode: no per-row select
            return out * (self.layer_scalar if is_decoder else self.encoder_layer_scalar)
        return out * torch.where(is_decoder, self.layer_scalar, self.encoder_layer_scalar)


class SelfConditioning(MLP):
    """Decoder-only input block: post_norm(embed(canvas) + MLP(pre_norm(soft embedding of the last step))).

    The MLP is the same GeGLU block as the dense one (its gate/up/down weights sit directly under
    `self_conditioning.` in the checkpoint), with a pre-norm and a scale-free post-norm around it."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg.hidden_size, cfg.intermediate_size)
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        # A zero signal gives an MLP output of exactly zero, so the first step skips the MLP; the post-norm always runs.
        if soft is not None:
            embeds = embeds + super().forward(self.pre_norm(soft))
        return self.post_norm(embeds)


class DiffusionGemma(nn.Module):
    """The text model. Parameter names equal the checkpoint's, less the `model.decoder.` prefix."""

    tp = None  # [parallel] parallel.TensorParallel when the model is sharded (parallel.shard_model)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        t = self.text = config.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(Layer(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_conditioning = SelfConditioning(t)
        self.vision = None  # [vision] the image tower (vision.Vision) when the checkpoint has one; set by checkpoint.load
        self.cache_config = t  # [parallel] the attention geometry of this rank's KV cache (its heads under TP)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)build the RoPE inverse-frequency buffers on the CPU, e.g. after building the model on `meta`."""
        t = self.text
        for lt in (SLIDING, FULL):
            if lt in t.layer_types:
                dim = t.head_dim if lt == SLIDING else t.global_head_dim
                self.register_buffer(f"inv_freq_{lt}", inv_frequencies(t.rope[lt], dim), persistent=False)
        # Both layer types' tables in one pass per forward: [-inv_s, inv_s, -inv_f, inv_f] (rotate-half's signs).
        self._rope_dims = [(lt, 2 * getattr(self, f"inv_freq_{lt}").numel()) for lt in (SLIDING, FULL)
                           if hasattr(self, f"inv_freq_{lt}")]
        inv = [getattr(self, f"inv_freq_{lt}") for lt, _ in self._rope_dims]
        self.register_buffer("inv_freq_signed", torch.cat([torch.cat([-f, f]) for f in inv]), persistent=False)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and the dense gate/up weights for the fast path (idempotent, cheap to call again; redone
        after a device or dtype move replaced the parameters)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self.self_conditioning.fuse()

    def _apply(self, fn, recurse=True):
        """Module casts (`.to(bfloat16)`, `.half()`) leave the RoPE frequencies in fp32, as transformers does (bf16
        would shift positions by up to 0.4%); device moves still carry them along."""
        kept = {n: b for n, b in self._buffers.items() if n.startswith("inv_freq_")}
        super()._apply(fn, recurse)
        for n, b in kept.items():
            moved = self._buffers[n]
            if moved.dtype != b.dtype:
                self._buffers[n] = torch.empty_like(b, device=moved.device) if b.is_meta else b.to(moved.device)
        return self

    # -- embeddings and head -------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def _scale(self) -> torch.Tensor:
        # The reference multiplies by the scale cast to the weight dtype (53.0, not 53.07, in bf16).
        return torch.tensor(self.text.embed_scale, dtype=self.dtype, device=self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:  # [parallel] vocabulary-parallel lookup
            return self.tp.embed(ids, self.embed_tokens.weight, self.text.vocab_size) * self._scale()
        return self.embed_tokens(ids) * self._scale()

    def soft_embed(self, scaled_logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning signal: softmax(scaled logits) @ embedding * scale, [..., V] -> [..., H]."""
        probs = torch.softmax(scaled_logits, dim=-1, dtype=torch.float32).to(self.dtype)
        return linear(probs, self.embed_tokens.weight.t()) * self._scale()

    def logits(self, hidden: torch.Tensor, row_chunks: bool = True) -> torch.Tensor:
        """Tied LM head, fp32, soft-capped: cap * tanh(logits / cap).

        At inference the soft-cap runs in place on the fresh product. With `row_chunks` (the CPU's exact path) it
        goes a few cache-sized rows at a time (the same ops and values, no [*, V] temporaries streamed through
        memory); without, it is three whole-slab kernels (the fast path: no Python loop at a 262k vocabulary)."""
        if self.tp is not None and not torch.is_grad_enabled():  # [parallel] this rank's columns, gathered in the
            # weight dtype (half the bytes of fp32 in bf16; the upcast and the cap are per element: the same values)
            out = self.tp.gather_vocab(linear(hidden, self.embed_tokens.weight), self.text.vocab_size)
            return self._cap(out.float(), row_chunks)
        return self._cap(linear(hidden, self.embed_tokens.weight).float(), row_chunks)

    def _cap(self, out: torch.Tensor, row_chunks: bool) -> torch.Tensor:
        cap = self.text.final_logit_softcapping
        if cap is None:
            return out
        if torch.is_grad_enabled() and out.requires_grad:
            return torch.tanh(out / cap) * cap
        if not row_chunks:
            return out.div_(cap).tanh_().mul_(cap)
        flat = out.view(-1, out.shape[-1])
        for rows in flat.split(max(1, (1 << 17) // flat.shape[-1])):
            rows.div_(cap).tanh_().mul_(cap)
        return out

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, segments: Sequence[Segment]) -> list[torch.Tensor]:
        """Run every segment through the stack; returns the final-normed hidden states [B, L, H] per segment."""
        xs, pos = [], []
        for seg in segments:
            x = self.embed(seg.input_ids)
            images = getattr(seg, "image_embeds", None)  # [vision] (flat row index [N], soft tokens [N, H])
            if images is not None:
                x = x.reshape(-1, x.shape[-1]).index_copy(0, images[0], images[1].to(x.dtype)).view_as(x)
            if not seg.causal:
                x = self.self_conditioning(x, seg.sc_embeds)
            xs.append(x.reshape(-1, x.shape[-1]))
            pos.append(seg.positions.reshape(-1))
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        positions = torch.cat(pos) if len(pos) > 1 else pos[0]
        modes = {not seg.causal for seg in segments}
        if len(modes) == 1:
            is_decoder = modes.pop()  # one mode: a Python bool, no per-row select
        else:
            is_decoder = torch.cat([torch.full((seg.input_ids.numel(), 1), not seg.causal, device=x.device)
                                    for seg in segments])
        rope = rope_tables(self.inv_freq_signed, self._rope_dims, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, segments, *rope[layer.layer_type], is_decoder)
        x = self.norm(x)
        out, start = [], 0
        for seg in segments:
            b, n = seg.input_ids.shape
            out.append(x[start:start + b * n].view(b, n, -1))
            start += b * n
        return out

    # -- initialisation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fresh weights for training from scratch: normal(0, std) matrices, norms and scales at one."""
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std, generator=generator)
            else:
                p.fill_(1.0)
        for name, b in self.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(1.0)
