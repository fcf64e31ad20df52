"""The block-autoregressive engine: many requests, one batched forward per step.

Each request moves through  prefill -> (denoise x k -> commit) x canvases -> finished.  One engine `step()` builds
at most two segments, an `EncodeSegment` for every row that prefills a prompt chunk or commits a finished canvas,
and a `DecodeSegment` for every row that denoises, and runs them in ONE model forward. Requests join and leave
between steps (continuous batching).

Hot-path state lives in slot-indexed tensors (canvas, previous argmax, stable run, steps left, self-conditioning
embeddings, sampler parameters, seeds and draw counters); per-request Python objects hold only what is per canvas
(output ids, counters). Logits are produced and sampled in row chunks so that at most a bounded slab of
[rows, canvas, vocab] fp32 exists at a time.

Two modes, one loop (`EngineConfig.batch_invariant`):

- **exact** (the CPU default): batch-invariant kernels, per-row attention over exactly a row's keys, one
  `torch.Generator` per request. Token-identical to transformers given the same draws, and a request's tokens never
  depend on its batch mates, bit for bit.
- **fast** (the CUDA default): the denoising step is one fixed-shape function of device state (`_fast_step`): it
  decodes the slots [0, B) for a bucketed B, reads the KV cache in place (`kv_cache.CanvasSegment`), runs the MoE as
  grouped GEMMs, samples with counter-based draws (`draws.py`) and updates the state in place, with no host sync;
  the host reads back one small packed tensor per step (argmax, accepted mask, done flag, mean entropy). It compiles
  with `torch.compile(fullgraph=True)` and, on CUDA, replays as CUDA graphs per (B, key-length) bucket
  (`EngineConfig.compile`). What it promises: a request's output depends only on its prompt, parameters and seed
  (its draws are its own, keyed by seed and draw number) and is reproducible run to run on the same machine and
  batch shape; its logits follow transformers' to fp32 rounding (1e-4), but plain GEMMs may round differently with
  the batch size, so a near-tie can resolve differently when batch mates change.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from . import batch_invariant, sampler
from .block_pool import ROOT_HASH, BlockPool, chain_hash
from .kv_cache import DecodeSegment, EncodeSegment, KVCache
from .model import DiffusionGemma
from .outputs import CanvasStats, Failure, RequestOutput, StepTrace, StreamEvent
from .draws import StepDraws, draw_key, keyed_bits, seed_keys, to_tokens
from .kv_cache import CanvasSegment, key_bucket
from .sampling_params import RELEASED_DEFAULTS, DenoiseSettings, SamplingParams
from . import vision_prompt  # [vision]
from .constraint import CanvasConstraint, Constraint, ConstraintError, ll_tokenizer, template_pins  # [constrained]

log = logging.getLogger("dgemma")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 8  # concurrent requests (KV cache slots)
    max_model_len: int = 4096  # prompt + output tokens per request
    prefill_chunk: int = 2048  # prompt tokens encoded per request per step
    logits_budget_bytes: int = 512 * 2**20  # fp32 [rows, canvas, vocab] slab sampled at once
    batch_invariant: bool | None = None  # True: exact mode, False: fast mode (module doc); None: exact on the CPU,
    # fast on other devices
    keep_traces: bool = True  # False: "draft" events are emitted but not kept in RequestOutput.trace (servers)
    compile: bool | None = None  # fast mode: torch.compile the step (None: on CUDA only, with CUDA graphs)
    block_size: int = 64  # positions per KV block of the full-attention layers (docs/kv_cache.md)
    num_kv_blocks: int | None = None  # blocks in the pool (None: max_num_seqs full-length requests' worth)
    enable_prefix_caching: bool = True  # share full blocks of identical prompt prefixes between requests
    max_num_batched_tokens: int | None = None  # prompt tokens encoded per step, all requests together (None:
    # prefill_chunk); canvas commits are not counted: they never wait
    kv_backend: str | None = None  # fast decode's full layers: "gather" or "flex" (None: flex when the step is
    # compiled on CUDA, else gather; docs/kv_cache.md)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "prefill_chunk", "logits_budget_bytes", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_kv_blocks", "max_num_batched_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive integer or None, got {v!r}")
        if self.kv_backend not in (None, "gather", "flex"):
            raise ValueError(f"EngineConfig.kv_backend must be 'gather', 'flex' or None, got {self.kv_backend!r}")
        if self.batch_invariant is not None and not isinstance(self.batch_invariant, bool):
            raise ValueError(f"EngineConfig.batch_invariant must be a bool or None, got {self.batch_invariant!r}")

    @property
    def kv_blocks(self) -> int:
        """Blocks of the full layers' pool."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return self.max_num_seqs * -(-self.max_model_len // self.block_size)

    @property
    def prefill_budget(self) -> int:
        return self.max_num_batched_tokens or self.prefill_chunk


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
    seed: int
    seed_key: int  # draws.seed_keys(seed): the fast mode's counter-based draws
    max_new_tokens: int
    stop_ids: frozenset[int]
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the KV cache
    pending_commit: list[int] | None = None  # canvas tokens to encode before the next canvas
    canvas_steps: int = 0
    out: RequestOutput = None  # type: ignore[assignment]
    decoder: object = None  # incremental detokenizer
    draws_made: int = 0  # fast mode: counter-based draws used so far (the next draw's number)
    images: "vision_prompt.PromptImages | None" = None  # [vision] the prompt's images (prefill only)
    constraint: "CanvasConstraint | None" = None  # [constrained] the request's matcher (docs/constrained.md)
    blocks: list[int] = field(default_factory=list)  # the KV blocks of its full layers, in position order
    reserved: int = 0  # blocks still promised to it (reserved at admission, allocated as it grows)
    hashes: list[bytes] | None = None  # chain hashes of the prompt's full blocks (prefix caching)
    registered: int = 0  # leading prompt blocks published in the prefix table
    order: int = 0  # admission order (the prefill budget goes to the oldest first)

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
        # The scratch tail holds the canvas K/V of the fast decode (read in place, never committed).
        self.cache = KVCache(model.cache_config, S, config.max_model_len, dtype=model.dtype, device=dev, scratch=C,
                             block_size=config.block_size, num_blocks=config.kv_blocks)
        self.pool = BlockPool(config.kv_blocks, config.block_size)
        # Re-encoded before a cached prefix's end, to rebuild the sliding layers exactly (docs/kv_cache.md).
        self.recompute = sum(text.is_sliding(i) for i in range(text.num_hidden_layers)) * (text.sliding_window - 1)
        self.tile = min(max(C, 32), 256)  # fixed kernel tile of the batch-invariant mode (see batch_invariant.py)
        self.canvas = torch.zeros(S, C, dtype=torch.long, device=dev)  # [slots, C] decoder input
        self.prev_argmax = torch.full((S, C), -1, dtype=torch.long, device=dev)  # [slots, C]
        self.stable_run = torch.zeros(S, dtype=torch.int32, device=dev)  # [slots]
        self.steps_left = torch.zeros(S, dtype=torch.int32, device=dev)  # [slots] n: N..1
        self.sc = torch.zeros(S, C, text.hidden_size, dtype=model.dtype, device=dev)  # [slots, C, H]
        self.has_sc = torch.zeros(S, dtype=torch.bool)  # [slots] False on a canvas's first step
        # Fast mode: per-slot sampler parameters, seeds and draw counters, written once per request or canvas.
        self.denoising = torch.zeros(S, dtype=torch.bool, device=dev)  # [slots] the slot's canvas is live
        self.draw_keys = torch.zeros(S, 2, dtype=torch.int64, device=dev)  # [slots, 2] this step's draw keys
        self._keys_host = torch.zeros(S, 2, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.row_params = sampler.RowParams.from_settings([RELEASED_DEFAULTS] * S, device=dev)
        self._compiled = None
        self._pack_dtype = torch.float32 if self.V <= 2**24 else torch.float64  # token ids exact in the read-back
        self._compile_failed = False  # automatic compilation (compile=None on CUDA) fell back to eager
        want = config.compile if config.compile is not None else dev.type == "cuda"
        # Eager flex attention materialises scores over the whole pool: flex only where the step is compiled.
        self.kv_backend = config.kv_backend or ("flex" if want and dev.type == "cuda" else "gather")
        self._pinned: dict[torch.Size, torch.Tensor] = {}  # read-back buffers of the fast step (CUDA)
        self.slots: list[Sequence | None] = [None] * S
        self.waiting: deque[Sequence] = deque()
        self._ids = itertools.count()
        self._seed_rng = random.SystemRandom()
        self._order = itertools.count()
        self.stats = {"decoder_forwards": 0, "forwards": 0, "tokens": 0, "canvases": 0, "canvas_steps": 0,
                      "prefix_cache_queries": 0, "prefix_cache_hits": 0, "prefill_tokens": 0, "preemptions": 0}

    @property
    def exact(self) -> bool:
        """Exact (batch-invariant) mode? `EngineConfig.batch_invariant`, or by device when it is None."""
        bi = self.cfg.batch_invariant
        return self.model.device.type == "cpu" if bi is None else bi

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, images: "vision_prompt.PromptImages | None" = None,
                    constraint: "CanvasConstraint | None" = None) -> str:
        """`constraint`: a plug-in that masks this request's canvases (docs/constrained.md), instead of the one
        compiled from `params` (giving both is an error)."""
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
        vision_prompt.check(self.model, prompt, images)  # [vision] images need a vision tower and must fit the prompt
        settings = params.resolve(self.defaults)
        max_new = min(params.max_new_tokens if params.max_new_tokens is not None else settings.max_new_tokens, room)
        seed = params.seed if params.seed is not None else self._seed_rng.randrange(2**63)
        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        rid = request_id or f"req-{next(self._ids)}"
        seq = Sequence(rid, prompt, params, settings, gen, seed, seed_keys(seed), max_new, stop_ids)
        need = self._blocks_needed(seq)
        if need > self.pool.num_blocks:
            raise PromptTooLongError(f"prompt of {len(prompt)} tokens with max_new_tokens {max_new} needs {need} KV "
                                     f"blocks of {self.pool.block_size}; the pool has {self.pool.num_blocks}")
        seq.out = RequestOutput(rid, prompt)
        seq.images = images  # [vision]
        if constraint is not None and params.constraint_grammar is not None:  # [constrained]
            raise ValueError("give a constraint plug-in or a constraint in SamplingParams, not both")
        seq.constraint = constraint
        if params.constraint_grammar is not None:
            seq.constraint = self._constraint(params.constraint_grammar, params.template)
        if self.tokenizer is not None:
            from .tokenizer import IncrementalDecoder
            seq.decoder = IncrementalDecoder(self.tokenizer)
        self.waiting.append(seq)
        return rid

    def _constraint(self, grammar: str, template: str | None = None) -> Constraint:
        """[constrained] A matcher for one request: needs the tokenizer and an EOS id to end on. A template also
        pins the tokens of its fixed spans at known positions (dgemma/template.py)."""
        if self.tokenizer is None or not self.eos_ids:
            raise ValueError("constrained decoding needs an engine with a tokenizer and an EOS token id")
        eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id in self.eos_ids else min(self.eos_ids)
        lt = ll_tokenizer(self.tokenizer, self.V, eos)
        pins = template_pins(template, lt) if template is not None else None
        return Constraint(grammar, lt, self.V, eos, pins)

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

    def fail(self, request_id: str, failure: Failure) -> StreamEvent | None:
        """End one request, queued or running, with finish_reason "error" (its "finished" event; None if unknown)."""
        for seq in [*self.waiting, *(s for s in self.slots if s is not None)]:
            if seq.id == request_id:
                if seq in self.waiting:
                    self.waiting.remove(seq)
                return self._finish(seq, "error", failure)
        return None

    def _fail(self, s: Sequence, e: Exception) -> StreamEvent:
        """A request's own step failed: it finishes alone with finish_reason "error", its slot freed, and its batch
        mates go on (in exact mode their tokens are those of a run without it)."""
        if isinstance(e, ConstraintError):
            failure = Failure("constraint", f"the constraint could not be met: {e}")
        else:
            log.error("request %s failed", s.id, exc_info=e)
            failure = Failure("internal", f"generation failed: {type(e).__name__}: {e}")
        return self._finish(s, "error", failure)

    def _commit_or_fail(self, s: Sequence, canvas: list[int]) -> list[StreamEvent]:
        try:
            return self._commit(s, canvas)
        except Exception as e:  # e.g. the matcher refuses the commit, or the detokenizer fails: this request only
            return [self._fail(s, e)]

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
        enc, chunks = self._schedule_encode([s for s in running if not s.denoising])
        dec = [s for s in running if s.denoising]
        segments = []
        enc_segs = []
        if enc:
            for s, c in zip(enc, chunks):  # blocks for the new positions, out of the request's reservation
                self._grow(s, self.cache.host_lengths[s.slot] + len(c))
            # Commits (all one canvas wide) share a segment; each prompt chunk has its own, so no row is padded to
            # another's width: a forward holds at most the prefill budget plus one canvas per slot.
            groups = [[i for i, s in enumerate(enc) if s.pending_commit is not None]]
            groups += [[i] for i, s in enumerate(enc) if s.pending_commit is None]
            for group in filter(None, groups):
                ids = torch.full((len(group), max(len(chunks[i]) for i in group)), self.pad_id, dtype=torch.long)
                for r, i in enumerate(group):
                    ids[r, :len(chunks[i])] = torch.tensor(chunks[i])
                seg = EncodeSegment(self.cache, ids.to(self.model.device), [enc[i].slot for i in group],
                                    [len(chunks[i]) for i in group])
                vision_prompt.attach(seg, self.model, [(enc[i].images if enc[i].pending_commit is None else None,
                                                        enc[i].prefilled) for i in group])  # [vision]
                enc_segs.append(seg)
            segments += enc_segs
        if dec and not self.exact:
            fast = [s for s in dec if s.constraint is None]  # [constrained] rows take the per-row path below
            if fast:
                held = [s.slot for s in dec if s.constraint is not None]
                saved = [(t, t[held].clone()) for t in (self.canvas, self.prev_argmax, self.stable_run,
                                                        self.steps_left, self.sc)] if held else []
                events += self._denoise_fast(fast)  # before the encode rows: they start canvases after it
                for t, rows in saved:  # the fast step decodes slots [0, b) in place: give these rows theirs back
                    t[held] = rows
            dec = [s for s in dec if s.constraint is not None]
        if dec:
            slots = torch.tensor([s.slot for s in dec], device=self.model.device)
            sc = self.sc[slots] if bool(self.has_sc[slots.cpu()].any()) else None
            segments.append(DecodeSegment(self.cache, self.canvas[slots], slots.cpu(), sc))
        if not segments:
            return events
        with batch_invariant.mode(self.exact, self.tile):
            hidden = self.model(segments)
            self.stats["forwards"] += 1
        if enc:
            for seg in enc_segs:
                seg.finish()
            for s, c in zip(enc, chunks):
                if s.pending_commit is not None:
                    s.pending_commit = None
                else:
                    s.prefilled += len(c)
                    self.stats["prefill_tokens"] += len(c)
                    self._register(s)
                if s.denoising:
                    self._start_canvas(s)
        if dec:
            with batch_invariant.mode(self.exact, self.tile):
                events += self._denoise(dec, hidden[-1])
        return events

    def _admit(self) -> list[Sequence]:
        """Admit waiting requests, oldest first, while a slot is free and the pool can promise every block the
        request can ever need (its prompt and all but the last of its canvases, less the prefix-cache hits): a
        running request then never fails to grow, and nothing is preempted. The head of the queue waits for blocks
        rather than be overtaken (no starvation)."""
        admitted = []
        while self.waiting and None in self.slots:
            seq = self.waiting[0]
            hits = []
            caching = self.cfg.enable_prefix_caching and seq.images is None  # [vision] images are never cached
            if caching:
                if seq.hashes is None:
                    seq.hashes = self._prompt_hashes(seq.prompt)
                hits = self.pool.match_prefix(seq.hashes)
            need = self._blocks_needed(seq) - len(hits)
            if need > self.pool.num_available:
                self.pool.release(hits)
                break
            self.pool.reserve(need)
            self.waiting.popleft()
            seq.slot = self.slots.index(None)
            seq.order = next(self._order)
            seq.blocks, seq.reserved, seq.registered = hits, need, len(hits)
            cached = len(hits) * self.pool.block_size
            # A cached prefix is skipped but for its last `recompute` tokens, which rebuild the sliding layers; the
            # full layers keep reading (never rewriting) the shared blocks (kv_cache.EncodeSegment._shared).
            seq.prefilled = max(0, cached - self.recompute) if hits else 0
            self.cache.reset(seq.slot)
            self.cache.set_blocks(seq.slot, hits)
            self.cache.protected[seq.slot] = cached
            if seq.prefilled:
                self.cache.set_lengths([seq.slot], [seq.prefilled])
            if caching:
                self.stats["prefix_cache_queries"] += len(seq.prompt)
                self.stats["prefix_cache_hits"] += cached
            self.slots[seq.slot] = seq
            if not self.exact:
                self._set_row_params(seq)
            if seq.denoising:  # the whole prompt was cached and nothing needs re-encoding (no sliding layers)
                self._start_canvas(seq)
            admitted.append(seq)
        return admitted

    def _blocks_needed(self, seq: Sequence) -> int:
        return self.blocks_needed(len(seq.prompt), seq.max_new_tokens)

    def blocks_needed(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV blocks a request can ever hold: its prompt and every canvas it may commit (all but the last, which
        ends the request and is never encoded). Admission reserves this many."""
        canvases = -(-max_new_tokens // self.C)
        tokens = prompt_len + (canvases - 1) * self.C
        return -(-tokens // self.pool.block_size)

    def _prompt_hashes(self, prompt: list[int]) -> list[bytes]:
        bs, h, out = self.pool.block_size, ROOT_HASH, []
        for i in range(0, len(prompt) - bs + 1, bs):
            h = chain_hash(h, prompt[i:i + bs])
            out.append(h)
        return out

    def _grow(self, seq: Sequence, length: int) -> None:
        """Give a request the blocks that `length` positions need, from its reservation."""
        more = -(-length // self.pool.block_size) - len(seq.blocks)
        if more > 0:
            seq.blocks += self.pool.allocate(more)
            seq.reserved -= more
            self.cache.set_blocks(seq.slot, seq.blocks)

    def _register(self, seq: Sequence) -> None:
        """Publish the prompt blocks the prefill has filled (their K/V is written) in the prefix table."""
        if seq.hashes is None:
            return
        full = min(seq.prefilled, len(seq.prompt)) // self.pool.block_size
        for i in range(seq.registered, min(full, len(seq.hashes))):
            self.pool.register(seq.blocks[i], seq.hashes[i])
        seq.registered = max(seq.registered, full)

    def _schedule_encode(self, rows: list[Sequence]) -> tuple[list[Sequence], list[list[int]]]:
        """The encode rows of this step and their tokens: every pending canvas commit, and prompt chunks within
        the step's prefill budget (`max_num_batched_tokens`), oldest request first; a request left out this step
        keeps its place. Denoising rows are never held back by a long prompt."""
        budget = self.cfg.prefill_budget
        enc, chunks = [], []
        for s in sorted(rows, key=lambda s: s.order):
            if s.pending_commit is not None:
                enc.append(s)
                chunks.append(s.pending_commit)
                continue
            n = min(self.cfg.prefill_chunk, budget)
            if n < 1:
                continue
            end = vision_prompt.chunk_end(s.images, s.prefilled, n, len(s.prompt))  # [vision] never cut an image
            if end <= s.prefilled:
                continue
            enc.append(s)
            chunks.append(s.prompt[s.prefilled:end])
            budget -= end - s.prefilled
        return enc, chunks

    def _set_row_params(self, seq: Sequence) -> None:
        """Write a request's sampler parameters and seed into its slot's rows (once per request, not per step)."""
        one = sampler.RowParams.from_settings([seq.settings], device=self.model.device)
        for name, value in vars(one).items():
            if isinstance(value, torch.Tensor):
                getattr(self.row_params, name)[seq.slot] = value[0]


    def _start_canvas(self, s: Sequence) -> None:
        slot = s.slot
        if self.exact:
            self.canvas[slot] = sampler.PerRequestDraws([s.generator], self.model.device).initial_canvas(
                self.C, self.V)[0]
        else:  # counter-based: the slot's next draw number, then one more drawn
            key = torch.tensor([draw_key(s.seed_key, s.draws_made)], dtype=torch.int64, device=self.model.device)
            self.canvas[slot] = to_tokens(keyed_bits(key, self.C), self.V)[0]
            s.draws_made += 1
            self.denoising[slot] = s.constraint is None  # [constrained] rows are not the fast step's
        if s.constraint is not None:  # [constrained] a template's pinned tokens, from step one
            for j, t in self._canvas_pins(s).items():
                self.canvas[slot, j] = t
        self.prev_argmax[slot] = -1
        self.stable_run[slot] = 0
        self.steps_left[slot] = s.settings.max_denoising_steps
        self.has_sc[slot] = False
        self.sc[slot] = 0  # a zero signal gives exactly the no-self-conditioning input on the first step
        s.canvas_steps = 0

    def _canvas_pins(self, s: Sequence) -> dict[int, int]:
        """[constrained] {canvas position: token} a request's constraint pins on this canvas (none for plug-ins
        without `canvas_pins`, e.g. the Sudoku rules, which force their givens through `mask`)."""
        pins = getattr(s.constraint, "canvas_pins", None)
        return pins(self.C) if pins is not None else {}

    def _denoise(self, dec: list[Sequence], hidden: torch.Tensor) -> list[StreamEvent]:
        events = []
        row_bytes = self.C * self.V * 4 * 3  # logits + two slab temporaries
        per = max(1, self.cfg.logits_budget_bytes // row_bytes)
        emb = self.model.embed_tokens.weight
        for start in range(0, len(dec), per):
            rows = dec[start:start + per]
            slots = torch.tensor([s.slot for s in rows], device=self.model.device)
            logits = self.model.logits(hidden[start:start + len(rows)])
            swept, failed = {}, {}  # [constrained] a dead end fails its request alone (its row is sampled, unused)
            for i, s in enumerate(rows):
                if s.constraint is not None:
                    try:
                        swept[i] = s.constraint.mask(logits[i])
                    except Exception as e:
                        failed[i] = e
            params = sampler.RowParams.from_settings([s.settings for s in rows], device=self.model.device)
            draws = sampler.PerRequestDraws([s.generator for s in rows], self.model.device)
            res = sampler.step(logits, self.steps_left[slots], params, self.prev_argmax[slots],
                               self.stable_run[slots], draws, embedding=emb, embed_scale=self.model.text.embed_scale,
                               chunk_elems=self.C * self.V)  # one row per slab: same shapes whatever the batch
            del logits
            for i, chosen in swept.items():  # [constrained] the sweep's argmax is the canvas (a near-tie after the
                res.argmax[i] = torch.tensor(chosen, device=res.argmax.device)  # temperature may differ)
                for j, t in self._canvas_pins(rows[i]).items():  # pinned: never renoised
                    res.canvas[i, j] = t
            self.canvas[slots] = res.canvas
            self.prev_argmax[slots] = res.argmax
            self.stable_run[slots] = res.stable_run
            self.steps_left[slots] -= 1
            self.sc[slots] = res.sc_embeds
            self.has_sc[slots.cpu()] = True
            done = res.done.tolist()
            for i, s in enumerate(rows):
                if i in failed:
                    events.append(self._fail(s, failed[i]))
                    continue
                s.canvas_steps += 1
                s.out.decoder_forwards += 1
                self.stats["decoder_forwards"] += 1
                if s.params.trace:
                    t = StepTrace(len(s.out.canvases), s.canvas_steps, res.argmax[i].tolist(),
                                  res.accepted[i].tolist(), float(res.mean_entropy[i]))
                    if s.constraint is not None:  # [constrained] which positions are pinned / masked
                        pins = self._canvas_pins(s)
                        t.pinned = [j in pins for j in range(self.C)]
                        counts = getattr(s.constraint, "allowed_counts", None)  # plug-ins may not count
                        t.allowed = list(counts) if counts is not None else None
                    if self.cfg.keep_traces:
                        s.out.trace.append(t)
                    events.append(StreamEvent(s.id, "draft", draft=t))
                if done[i]:
                    events += self._commit_or_fail(s, res.argmax[i].tolist())
        return events

    # -- the fast step -------------------------------------------------------------------------------------------
    def _batch_bucket(self, n: int) -> int:
        """Rows of the fast decode: the next power of two >= n, at most max_num_seqs (few distinct shapes)."""
        return min(1 << (n - 1).bit_length(), self.cfg.max_num_seqs)

    def _denoise_fast(self, dec: list[Sequence]) -> list[StreamEvent]:
        """One denoising step of every live canvas, as one fixed-shape device function and one small read-back."""
        b = self._batch_bucket(max(s.slot for s in dec) + 1)
        lengths = self.cache.host_lengths
        key_lens = tuple((size, key_bucket(max(min(lengths[s.slot], size) for s in dec) + self.C))
                         for size in sorted(set(self.cache.kept_size)))
        max_top_k = max(s.settings.top_k for s in dec)
        use_top_p = any(s.settings.top_p < 1 for s in dec)
        self.model.fuse_projections()
        keys = [[0, 0] for _ in range(b)]
        for s in dec:  # uniforms, then renoise: the request's next two draws (rows not denoising draw nothing)
            keys[s.slot] = [draw_key(s.seed_key, s.draws_made), draw_key(s.seed_key, s.draws_made + 1)]
            s.draws_made += 2
        host = self._keys_host[:b]
        host.copy_(torch.tensor(keys, dtype=torch.int64))  # the previous step's copy is done: its read-back waited
        self.draw_keys[:b].copy_(host, non_blocking=True)
        trace = any(s.params.trace for s in dec)
        args = (b, key_lens, max_top_k, use_top_p, trace)
        want = self.cfg.compile if self.cfg.compile is not None else self.model.device.type == "cuda"
        if want and not self._compile_failed:
            try:
                out = self._compiled_step()(*args)
            except torch._dynamo.exc.TorchDynamoException as e:  # raised while compiling, before any state changed
                if self.cfg.compile:
                    raise
                log.warning("torch.compile of the fast step failed (%s); running it eagerly", str(e).split("\n")[0])
                self._compile_failed = True
                if self.cfg.kv_backend is None:
                    self.kv_backend = "gather"
                out = self._fast_step(*args)
        else:
            out = self._fast_step(*args)
        packed = self._read_back(out)  # the step's only host sync
        self.stats["forwards"] += 1
        events = []
        C = self.C
        for s in dec:
            row = packed[s.slot]
            argmax = [int(t) for t in row[:C]]
            s.canvas_steps += 1
            s.out.decoder_forwards += 1
            self.stats["decoder_forwards"] += 1
            if s.params.trace:
                t = StepTrace(len(s.out.canvases), s.canvas_steps, argmax, [bool(a) for a in row[C + 1:2 * C + 1]],
                              row[2 * C + 1])
                if self.cfg.keep_traces:
                    s.out.trace.append(t)
                events.append(StreamEvent(s.id, "draft", draft=t))
            if row[C]:
                events += self._commit_or_fail(s, argmax)
        return events

    def _read_back(self, out: torch.Tensor) -> list[list[float]]:
        """The step's packed result as Python lists. On a GPU: a non-blocking copy into pinned host memory, then one
        wait for the stream (the step's one sync)."""
        if out.device.type != "cuda":
            return out.tolist()
        host = self._pinned.get(out.shape)
        if host is None:
            host = self._pinned[out.shape] = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream(out.device).synchronize()
        return host.tolist()

    def _compiled_step(self):
        if self._compiled is None:
            cuda = self.model.device.type == "cuda"
            for t in [self.canvas, self.prev_argmax, self.stable_run, self.steps_left, self.sc, self.denoising,
                      self.draw_keys, self.cache.dev_lengths, self.cache.block_table, *self.cache.buffers(),
                      *[v for v in vars(self.row_params).values() if isinstance(v, torch.Tensor)]]:
                torch._dynamo.mark_static_address(t)
            self._compiled = torch.compile(self._fast_step, fullgraph=True, dynamic=False,
                                           mode="reduce-overhead" if cuda else None)
        return self._compiled

    def _fast_step(self, b: int, key_lens: tuple[tuple[int, int], ...], max_top_k: int, use_top_p: bool,
                   trace: bool = False) -> torch.Tensor:
        """Decode slots [0, b), sample, and update their state in place (what a slot that is not denoising computed
        is never read: `_start_canvas` rewrites it).

        Returns one tensor for one read-back (the host reads only the rows that denoised): [b, C + 1] int64, the
        argmax canvas and the done flag; with `trace`, [b, 2C + 2] fp32 (fp64 past a 2**24 vocabulary) that also
        holds the accepted mask and the mean entropy."""
        C, V = self.C, self.V
        model = self.model
        seg = CanvasSegment(self.cache, self.canvas[:b], self.cache.dev_lengths[:b], self.sc[:b], dict(key_lens),
                            model.dtype, self.kv_backend)
        with batch_invariant.mode(False):
            hidden = model([seg])[0]  # [b, C, H]
        p = self.row_params
        row_bytes = C * V * 4 * 3
        per = max(1, min(b, self.cfg.logits_budget_bytes // row_bytes))
        parts = []
        for r0 in range(0, b, per):
            r1 = min(b, r0 + per)
            params = sampler.RowParams(
                **{n: v[r0:r1] for n, v in vars(p).items() if isinstance(v, torch.Tensor)},
                max_top_k=max_top_k, use_top_p=use_top_p)
            logits = model.logits(hidden[r0:r1], row_chunks=False)
            parts.append(sampler.step(
                logits, self.steps_left[r0:r1], params, self.prev_argmax[r0:r1], self.stable_run[r0:r1],
                StepDraws(self.draw_keys[r0:r1]), embedding=model.embed_tokens.weight,
                embed_scale=model.text.embed_scale, chunk_elems=(r1 - r0) * C * V, cpu_sub_slabs=False))
            del logits

        def field(name):
            return getattr(parts[0], name) if len(parts) == 1 else torch.cat([getattr(r, name) for r in parts])

        # Rows whose slot is not denoising computed garbage: canvas, argmax, run, steps and signal of such a slot are
        # all rewritten by `_start_canvas` before it denoises again, so only its `denoising` flag is masked.
        act = self.denoising[:b]
        argmax, done = field("argmax"), field("done")
        self.canvas[:b].copy_(field("canvas"))
        self.prev_argmax[:b].copy_(argmax)
        self.stable_run[:b].copy_(field("stable_run"))
        self.sc[:b].copy_(field("sc_embeds"))
        self.steps_left[:b].sub_(1)
        torch.gt(act, done, out=act)  # still denoising: was, and is not done
        if not trace:  # argmax canvas and done flag
            return torch.cat([argmax, done[:, None]], 1)
        pack = self._pack_dtype
        return torch.cat([argmax.to(pack), done[:, None].to(pack), field("accepted").to(pack),
                          field("mean_entropy")[:, None].to(pack)], 1)

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
        if s.constraint is not None:  # [constrained] the matcher's state carries to the next canvas
            s.constraint.commit(new)
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

    def _finish(self, s: Sequence, reason: str, failure: Failure | None = None) -> StreamEvent:
        tail = ""
        s.out.error = failure
        if s.decoder is not None and reason != "error" and not (reason == "stop" and s.params.stop):
            tail = s.decoder.flush()  # bytes held back for an incomplete character
            s.out.text += tail
        s.out.finished, s.out.finish_reason = True, reason
        if 0 <= s.slot < len(self.slots) and self.slots[s.slot] is s:
            self.slots[s.slot] = None
            self.cache.reset(s.slot)
            self.pool.release(s.blocks)  # cached prompt blocks stay matchable (LRU) until the pool needs them
            self.pool.unreserve(s.reserved)
            s.blocks, s.reserved = [], 0
            if not self.exact:
                self.denoising[s.slot] = False
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
