"""Test helpers: tiny random DiffusionGemma checkpoints made with transformers (the oracle), no network."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VISION = {
    "model_type": "gemma4_vision", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8, "patch_size": 16, "pooling_kernel_size": 3,
    "position_embedding_size": 16,
}


def tiny_text_config(**overrides) -> dict:
    d = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
             num_experts=4, top_k_experts=2, moe_intermediate_size=32, sliding_window=8,
             layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
             max_position_embeddings=1024)
    d.update(overrides)
    return d


def make_hf_model(canvas_length: int = 8, seed: int = 0, encoder_scalars=None, decoder_scalars=None,
                  perturb: bool = True, **text_overrides):
    """A random transformers DiffusionGemmaForBlockDiffusion in fp32, with non-trivial norms and scalars."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=tiny_text_config(**text_overrides), vision_config=dict(TINY_VISION),
                               canvas_length=canvas_length)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if p.ndim == 1:  # norms, router scales: move away from 1 so a dropped weight shows
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.normal_(0.0, 0.15, generator=g)
        n = cfg.text_config.num_hidden_layers
        enc = encoder_scalars or [0.9 - 0.1 * i for i in range(n)]
        dec = decoder_scalars or [1.1 + 0.05 * i for i in range(n)]
        for i in range(n):
            model.model.encoder.language_model.layers[i].layer_scalar.fill_(enc[i])
            model.model.decoder.layers[i].layer_scalar.fill_(dec[i])
    return model


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path
