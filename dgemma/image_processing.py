"""Images to model inputs, as transformers' Gemma-4 image processor prepares them (decoding and resizing by Pillow).

For one image:
1. decode (Pillow) and convert to RGB, compositing any transparency onto white;
2. resize, keeping the aspect ratio, to the largest size whose sides are multiples of `pooling_kernel * patch`
   and whose patch count fits the budget `max_soft_tokens * pooling_kernel^2` (bicubic, on 8-bit pixels);
3. rescale to [0, 1] (no mean/std normalisation: the patch embedder maps to [-1, 1] itself);
4. cut into patch_size x patch_size patches, row by row, each flattened as (row, column, channel);
5. record each patch's (x, y) grid position and pad to the budget with zero pixels at position (-1, -1).

Its soft-token count is patches / pooling_kernel^2. In the prompt an image becomes
`<boi> <image> * count <eoi>`; see `expand_image_tokens`.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what dgemma decodes; anything else is refused
MAX_PIXELS = 50_000_000  # refuse larger pictures before decoding them (decompression bombs)


class ImageError(ValueError):
    """An image that cannot be used: corrupt data, an unsupported format, or too many pixels."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280

    def __post_init__(self) -> None:
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {self.max_soft_tokens}")
        if self.patch_size < 1 or self.pooling_kernel_size < 1:
            raise ValueError("patch_size and pooling_kernel_size must be positive")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [max_patches, 3 * patch^2] float32 in [0, 1], zero rows for padding
    positions: torch.Tensor  # [max_patches, 2] long (x, y) patch positions, (-1, -1) for padding
    num_soft_tokens: int
    size: tuple[int, int]  # (height, width) after resizing
    digest: str  # sha256 of the processed pixels: identical pictures get identical digests


def target_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """The resized (height, width): the aspect ratio kept as far as the side multiple allows, within the budget."""
    side = cfg.pooling_kernel_size * cfg.patch_size
    budget_px = cfg.max_patches * cfg.patch_size ** 2
    scale = math.sqrt(budget_px / (height * width))
    h = int(math.floor(scale * height / side)) * side
    w = int(math.floor(scale * width / side)) * side
    if h == 0 and w == 0:
        raise ImageError(f"a {height}x{width} image cannot be resized to a multiple of {side} pixels")
    longest = (cfg.max_patches // cfg.pooling_kernel_size ** 2) * side
    if h == 0:  # very wide: one cell high, as wide as the aspect ratio (whole cells) and the budget allow
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    if h * w > budget_px:
        raise ImageError(f"resizing {height}x{width} to {h}x{w} exceeds the {cfg.max_patches}-patch budget")
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto a white background."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, cfg: ImageProcessorConfig = ImageProcessorConfig()) -> ProcessedImage:
    image = to_rgb(image)
    w0, h0 = image.size
    h, w = target_size(h0, w0, cfg)
    if (h, w) != (h0, w0):
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # [h, w, 3]
    p = cfg.patch_size
    ph, pw = h // p, w // p
    patches = pixels.reshape(ph, p, pw, p, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, p * p * 3)
    ys, xs = np.divmod(np.arange(ph * pw), pw)
    pv = torch.zeros(cfg.max_patches, p * p * 3, dtype=torch.float32)
    pos = torch.full((cfg.max_patches, 2), -1, dtype=torch.long)
    pv[:ph * pw] = torch.from_numpy(np.ascontiguousarray(patches))
    pos[:ph * pw, 0] = torch.from_numpy(xs)
    pos[:ph * pw, 1] = torch.from_numpy(ys)
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes() + f"{h}x{w}".encode()).hexdigest()
    return ProcessedImage(pv, pos, ph * pw // cfg.pooling_kernel_size ** 2, (h, w), digest)


# MARK: decoding


def load_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A PIL image from a PIL image, raw bytes, or a file path; decoded fully here so corrupt data fails now."""
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = io.BytesIO(bytes(source))
            what = "image data"
        elif isinstance(source, (str, Path)):
            path = Path(source).expanduser()
            if not path.is_file():
                raise ImageError(f"{path}: no such image file")
            data, what = path, str(path)
        else:
            raise ImageError(f"an image must be a PIL image, bytes or a path, got {type(source).__name__}")
        try:
            img = Image.open(data, formats=None)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{what}: too many pixels ({e})") from None
        except Exception:
            raise ImageError(f"{what}: not a decodable image (corrupt data or an unknown format)") from None
        if img.format not in FORMATS:
            raise ImageError(f"{what}: unsupported image format {img.format}; supported: {', '.join(FORMATS)}")
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image of {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise ImageError(f"image of {w}x{h} pixels is empty")
    if not isinstance(source, Image.Image):
        try:
            img.load()
        except Exception as e:
            raise ImageError(f"image data is corrupt or truncated ({type(e).__name__})") from None
    return img


# MARK: prompt tokens


def expand_image_tokens(ids: list[int], counts: list[int], image_token_id: int, boi_token_id: int,
                        eoi_token_id: int) -> list[int]:
    """Replace the i-th `image_token_id` placeholder by `boi + image * counts[i] + eoi` (what the chat template
    emits for an image part is one placeholder; the processor expands it, as transformers' Gemma4Processor does)."""
    n = sum(1 for t in ids if t == image_token_id)
    if n != len(counts):
        raise ValueError(f"the prompt has {n} image placeholder(s) (token {image_token_id}) but {len(counts)} "
                         "image(s) were given")
    out, it = [], iter(counts)
    for t in ids:
        if t == image_token_id:
            out += [boi_token_id] + [image_token_id] * next(it) + [eoi_token_id]
        else:
            out.append(t)
    return out


# MARK: chat messages


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    import base64
    import binascii

    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ImageError("a data URL must look like data:image/png;base64,<data>")
    if not head[5:].startswith("image/"):
        raise ImageError(f"data URL media type {head[5:-7]!r} is not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data URL: invalid base64") from None


def image_source(part: dict):
    """What an image content part points at: {"type": "image", "image": PIL/bytes/path} (also "url"/"path"), or
    OpenAI's {"type": "image_url", "image_url": {"url": ...}}. Returns the PIL image, bytes, path or URL string."""
    if part.get("type") == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise ImageError("an image_url part needs image_url.url")
        return url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    raise ImageError("an image part needs 'image' (a PIL image, bytes or a path), 'url' or 'path'")


def split_chat_images(messages: list[dict]) -> tuple[list[dict], list]:
    """Messages for the chat template (each image part becomes {"type": "image"}) and the image sources in order."""
    out, sources = [], []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                                             for p in content):
            parts = []
            for p in content:
                if isinstance(p, dict) and p.get("type") in ("image", "image_url"):
                    sources.append(image_source(p))
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out, sources


def open_source(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Offline resolution of an image source: PIL, bytes, a path, `data:` or `file://` URLs; never the network."""
    if isinstance(source, str):
        if source.startswith("data:"):
            return load_image(decode_data_url(source), max_pixels)
        if source.startswith(("http://", "https://")):
            raise ImageError("remote image URLs are not fetched offline: download the image and pass its bytes")
        if source.startswith("file://"):
            source = source[len("file://"):]
    return load_image(source, max_pixels)
