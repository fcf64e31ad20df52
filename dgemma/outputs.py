"""What generation returns: finished outputs, stream events and per-step traces."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CanvasStats:
    steps: int  # decoder forwards spent on this canvas
    tokens: int  # tokens this canvas contributed to the output


@dataclass
class StepTrace:
    """One denoising step of one canvas: the argmax canvas and which positions the sampler accepted."""

    canvas_index: int
    step: int
    argmax: list[int]
    accepted: list[bool]
    mean_entropy: float
    # [constrained] requests only: positions pinned by a template, and how many tokens the constraint allowed at each
    # position on this step (1: forced; the vocabulary size: unconstrained)
    pinned: list[bool] | None = None
    allowed: list[int] | None = None


@dataclass(frozen=True)
class Failure:
    """Why a request ended with finish_reason "error". A failure of the request's own work ends it alone (its batch
    mates run on unaffected); a failed engine step ends every request in flight (the server's engine loop).

    kind "constraint": its constraint could not be met mid-generation (a dead end: the matcher allows no token, or a
    template's pinned token is refused); retrying the same request and seed fails the same way.
    kind "internal": an unexpected error (e.g. in its detokenizer; a bug, logged with its traceback)."""

    kind: str
    message: str


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "abort", "error" (see `error`)
    error: Failure | None = None  # finish_reason "error": what failed; the output so far is kept
    canvases: list[CanvasStats] = field(default_factory=list)
    decoder_forwards: int = 0
    trace: list[StepTrace] = field(default_factory=list)

    @property
    def steps_per_canvas(self) -> list[int]:
        return [c.steps for c in self.canvases]

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / self.decoder_forwards if self.decoder_forwards else 0.0


@dataclass
class StreamEvent:
    """Emitted by the engine as a request progresses.

    kind "admitted": the request left the queue and got a slot (it runs from the next forward on).
    kind "draft": one denoising step (argmax canvas + accepted mask; only for requests that asked for drafts).
    kind "commit": a canvas was committed; `text_delta` / `token_ids_delta` are the new output.
    kind "finished": the request ended (`output` holds the final result; finish_reason "error": `output.error`).
    kind "error": the server's engine loop failed the request (`text_delta` holds the message; server/async_engine.py).
    """

    request_id: str
    kind: str
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    draft: StepTrace | None = None
    output: RequestOutput | None = None
