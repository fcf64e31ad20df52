"""Live terminal view of block diffusion (`dgemma generate --show-canvas`).

Shows the committed text, then the canvas being denoised: tokens the sampler accepted this step in bold green,
renoised positions (random tokens) dimmed, with the canvas number, the step, and the tokens/s so far.
"""

from __future__ import annotations

import time
from typing import Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from .outputs import RequestOutput, StreamEvent


def _piece(tokenizer, token_id: int) -> str:
    s = tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else f"<{token_id}>"
    s = s.replace("\n", "⏎").replace("\ufffd", "·")
    return "".join(c if c.isprintable() else "·" for c in s) or "·"


class LiveCanvas:
    def __init__(self, tokenizer, canvas_length: int, prompt_text: str = "", console: Console | None = None):
        self.tok, self.C, self.prompt = tokenizer, canvas_length, prompt_text
        self.console = console or Console(stderr=False)

    def _render(self, committed: str, draft, stats: str) -> Group:
        parts = [Text(self.prompt, style="bold"), Text(committed)]
        body = Text()
        if draft is not None:
            for tid, ok in zip(draft.argmax, draft.accepted):
                body.append(_piece(self.tok, tid), style="bold green" if ok else "dim")
        return Group(Text.assemble(*parts), Panel(body, title=stats, title_align="left", border_style="cyan"))

    def run(self, events: Iterable[StreamEvent]) -> RequestOutput:
        committed, t0, tokens, out = "", time.perf_counter(), 0, None
        with Live(self._render("", None, "canvas 1 · waiting"), console=self.console, refresh_per_second=20,
                  transient=False) as live:
            for ev in events:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                if ev.kind == "draft":
                    d = ev.draft
                    stats = (f"canvas {d.canvas_index + 1} · step {d.step} · accepted {sum(d.accepted)}/{self.C}"
                             f" · {tokens / elapsed:.0f} tok/s")
                    live.update(self._render(committed, d, stats))
                elif ev.kind in ("commit", "finished"):
                    committed += ev.text_delta
                    tokens += len(ev.token_ids_delta)
                    if ev.kind == "finished":
                        out = ev.output
                    live.update(self._render(committed, None, f"{tokens} tokens · {tokens / elapsed:.0f} tok/s"))
        if out is not None:
            self.console.print(f"[dim]{len(out.token_ids)} tokens · steps per canvas {out.steps_per_canvas} · "
                               f"{out.tokens_per_forward:.2f} tokens/forward · "
                               f"{len(out.token_ids) / max(time.perf_counter() - t0, 1e-9):.0f} tok/s[/dim]")
        return out
