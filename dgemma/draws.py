"""Counter-based random draws: the fast path's randomness, a pure function of (seed, draw number, position).

The exact path draws from one `torch.Generator` per request (`sampler.PerRequestDraws`): a stateful stream that a
CUDA graph cannot hold per request, and that costs a Python loop over rows. Here every draw is computed, not
consumed: call `n` of a request (its n-th call of `initial_canvas`, `uniforms` or `renoise`) at canvas position `p`
reads 32 bits of a hash of (seed, n, p). So

- a request's numbers depend only on its own seed and on how many draws it has made, never on its batch mates;
- a whole batch draws in a handful of tensor ops, inside a compiled or captured step: the host, which knows each
  request's draw number, computes the per-draw keys (`draw_key`, the same arithmetic on Python ints) and writes
  them into one small device buffer; the step hashes them with the positions (`StepDraws`);
- the engine and a replay into transformers (`CounterStream`) consume the same calls in the same order:
  one `initial_canvas` per canvas, then per denoising step one `uniforms` (the categorical draw) and one `renoise`.

The hash is integer arithmetic on int64 tensors that never overflows: values stay below 2**32 and every multiplier is
below 2**31, so products stay below 2**63 on every backend. Two xor-shift-multiply rounds per word (the structure of
well-known 32-bit integer finalisers) mix the seed's two halves, the draw number and the position. It is a good
statistical source for sampling, not a cryptographic one. Uniforms have 24 bits (exact in fp32); token ids are the
32 bits modulo the vocabulary (bias below V / 2**32, none when V is a power of two).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x6D2B79F5  # odd multipliers < 2**31
_GOLDEN = 0x1E3779B9  # position stride (< 2**31, odd)


def _mix(x):
    """A 32-bit finaliser on values in [0, 2**32) (a tensor or a Python int, with the same result): xor-shift,
    multiply, xor-shift, multiply, xor-shift."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def seed_keys(seeds):
    """A request's 32-bit key from its seed (int64 tensor or int in [0, 2**63)): both halves mixed. Computed once
    per request."""
    return _mix(_mix(seeds & MASK32) ^ ((seeds >> 32) & MASK32))


def draw_key(seed_key, counter):
    """The key of one draw (a request's `seed_key`, its draw number; tensors or ints): every position's bits of
    that draw hash this key with the position."""
    return _mix(seed_key ^ counter)


_POSITIONS: dict[tuple[int, torch.device], Tensor] = {}


def _positions(n: int, device: torch.device) -> Tensor:
    """Position words j * golden mod 2**32 for j < n (a constant, made once per length and device)."""
    pos = _POSITIONS.get((n, device))
    if pos is None:
        pos = _POSITIONS[(n, device)] = (torch.arange(n, device=device, dtype=torch.int64) * _GOLDEN) & MASK32
    return pos


def bits(keys: Tensor, counters: Tensor, n: int) -> Tensor:
    """32 random bits per (draw, position): seed keys and draw numbers [...] (below 2**32: a request never makes
    four billion draws) -> [..., n] int64 in [0, 2**32)."""
    return keyed_bits(draw_key(keys, counters), n)


def keyed_bits(draw_keys: Tensor, n: int) -> Tensor:
    """`bits` from precomputed `draw_key`s [...] -> [..., n]."""
    return _mix(draw_keys[..., None] ^ _positions(n, draw_keys.device))


class StepDraws:
    """The draws of one denoising step from host-computed draw keys [B, 2] (uniforms, renoise): what the engine's
    fast step uses. The host knows every request's draw number, so the per-row hashing costs no kernel."""

    def __init__(self, draw_keys: Tensor):
        self.draw_keys = draw_keys

    def step_draws(self, canvas_length: int, vocab_size: int) -> tuple[Tensor, Tensor]:
        b = keyed_bits(self.draw_keys, canvas_length)  # [B, 2, C]
        return to_uniform(b[:, 0]), to_tokens(b[:, 1], vocab_size)


def to_uniform(b: Tensor) -> Tensor:
    """32-bit words -> fp32 uniforms in [0, 1) with 24 bits of resolution."""
    return (b >> 8).to(torch.float32) * (1.0 / (1 << 24))


def to_tokens(b: Tensor, vocab_size: int) -> Tensor:
    return b % vocab_size


class CounterDraws:
    """A `sampler.DrawSource` whose calls are numbered from per-row counters; it never changes them.

    `keys` are the rows' `seed_keys`. Call k made on this object (k = 0, 1, ...) reads draw number `counters + k`.
    (The engine's fast step uses `StepDraws`, with the keys of its two draws computed on the host.)"""

    def __init__(self, keys: Tensor, counters: Tensor):
        self.keys, self.counters, self.calls = keys, counters, 0

    def _bits(self, n: int) -> Tensor:
        out = bits(self.keys, self.counters + self.calls, n)
        self.calls += 1
        return out

    def initial_canvas(self, canvas_length: int, vocab_size: int) -> Tensor:
        return to_tokens(self._bits(canvas_length), vocab_size)

    def uniforms(self, canvas_length: int) -> Tensor:
        return to_uniform(self._bits(canvas_length))

    def renoise(self, canvas_length: int, vocab_size: int) -> Tensor:
        return to_tokens(self._bits(canvas_length), vocab_size)

    def categorical(self, probs: Tensor) -> Tensor:
        from .sampler import inverse_cdf_sample

        rows, canvas_length, vocab_size = probs.shape
        u = self.uniforms(canvas_length).reshape(-1)
        return inverse_cdf_sample(probs.reshape(-1, vocab_size), u).view(rows, canvas_length)


class CounterStream:
    """The same draws as a stateful stream per request (what a sequential consumer, e.g. the replay into
    transformers in the parity tests, needs): each call advances the rows it served by one."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.keys = seed_keys(torch.as_tensor(list(seeds), dtype=torch.int64, device=device))
        self.counters = torch.zeros(len(seeds), dtype=torch.int64, device=device)
        self.rows = torch.arange(len(seeds), device=device)

    def select(self, rows: Sequence[int]) -> CounterStream:
        """The same streams (sharing their counters) for a subset of rows."""
        sub = object.__new__(CounterStream)
        sub.keys, sub.counters = self.keys, self.counters
        sub.rows = self.rows[torch.as_tensor(list(rows), dtype=torch.long, device=self.rows.device)]
        return sub

    def _call(self) -> CounterDraws:
        d = CounterDraws(self.keys[self.rows], self.counters[self.rows])
        self.counters[self.rows] += 1
        return d

    def initial_canvas(self, canvas_length: int, vocab_size: int) -> Tensor:
        return self._call().initial_canvas(canvas_length, vocab_size)

    def uniforms(self, canvas_length: int) -> Tensor:
        return self._call().uniforms(canvas_length)

    def renoise(self, canvas_length: int, vocab_size: int) -> Tensor:
        return self._call().renoise(canvas_length, vocab_size)

    def categorical(self, probs: Tensor) -> Tensor:
        return self._call().categorical(probs)
