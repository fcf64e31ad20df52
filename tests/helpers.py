"""Test helpers: tiny random DiffusionGemma checkpoints made with transformers (the oracle), no network."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

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
                  sc_gain: float = 1.0, **text_overrides):
    """A random transformers DiffusionGemmaForBlockDiffusion in fp32, with non-trivial norms and scalars.

    `sc_gain` scales the self-conditioning output projection. At 1.0 the random self-conditioning loop amplifies
    last-bit differences about 5x per denoising step (chaotic), so multi-step generation tests use 0.1: any two
    correct implementations then agree to ~1e-5 and produce the same tokens.
    """
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
        model.model.decoder.self_conditioning.down_proj.weight.mul_(sc_gain)
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


SAMPLE_TEXT = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
"""


def make_tiny_checkpoint(path: Path, canvas_length: int = 16, seed: int = 0, num_hidden_layers: int = 2,
                         hidden_size: int = 64, max_position_embeddings: int = 2048) -> Path:
    """A random-weight dgemma checkpoint with a small byte-level BPE tokenizer and chat template (no transformers).

    Made with dgemma itself, so it is fast: use it where the oracle is not the point (engine, CLI, server).
    """
    from dgemma import checkpoint
    from dgemma.config import ModelConfig
    from dgemma.model import DiffusionGemma
    from dgemma.tokenizer_train import save_tokenizer_dir, train_bpe_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 4)
    tok = train_bpe_tokenizer([corpus], vocab_size=320)
    corpus.unlink()
    layer_types = ["sliding_attention"] * (num_hidden_layers - 1) + ["full_attention"]
    text = tiny_text_config(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size,
                            num_hidden_layers=num_hidden_layers, layer_types=layer_types,
                            max_position_embeddings=max_position_embeddings)
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas_length,
                                 "text_config": text, "eos_token_id": [1, 6]})
    model = DiffusionGemma(cfg)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
    checkpoint.save(model, path)
    save_tokenizer_dir(tok, path)
    return path


def read_all(path: Path) -> dict:
    """Every tensor of a checkpoint folder's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# MARK: generation parity

GEN_CANVAS, GEN_STEPS = 8, 10  # the generation parity model's canvas and step cap
GEN_KNOBS = dict(max_denoising_steps=GEN_STEPS, t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.05)


def generation_models(tmp_path_factory, name: str):
    """(transformers model, dgemma model) of the generation parity tests: canvas 8, a weak self-conditioning gain
    (so that two correct implementations agree to ~1e-5 over many steps and produce the same tokens)."""
    from dgemma import checkpoint

    hf = make_hf_model(canvas_length=GEN_CANVAS, seed=5, sc_gain=0.1)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return hf, checkpoint.load(path).model


# MARK: replaying dgemma's random draws into transformers' generate


def hf_replay(monkeypatch, draws, rows: int, C: int):
    """transformers' generate consuming dgemma's draws (see dgemma.hf_oracle.replay_draws)."""
    from dgemma.hf_oracle import replay_draws

    return replay_draws(draws, rows, C)


def fast_engine(llm, max_num_seqs: int = 4):
    """A fast-mode (batch_invariant=False) engine over an LLM's model, tokenizer and defaults."""
    from dgemma.engine import Engine, EngineConfig
    e = llm.engine
    return Engine(llm.model, eos_token_ids=sorted(e.eos_ids), pad_token_id=e.pad_id, defaults=e.defaults,
                  tokenizer=llm.tokenizer, config=EngineConfig(max_num_seqs=max_num_seqs, batch_invariant=False))
