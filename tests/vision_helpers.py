"""Test helpers for images: tiny random vision-language checkpoints made with transformers, and test pictures."""

from __future__ import annotations

import numpy as np
import torch
from helpers import make_hf_model
from PIL import Image

# Image-token ids inside the tiny text vocabulary (96): image, begin-of-image, end-of-image.
IMAGE, BOI, EOI = 90, 91, 92

# A small but complete vision tower: GQA (4 heads over 2 KV heads), two layers, standardisation on, 4-pixel patches.
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=3,
                   position_embedding_size=256, standardize=True)
MAX_SOFT_TOKENS = 70  # the smallest budget transformers' processor accepts: 630 patches of 4x4 pixels


def make_hf_vlm(canvas_length: int = 8, seed: int = 0, vision: dict | None = None, sc_gain: float = 1.0,
                image_ids: tuple[int, int, int] = (IMAGE, BOI, EOI), **text_overrides):
    """make_hf_model with a random non-trivial vision tower and image-token ids (image, boi, eoi) in the vocabulary."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    base = make_hf_model(canvas_length=canvas_length, seed=seed, sc_gain=sc_gain, **text_overrides)
    cfg = DiffusionGemmaConfig(text_config=base.config.text_config.to_dict(), vision_config=dict(vision or TINY_VISION),
                               canvas_length=canvas_length, image_token_id=image_ids[0], boi_token_id=image_ids[1],
                               eoi_token_id=image_ids[2], vision_soft_tokens_per_image=MAX_SOFT_TOKENS)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    model.load_state_dict({k: v for k, v in base.state_dict().items() if "vision" not in k}, strict=False)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if p.ndim == 1
                        else 0.2 * torch.randn(p.shape, generator=g))
        vt = model.model.encoder.vision_tower
        if getattr(vt.config, "standardize", False):
            vt.std_bias.copy_(torch.randn(vt.std_bias.shape, generator=g))
            vt.std_scale.copy_(1.0 + 0.2 * torch.randn(vt.std_scale.shape, generator=g))
    for k, v in base.state_dict().items():
        if "vision" not in k:
            assert torch.equal(model.state_dict()[k], v), k
    return model


def picture(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random picture with some smooth structure (so resizing has something to interpolate)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 7 + yy * 3) % 256, (yy * 5) % 256, (xx * yy) % 256], -1)
    noise = rng.integers(0, 64, (h, w, 3))
    arr = ((base + noise) % 256).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        img = img.convert("RGBA")
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def hf_processor(**kw):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(**{"patch_size": 4, "max_soft_tokens": MAX_SOFT_TOKENS, "pooling_kernel_size": 3,
                                      **kw})


# The tiny tokenizer's chat template, printing the image token where a message has an image part (as Gemma 4's does).
VLM_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] | trim }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}{{- part['text'] | trim }}{%- elif part['type'] == 'image' %}{{- '<|image|>' }}{%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<turn|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|turn>model\\n' }}{%- endif %}
"""


def make_vlm_checkpoint(path, canvas_length: int = 8, seed: int = 0):
    """A tiny vision-language checkpoint with a byte-level BPE tokenizer whose special tokens <|image|>, <|image>,
    <image|> (ids 7, 8, 9) are the image, begin-of-image and end-of-image tokens."""
    from helpers import SAMPLE_TEXT

    from dgemma.tokenizer_train import save_tokenizer_dir, train_bpe_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 4)
    tok = train_bpe_tokenizer([corpus], vocab_size=320, special_tokens=["<|image|>", "<|image>", "<image|>"])
    corpus.unlink()
    hf = make_hf_vlm(canvas_length=canvas_length, seed=seed, sc_gain=0.1, image_ids=(7, 8, 9),
                     vocab_size=tok.get_vocab_size(), use_bidirectional_attention="vision")
    hf.save_pretrained(path)
    save_tokenizer_dir(tok, path, chat_template=VLM_CHAT_TEMPLATE)
    return path
