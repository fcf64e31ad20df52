"""A request's images inside its prompt: where their soft tokens go, and how the prefill puts them there.

An image occupies `<boi> <image> * n <eoi>` in the prompt. During the prefill the encoder's input rows at the
`<image>` tokens are replaced by the image's soft tokens (vision tower + multimodal embedder), and the tokens of one
image attend to each other bidirectionally, in every layer (what transformers' DiffusionGemma does with
`use_bidirectional_attention="vision"`). Everything after the prefill (the decoder, the canvas, commits) is text.

The engine's hooks are three calls, each marked `[vision]`:
- `PromptImages.build(...)` when a request is added;
- `chunk_end(...)` so that a prefill chunk never cuts an image in two (its bidirectional block must be in one
  forward);
- `attach(...)` on the prefill segment: runs the vision tower once per request (batched over the requests that
  need it in this step) and sets the segment's `image_embeds` / `image_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .image_processing import ProcessedImage


@dataclass
class PromptImages:
    pixel_values: torch.Tensor | None  # [N, P, 3*p*p] float32: N images, P = max_patches (None once encoded)
    positions: torch.Tensor | None  # [N, P, 2] long patch positions, (-1, -1) for padding (None once encoded)
    token_index: torch.Tensor  # [T] long: prompt indices of the image tokens, image after image
    blocks: torch.Tensor  # [prompt length] long: image number of each prompt token, -1 for text
    counts: list[int]  # soft tokens per image
    digests: list[str] = field(default_factory=list)  # sha256 of each image's pixels (cache keys)
    embeds: torch.Tensor | None = None  # [T, H] soft tokens, filled by the first prefill step

    @classmethod
    def build(cls, prompt: list[int], images: list[ProcessedImage], image_token_id: int) -> "PromptImages":
        """Check that the prompt holds one contiguous run of `count` image tokens per image, in order."""
        ids = torch.as_tensor(prompt, dtype=torch.long)
        is_img = ids == image_token_id
        starts = (is_img & ~torch.cat([torch.zeros(1, dtype=torch.bool), is_img[:-1]])).nonzero().flatten()
        ends = (is_img & ~torch.cat([is_img[1:], torch.zeros(1, dtype=torch.bool)])).nonzero().flatten() + 1
        runs = (ends - starts).tolist()
        counts = [im.num_soft_tokens for im in images]
        if runs != counts:
            raise ValueError(f"the prompt's image-token runs {runs} do not match the images' soft-token counts "
                             f"{counts} (expand each image placeholder with image_processing.expand_image_tokens)")
        blocks = torch.full((len(prompt),), -1, dtype=torch.long)
        for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            blocks[a:b] = i
        return cls(torch.stack([im.pixel_values for im in images]), torch.stack([im.positions for im in images]),
                   is_img.nonzero().flatten(), blocks, counts, [im.digest for im in images])


def check(model, prompt: list[int], images: PromptImages | None) -> None:
    """A request's images must match its prompt, and the model must be able to read them."""
    if images is None:
        return
    if model.vision is None:
        raise ValueError("this model has no vision tower: it cannot read images")
    if len(images.blocks) != len(prompt) or (images.token_index.numel() and
                                             int(images.token_index.max()) >= len(prompt)):
        raise ValueError("the images were built for another prompt (PromptImages.build(prompt, ...))")
    if any(prompt[i] != model.vision.cfg.image_token_id for i in images.token_index.tolist()):
        raise ValueError(f"the images' soft tokens must sit on image tokens ({model.vision.cfg.image_token_id}) "
                         "of the prompt")


def chunk_end(images: PromptImages | None, start: int, chunk: int, length: int) -> int:
    """End of the prefill chunk that begins at `start`: `start + chunk`, moved back to the start of an image it
    would cut (or, when the image begins the chunk, on to its end)."""
    end = min(start + chunk, length)
    if images is None or end >= length:
        return end
    b = int(images.blocks[end])
    if b < 0 or int(images.blocks[end - 1]) != b:
        return end
    first = int((images.blocks == b).nonzero()[0])
    return first if first > start else int((images.blocks == b).nonzero()[-1]) + 1


IMAGES_PER_CALL = 8  # images per vision-tower call: bounds its activations (see server/memory.py)


@torch.no_grad()
def encode(vision, requests: list[PromptImages]) -> None:
    """Fill `embeds` of every request that lacks them: their images go through the tower together, at most
    IMAGES_PER_CALL at a time (an image's result does not depend on its batch mates)."""
    todo = [r for r in requests if r.embeds is None]
    if not todo:
        return
    dev = next(vision.parameters()).device
    pv = torch.cat([r.pixel_values for r in todo])
    pos = torch.cat([r.positions for r in todo])
    feats = []
    for a in range(0, pv.shape[0], IMAGES_PER_CALL):
        feats += vision(pv[a:a + IMAGES_PER_CALL].to(dev), pos[a:a + IMAGES_PER_CALL].to(dev))
    i = 0
    for r in todo:
        n = len(r.counts)
        r.embeds = torch.cat(feats[i:i + n])
        r.pixel_values = r.positions = None  # not needed any more: free the patches (about 8 MB an image)
        i += n


def attach(segment, model, rows: list[tuple[PromptImages | None, int]]) -> None:
    """Give an encode segment its rows' soft tokens and image blocks. rows[b] = (images or None, prompt index of
    the row's first token); the segment's width is its input_ids' second dimension."""
    live = [(b, im, start) for b, (im, start) in enumerate(rows) if im is not None]
    if not live:
        return
    if model.vision is None:
        raise ValueError("this model has no vision tower: it cannot read images")
    encode(model.vision, [im for _, im, _ in live])
    width = segment.input_ids.shape[1]
    dev = segment.input_ids.device
    blocks = torch.full(segment.input_ids.shape, -1, dtype=torch.long)
    index, embeds = [], []
    for b, im, start in live:
        n = int(segment.n_new[b])
        blocks[b, :n] = im.blocks[start:start + n]
        sel = (im.token_index >= start) & (im.token_index < start + n)
        index.append(b * width + im.token_index[sel] - start)
        embeds.append(im.embeds[sel.to(im.embeds.device)])
    if model.vision.cfg.bidirectional_images:
        segment.image_blocks = blocks.to(dev)
    if sum(len(i) for i in index):
        segment.image_embeds = (torch.cat(index).to(dev), torch.cat(embeds).to(dev))


def chat_inputs(tokenizer, vision, messages: list[dict], resolve=None, **template_kwargs):
    """Render a chat with image parts: (prompt ids with each image expanded to its soft-token run, PromptImages or
    None). `resolve(source) -> PIL image` turns an image part's source into pixels (default: offline
    image_processing.open_source); images need a model with a vision tower."""
    from . import image_processing as ip

    msgs, sources = ip.split_chat_images(messages)
    if sources and vision is None:
        raise ValueError("this model has no vision tower: it cannot read images (text-only checkpoint)")
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **template_kwargs)
    if not sources:
        return ids, None
    cfg = vision.cfg
    proc = ip.ImageProcessorConfig(cfg.patch_size, cfg.pooling_kernel_size, cfg.soft_tokens_per_image)
    processed = [ip.preprocess((resolve or ip.open_source)(s), proc) for s in sources]
    counts = [p.num_soft_tokens for p in processed]
    ids = ip.expand_image_tokens(ids, counts, cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id)
    return ids, PromptImages.build(ids, processed, cfg.image_token_id)
