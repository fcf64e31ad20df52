"""Images in chat requests: where the server may read them from, and a 400 that says what is wrong with a bad one.

An OpenAI content part `{"type": "image_url", "image_url": {"url": ...}}` may point at
- `data:image/...;base64,...`: always accepted (the normal way to send an image);
- `file:///...`: only under `--allowed-local-media-path` (as in vLLM), after resolving links, else refused;
- `http(s)://...`: refused unless `--allow-remote-media` (a server has no network by default), then fetched with a
  timeout and a size cap.

Every failure becomes a `RequestError` (400) with a code: `invalid_image` (corrupt or not an image),
`unsupported_image_format`, `too_many_images`, `image_too_large`, `image_url_not_allowed`, `images_not_supported`
(the model is text-only, or served with `--language-model-only`). The checks run before anything reaches the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .protocol import RequestError


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: str | None = None  # file:// URLs only below this folder; None: no local files
    allow_remote_media: bool = False  # fetch http(s) image URLs
    max_images_per_request: int = 8
    max_image_pixels: int = 50_000_000  # width x height before decoding (decompression bombs)
    max_image_bytes: int = 20 * 2**20  # a fetched or local file larger than this is refused
    fetch_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_images_per_request", "max_image_pixels", "max_image_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"--allowed-local-media-path {self.allowed_local_media_path}: not a folder")


def _error(message: str, code: str, param: str = "messages") -> RequestError:
    return RequestError(message, param=param, code=code)


def _code(message: str) -> str:
    if "unsupported image format" in message or "is not an image" in message:
        return "unsupported_image_format"
    if "over the limit" in message or "too many pixels" in message or "bytes, over" in message:
        return "image_too_large"
    return "invalid_image"


def resolver(policy: MediaPolicy):
    """source (a URL string from an image_url part) -> PIL image, under the policy. Raises ImageError."""
    from ..image_processing import ImageError, decode_data_url, load_image

    def resolve(source):
        if not isinstance(source, str):
            raise ImageError("image_url.url must be a string")
        if source.startswith("data:"):
            return load_image(decode_data_url(source), policy.max_image_pixels)
        if source.startswith(("http://", "https://")):
            if not policy.allow_remote_media:
                raise PermissionError("remote image URLs are disabled on this server (start it with "
                                      "--allow-remote-media); send the image as a data: URL")
            return load_image(_fetch(source, policy), policy.max_image_pixels)
        if source.startswith("file://"):
            return load_image(_local(source[len("file://"):], policy), policy.max_image_pixels)
        raise ImageError("image_url.url must be a data:, file:// or http(s):// URL")

    return resolve


def _local(path: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_media_path is None:
        raise PermissionError("local image files are disabled on this server (start it with "
                              "--allowed-local-media-path DIR)")
    root = Path(os.path.realpath(policy.allowed_local_media_path))
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise PermissionError(f"file:// URLs must point inside the allowed media folder {root}")
    from ..image_processing import ImageError

    if not real.is_file():
        raise ImageError(f"{path}: no such image file")
    if real.stat().st_size > policy.max_image_bytes:
        raise ImageError(f"{path}: {real.stat().st_size} bytes, over the limit of {policy.max_image_bytes}")
    return real.read_bytes()


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    import urllib.request

    from ..image_processing import ImageError

    try:
        with urllib.request.urlopen(url, timeout=policy.fetch_timeout_s) as r:  # noqa: S310 (scheme checked)
            data = r.read(policy.max_image_bytes + 1)
    except Exception as e:
        raise ImageError(f"cannot fetch {url} ({type(e).__name__})") from None
    if len(data) > policy.max_image_bytes:
        raise ImageError(f"{url}: more than {policy.max_image_bytes} bytes, over the limit")
    return data


def image_parts(messages: list[dict]) -> list[tuple[int, int]]:
    """(message index, part index) of every image part, in prompt order."""
    return [(i, j) for i, m in enumerate(messages) if isinstance(m.get("content"), list)
            for j, p in enumerate(m["content"]) if isinstance(p, dict) and p.get("type") in ("image", "image_url")]


def chat_inputs(llm, messages: list[dict], policy: MediaPolicy, **template_kwargs):
    """(prompt ids, PromptImages or None) of a chat request, or a RequestError (400) naming what is wrong and
    where (`param` = messages.I.content of the offending image)."""
    from ..image_processing import ImageError

    where = image_parts(messages)
    if where and llm.model.vision is None:
        why = ("this server was started with --language-model-only (the vision tower is not loaded)"
               if getattr(llm, "language_model_only", False) else
               "this model is text-only (its checkpoint has no vision tower)")
        raise _error(f"{why}: image parts are not supported", "images_not_supported",
                     f"messages.{where[0][0]}.content")
    if len(where) > policy.max_images_per_request:
        raise _error(f"{len(where)} images in one request; this server accepts at most "
                     f"{policy.max_images_per_request}", "too_many_images", "messages")
    resolve, done = resolver(policy), []

    def counted(source):
        done.append(source)
        return resolve(source)

    try:
        return llm.chat_inputs(messages, resolve=counted, **template_kwargs)
    except (PermissionError, ImageError) as e:
        i, j = where[len(done) - 1] if done else (0, 0)
        code = "image_url_not_allowed" if isinstance(e, PermissionError) else _code(str(e))
        raise _error(f"messages[{i}].content[{j}]: {e}", code, f"messages.{i}.content") from None
    except Exception as e:  # template errors (e.g. roles must alternate) are the client's to fix
        raise RequestError(f"chat template: {e}", param="messages") from None
