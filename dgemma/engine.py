"""The block-autoregressive engine: many requests, one batched forward per step.

Each request moves through  prefill -> (denoise x k -> commit) x canvases -> finished.  One engine `step()` builds
at most two segments, an `EncodeSegment` for every row that prefills a prompt chunk or commits a finished canvas,
and a `DecodeSegment` for every row that denoises, and runs them in ONE model forward. Requests join and leave
between steps (continuous batching).

Hot-path state lives in slot-indexed tensors (canvas, previous argmax, stable run, steps left, self-conditioning
embeddings); per-request Python objects hold only what is per canvas (output ids, counters, the random generator).
Each request draws from its own `torch.Generator`, so its output depends on its prompt, parameters and seed only,
never on its batch mates. Logits are produced and sampled in row chunks so that at most a bounded slab of
[rows, canvas, vocab] fp32 exists at a time.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from . import batch_invariant, sampler
from .kv_cache import DecodeSegment, EncodeSegment, KVCache
from .model import DiffusionGemma
from .outputs import CanvasStats, RequestOutput, StepTrace, StreamEvent
from .sampling_params import DenoiseSettings, SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 8  # concurrent requests (KV cache slots)
    max_model_len: int = 4096  # prompt + output tokens per request
    prefill_chunk: int = 2048  # prompt tokens encoded per request per step
    logits_budget_bytes: int = 512 * 2**20  # fp32 [rows, canvas, vocab] slab sampled at once
    batch_invariant: bool = True  # a request's tokens never depend on its batch mates (see batch_invariant.py)
    keep_traces: bool = True  # False: "draft" events are emitted but not kept in RequestOutput.trace (servers)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "prefill_chunk", "logits_budget_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {getattr(self, name)!r}")


class PromptTooLongError(ValueError):
    pass


@dataclass
class Sequence:
    """Per-request bookkeeping (not on the hot path)."""

    id: str
    prompt: list[int]
    params: SamplingParams
    settings: DenoiseSettings
    generator: torch.Generator
    max_new_tokens: int
    stop_ids: frozenset[int]
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the KV cache
    pending_commit: list[int] | None = None  # canvas tokens to encode before the next canvas
    canvas_steps: int = 0
    out: RequestOutput = None  # type: ignore[assignment]
    decoder: object = None  # incremental detokenizer

    @property
    def denoising(self) -> bool:
        return self.prefilled == len(self.prompt) and self.pending_commit is None


class Engine:
    def __init__(self, model: DiffusionGemma, eos_token_ids=(), pad_token_id: int = 0, defaults=None,
                 tokenizer=None, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.cfg = model, tokenizer, config
        self.defaults = defaults
        self.eos_ids = frozenset(eos_token_ids)
        self.pad_id = pad_token_id
        text = model.text
        self.C, self.V = model.config.canvas_length, text.vocab_size
        if config.max_model_len > text.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"{text.max_position_embeddings}")
        dev, S, C = model.device, config.max_num_seqs, self.C
        self.cache = KVCache(text, S, config.max_model_len, dtype=model.dtype, device=dev)
        self.tile = min(max(C, 32), 256)  # fixed kernel tile of the batch-invariant mode (see batch_invariant.py)
        self.canvas = torch.zeros(S, C, dtype=torch.long, device=dev)  # [slots, C] decoder input
        self.prev_argmax = torch.full((S, C), -1, dtype=torch.long, device=dev)  # [slots, C]
        self.stable_run = torch.zeros(S, dtype=torch.int32, device=dev)  # [slots]
        self.steps_left = torch.zeros(S, dtype=torch.int32, device=dev)  # [slots] n: N..1
        self.sc = torch.zeros(S, C, text.hidden_size, dtype=model.dtype, device=dev)  # [slots, C, H]
        self.has_sc = torch.zeros(S, dtype=torch.bool)  # [slots] False on a canvas's first step
        self.slots: list[Sequence | None] = [None] * S
        self.waiting: deque[Sequence] = deque()
        self._ids = itertools.count()
        self._seed_rng = random.SystemRandom()
        self.stats = {"decoder_forwards": 0, "forwards": 0, "tokens": 0, "canvases": 0, "canvas_steps": 0}

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        if any(t < 0 or t >= self.V for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {self.V})")
        room = self.cfg.max_model_len - len(prompt)
        if room < 1:
            raise PromptTooLongError(f"prompt has {len(prompt)} tokens; max_model_len is {self.cfg.max_model_len}, "
                                     "which leaves no room for output")
        settings = params.resolve(self.defaults)
        max_new = min(params.max_new_tokens if params.max_new_tokens is not None else settings.max_new_tokens, room)
        seed = params.seed if params.seed is not None else self._seed_rng.randrange(2**63)
        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        rid = request_id or f"req-{next(self._ids)}"
        seq = Sequence(rid, prompt, params, settings, gen, max_new, stop_ids)
        seq.out = RequestOutput(rid, prompt)
        if self.tokenizer is not None:
            from .tokenizer import IncrementalDecoder
            seq.decoder = IncrementalDecoder(self.tokenizer)
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> bool:
        for seq in list(self.waiting):
            if seq.id == request_id:
                self.waiting.remove(seq)
                return True
        for seq in self.slots:
            if seq is not None and seq.id == request_id:
                self._finish(seq, "abort")
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    # -- the step ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[StreamEvent]:
        events = [StreamEvent(s.id, "admitted") for s in self._admit()]
        running = [s for s in self.slots if s is not None]
        if not running:
            return events
        enc = [s for s in running if not s.denoising]
        dec = [s for s in running if s.denoising]
        segments = []
        if enc:
            chunks = [s.pending_commit if s.pending_commit is not None
                      else s.prompt[s.prefilled:s.prefilled + self.cfg.prefill_chunk] for s in enc]
            ids = torch.full((len(enc), max(map(len, chunks))), self.pad_id, dtype=torch.long)
            for i, c in enumerate(chunks):
                ids[i, :len(c)] = torch.tensor(c)
            enc_seg = EncodeSegment(self.cache, ids.to(self.model.device), [s.slot for s in enc],
                                    [len(c) for c in chunks])
            segments.append(enc_seg)
        if dec:
            slots = torch.tensor([s.slot for s in dec], device=self.model.device)
            sc = self.sc[slots] if bool(self.has_sc[slots.cpu()].any()) else None
            segments.append(DecodeSegment(self.cache, self.canvas[slots], slots.cpu(), sc))
        with batch_invariant.mode(self.cfg.batch_invariant, self.tile):
            hidden = self.model(segments)
            self.stats["forwards"] += 1
        if enc:
            enc_seg.finish()
            for s, c in zip(enc, chunks):
                if s.pending_commit is not None:
                    s.pending_commit = None
                else:
                    s.prefilled += len(c)
                if s.denoising:
                    self._start_canvas(s)
        if dec:
            with batch_invariant.mode(self.cfg.batch_invariant, self.tile):
                events += self._denoise(dec, hidden[-1])
        return events

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self.waiting and None in self.slots:
            seq = self.waiting.popleft()
            seq.slot = self.slots.index(None)
            self.cache.reset(seq.slot)
            self.slots[seq.slot] = seq
            admitted.append(seq)
        return admitted

    def _start_canvas(self, s: Sequence) -> None:
        slot = s.slot
        self.canvas[slot] = sampler.PerRequestDraws([s.generator], self.model.device).initial_canvas(self.C, self.V)[0]
        self.prev_argmax[slot] = -1
        self.stable_run[slot] = 0
        self.steps_left[slot] = s.settings.max_denoising_steps
        self.has_sc[slot] = False
        self.sc[slot] = 0  # a zero signal gives exactly the no-self-conditioning input on the first step
        s.canvas_steps = 0

    def _denoise(self, dec: list[Sequence], hidden: torch.Tensor) -> list[StreamEvent]:
        events = []
        row_bytes = self.C * self.V * 4 * 3  # logits + two slab temporaries
        per = max(1, self.cfg.logits_budget_bytes // row_bytes)
        emb = self.model.embed_tokens.weight
        for start in range(0, len(dec), per):
            rows = dec[start:start + per]
            slots = torch.tensor([s.slot for s in rows], device=self.model.device)
            logits = self.model.logits(hidden[start:start + len(rows)])
            params = sampler.RowParams.from_settings([s.settings for s in rows], device=self.model.device)
            draws = sampler.PerRequestDraws([s.generator for s in rows], self.model.device)
            res = sampler.step(logits, self.steps_left[slots], params, self.prev_argmax[slots],
                               self.stable_run[slots], draws, embedding=emb, embed_scale=self.model.text.embed_scale,
                               chunk_elems=self.C * self.V)  # one row per slab: same shapes whatever the batch
            del logits
            self.canvas[slots] = res.canvas
            self.prev_argmax[slots] = res.argmax
            self.stable_run[slots] = res.stable_run
            self.steps_left[slots] -= 1
            self.sc[slots] = res.sc_embeds
            self.has_sc[slots.cpu()] = True
            done = res.done.tolist()
            for i, s in enumerate(rows):
                s.canvas_steps += 1
                s.out.decoder_forwards += 1
                self.stats["decoder_forwards"] += 1
                if s.params.trace:
                    t = StepTrace(len(s.out.canvases), s.canvas_steps, res.argmax[i].tolist(),
                                  res.accepted[i].tolist(), float(res.mean_entropy[i]))
                    if self.cfg.keep_traces:
                        s.out.trace.append(t)
                    events.append(StreamEvent(s.id, "draft", draft=t))
                if done[i]:
                    events += self._commit(s, res.argmax[i].tolist())
        return events

    def _commit(self, s: Sequence, canvas: list[int]) -> list[StreamEvent]:
        """Append a finished canvas to the output; decide whether the request goes on."""
        out = s.out
        room = s.max_new_tokens - len(out.token_ids)
        new = canvas[:room]
        reason = "length" if len(canvas) >= room else None
        for i, t in enumerate(new):
            if t in s.stop_ids:
                new, reason = new[:i + 1], "stop"
                break
        text = out.text + (s.decoder.push(new) if s.decoder is not None else "")
        stops = s.params.stop if s.decoder is not None else ()
        if stops:
            longest = max(map(len, stops))
            hits = [h for x in stops if (h := text.find(x, max(0, len(out.text) - longest + 1))) >= 0]
            if hits:  # a stop string may span the previous canvas: its start was held back, never streamed
                cut = min(hits)
                reason = "stop"
                new = self._tokens_for_text(out.token_ids, new, text[:cut])
                text = text[:cut]
        # Stream only what cannot turn out to be the start of a stop string; the rest goes out with a later commit.
        streamed = len(out.text) - stop_prefix_len(out.text, stops)
        delta = text[streamed:len(text) - (stop_prefix_len(text, stops) if reason is None else 0)]
        out.token_ids += new
        out.text = text
        out.canvases.append(CanvasStats(steps=s.canvas_steps, tokens=len(new)))
        self.stats["tokens"] += len(new)
        self.stats["canvases"] += 1
        self.stats["canvas_steps"] += s.canvas_steps
        events = [StreamEvent(s.id, "commit", text_delta=delta, token_ids_delta=list(new))]
        if reason is not None:
            events.append(self._finish(s, reason))
        else:
            s.pending_commit = canvas
        return events

    def _tokens_for_text(self, before: list[int], new: list[int], text: str) -> list[int]:
        """The shortest prefix of `new` whose decoded output covers `text` (for stop-string truncation)."""
        for k in range(len(new) + 1):
            if len(self.tokenizer.decode(before + new[:k])) >= len(text):
                return new[:k]
        return new

    def _finish(self, s: Sequence, reason: str) -> StreamEvent:
        tail = ""
        if s.decoder is not None and not (reason == "stop" and s.params.stop):
            tail = s.decoder.flush()  # bytes held back for an incomplete character
            s.out.text += tail
        s.out.finished, s.out.finish_reason = True, reason
        if 0 <= s.slot < len(self.slots) and self.slots[s.slot] is s:
            self.slots[s.slot] = None
            self.cache.reset(s.slot)
        return StreamEvent(s.id, "finished", text_delta=tail, output=s.out)

    # -- convenience ---------------------------------------------------------------------------------------------
    def run(self, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestOutput]:
        ids = [self.add_request(p, sp) for p, sp in requests]
        done: dict[str, RequestOutput] = {}
        while self.has_work():
            for ev in self.step():
                if ev.kind == "finished":
                    done[ev.request_id] = ev.output
        return [done[i] for i in ids]


def stop_prefix_len(text: str, stops) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string (0 if none).

    The engine holds that tail back from streaming: the next canvas may complete the stop string, and streamed
    text cannot be retracted. The caller keeps stop strings short (the server caps them), as this is quadratic."""
    best = 0
    for x in stops:
        for k in range(min(len(x) - 1, len(text)), best, -1):
            if text.endswith(x[:k]):
                best = k
                break
    return best
