"""Pictures of diffusion: render a denoising trace as an animated GIF (or PNG frames).

Each frame is one denoising step: the canvas as a grid of cells, one token per cell, accepted tokens on green,
renoised positions (noise) on grey. Used by `dgemma generate --trace-out FILE.gif`.
"""

from __future__ import annotations

from pathlib import Path

from .outputs import StepTrace

CELL_W, CELL_H, COLS, PAD = 72, 22, 8, 8


def _label(tokenizer, tid: int) -> str:
    s = tokenizer.decode([tid], skip_special_tokens=False) if tokenizer is not None else str(tid)
    s = "".join(c if c.isprintable() else "·" for c in s.replace("\n", "\\n")).replace("\ufffd", "?")
    return (s[:9] + "…") if len(s) > 10 else s


def render_trace(trace: list[StepTrace], tokenizer, out: Path, prompt: str = "") -> Path:
    """Write the trace to `out`: an animated GIF if it ends in .gif, else a folder of numbered PNG frames."""
    from PIL import Image, ImageDraw, ImageFont

    if not trace:
        raise ValueError("no trace to render (the request ran no denoising step)")
    font = ImageFont.load_default()
    n = len(trace[0].argmax)
    rows = (n + COLS - 1) // COLS
    width, height = COLS * CELL_W + 2 * PAD, rows * CELL_H + 2 * PAD + 24
    frames = []
    for t in trace:
        img = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(img)
        d.text((PAD, 4), f"canvas {t.canvas_index + 1}  step {t.step}  accepted {sum(t.accepted)}/{n}  "
                         f"mean entropy {t.mean_entropy:.3f}", fill="black", font=font)
        for i, (tid, ok) in enumerate(zip(t.argmax, t.accepted)):
            x, y = PAD + (i % COLS) * CELL_W, PAD + 24 + (i // COLS) * CELL_H
            d.rectangle([x + 1, y + 1, x + CELL_W - 2, y + CELL_H - 2], fill="#8fd694" if ok else "#e6e6e6",
                        outline="#999999")
            d.text((x + 4, y + 5), _label(tokenizer, tid), fill="black" if ok else "#888888", font=font)
        frames.append(img)
    out = Path(out)
    if out.suffix.lower() == ".gif":
        out.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(out, save_all=True, append_images=frames[1:], duration=250, loop=0)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            f.save(out / f"step_{i:04d}.png")
    return out
