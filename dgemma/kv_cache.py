"""The KV cache of committed tokens, and the kinds of forward segment that use it (docs/kv_cache.md).

`KVCache` serves sequence *slots*, each with a length, so one forward can batch many sequences of different
lengths. Sliding layers keep, per slot, only the last `sliding_window - 1` positions (exactly what the reference's
sliding cache keeps, and all that a sliding query can see), left-aligned oldest first after a canvas scratch head:
O(window) per slot. Full-attention layers keep every position in a *paged pool* of fixed-size blocks shared by all
slots, read through a per-slot block table (position p in block `table[p // block_size]`, offset `p % block_size`);
the engine allocates blocks as requests grow (`block_pool.BlockPool`), and requests with a common prompt prefix
share its blocks. A 262,144-token context thus costs full-length KV only in the full layers, and only for what
requests hold.

- `EncodeSegment`: causal rows (prompt prefill, canvas commit). Each row attends, alone, to its cached prefix
  (gathered through the block table) plus its own tokens, causally, with the sliding window; appends its tokens to
  the cache (never over shared prefix blocks); `finish()` advances the slot lengths.
- `DecodeSegment`: bidirectional canvases. Attends to the cache (sliding layers: the whole kept window) plus the
  whole canvas. Reads only. Exact: each row attends alone, over exactly its own keys (the batch-invariant twin of
  the reference).
- `CanvasSegment`: the fast decode (batch invariance off). Rows are the slots `[0, B)`; each layer writes the
  canvas K/V into the slot's scratch (never committed) at fixed indices and reads its keys canvas first: sliding
  layers as a view, full layers by one gather of their blocks or, with FlexAttention, in place; the grouped KV heads
  are folded into the query axis; one attention call per layer with a per-row key-length mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TextConfig
from . import batch_invariant
from .model import attention


class KVCache:
    """Sliding layers: per slot, a canvas scratch head then a ring: [slots, scratch + window, Hkv, d]. Full layers:
    a block pool of K and V together, [num_blocks + slots * scratch_blocks, block_size, Hkv, 2, d] (`self.k[i]`,
    `self.v[i]` are its two strided halves), read through a per-slot block table whose first `scratch_blocks`
    entries are the slot's canvas scratch blocks and the rest its logical blocks in position order (module doc).

    Without `num_blocks` the table is static: slot s owns the blocks [s * M, (s + 1) * M), M = ceil(capacity /
    block_size), as a preallocated per-slot cache would. With `num_blocks`, the engine hands blocks out
    (`set_blocks`, from a `block_pool.BlockPool`) as each request grows."""

    def __init__(self, cfg: TextConfig, num_slots: int, capacity: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", scratch: int = 0, block_size: int = 64,
                 num_blocks: int | None = None):
        if capacity <= 0 or num_slots <= 0 or scratch < 0 or block_size <= 0:
            raise ValueError(f"KVCache needs num_slots > 0, capacity > 0, scratch >= 0 and block_size > 0, got "
                             f"{num_slots}, {capacity}, {scratch} and {block_size}")
        self.cfg, self.num_slots, self.capacity, self.scratch = cfg, num_slots, capacity, scratch
        self.window = cfg.sliding_window - 1  # tokens a sliding layer keeps
        self.block_size = bs = block_size
        self.max_blocks = -(-capacity // bs)  # table entries per slot
        self.scratch_blocks = -(-scratch // bs)  # per-slot blocks of the fast decode's canvas K/V (full layers)
        self.static = num_blocks is None
        self.num_blocks = num_slots * self.max_blocks if num_blocks is None else num_blocks
        if self.num_blocks < 1:
            raise ValueError(f"KVCache needs num_blocks >= 1, got {num_blocks}")
        self.pool_blocks = self.num_blocks + num_slots * self.scratch_blocks  # physical blocks of a full layer
        self.k: list[torch.Tensor] = []  # per layer: sliding [slots, scratch + kept, Hkv, d]; full [pool, bs, Hkv, d]
        self.v: list[torch.Tensor] = []
        self.kv: dict[int, torch.Tensor] = {}  # full layers: the pool the k and v halves are views of
        self.sliding: list[bool] = []
        self.kept_size: list[int] = []  # per layer: committed positions a slot keeps (full layers: capacity)
        for i in range(cfg.num_hidden_layers):
            sliding = cfg.is_sliding(i)
            size = min(capacity, self.window) if sliding else capacity
            hd = (cfg.layer_kv_heads(i), cfg.layer_head_dim(i))
            if sliding:
                self.k.append(torch.zeros((num_slots, scratch + size, *hd), dtype=dtype, device=device))
                self.v.append(torch.zeros((num_slots, scratch + size, *hd), dtype=dtype, device=device))
            else:  # K and V of a position side by side: one gather reads both (CanvasSegment)
                kv = self.kv[i] = torch.zeros((self.pool_blocks, bs, hd[0], 2, hd[1]), dtype=dtype, device=device)
                self.k.append(kv[..., 0, :])
                self.v.append(kv[..., 1, :])
            self.sliding.append(sliding)
            self.kept_size.append(size)
        self.lengths = torch.zeros(num_slots, dtype=torch.long)  # [slots] committed tokens (positions) per slot
        self.host_lengths = [0] * num_slots  # the same numbers as Python ints (read without a device sync)
        self.dev_lengths = torch.zeros(num_slots, dtype=torch.long, device=device)  # and on the cache's device
        # Block table: per slot, its scratch blocks, then its logical blocks (max_blocks entries; unused ones point at
        # block 0 and are never read unmasked). Host lists, a CPU tensor and the device copy, as the lengths.
        width = self.scratch_blocks + self.max_blocks
        self.tables: list[list[int]] = [[] for _ in range(num_slots)]
        self._table_cpu = torch.zeros(num_slots, width, dtype=torch.long)
        for s in range(num_slots):
            self._table_cpu[s, :self.scratch_blocks] = self.num_blocks + s * self.scratch_blocks + torch.arange(
                self.scratch_blocks)
        self.block_table = torch.zeros(num_slots, width, dtype=torch.long, device=device)
        self.protected = [0] * num_slots  # per slot: positions below this hold shared (prefix-cached) K/V
        self._constants: dict[tuple, torch.Tensor] = {}
        self.block_table.copy_(self._table_cpu)
        if self.static:
            for s in range(num_slots):
                self.set_blocks(s, list(range(s * self.max_blocks, (s + 1) * self.max_blocks)))

    @staticmethod
    def bytes_needed(cfg: TextConfig, num_slots: int, capacity: int, dtype: torch.dtype, scratch: int = 0,
                     block_size: int = 64, num_blocks: int | None = None) -> int:
        """Bytes the buffers take: the sliding rings and canvas scratch per slot, and the full layers' pool (by
        default the static one, `num_slots` x the blocks of `capacity`)."""
        per = torch.empty((), dtype=dtype).element_size()
        mb, sb = -(-capacity // block_size), -(-scratch // block_size)
        blocks = num_slots * mb if num_blocks is None else num_blocks
        total = 0
        for i in range(cfg.num_hidden_layers):
            row = 2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * per
            if cfg.is_sliding(i):
                total += row * (min(capacity, cfg.sliding_window - 1) + scratch) * num_slots
            else:
                total += row * (blocks + num_slots * sb) * block_size
        return total

    def constant(self, key: tuple, make) -> torch.Tensor:
        """A read-only index tensor of the fast decode, made once per shape (`make()`) and reused by every step."""
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = make()
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def buffers(self) -> list[torch.Tensor]:
        """The tensors that hold the cache (full layers: the K/V pools, not their halves)."""
        return [t for i in range(len(self.k)) for t in ((self.kv[i],) if i in self.kv else (self.k[i], self.v[i]))]

    def reset(self, slot: int) -> None:
        self.set_lengths([slot], [0])
        self.protected[slot] = 0

    def set_blocks(self, slot: int, blocks: list[int]) -> None:
        """Point a slot's logical blocks at these physical blocks (its table grows as its request does)."""
        if len(blocks) > self.max_blocks:
            raise RuntimeError(f"slot {slot}: {len(blocks)} blocks exceed the table's {self.max_blocks}")
        old = self.tables[slot]
        self.tables[slot] = list(blocks)
        n = len(blocks)
        first = next((i for i, (a, b) in enumerate(zip(old, blocks)) if a != b), min(len(old), n))
        if first < n:  # only the new entries travel (an asynchronous host-to-device copy, never a sync)
            a, b = self.scratch_blocks + first, self.scratch_blocks + n
            self._table_cpu[slot, a:b] = torch.tensor(blocks[first:], dtype=torch.long)
            self.block_table[slot, a:b].copy_(self._table_cpu[slot, a:b], non_blocking=True)

    def set_lengths(self, slots: list[int], lengths: list[int]) -> None:
        """Set committed lengths (host list, CPU tensor and device copy together; the device copy is an
        asynchronous host-to-device copy, never a sync)."""
        for s, n in zip(slots, lengths):
            self.host_lengths[s] = n
        idx = torch.tensor(slots, dtype=torch.long)
        self.lengths[idx] = torch.tensor(lengths, dtype=torch.long)
        self.dev_lengths.copy_(self.lengths, non_blocking=True)

    def kept(self, layer: int, lengths: torch.Tensor) -> torch.Tensor:
        """How many cached positions of each row a layer holds: [B]."""
        return lengths.clamp(max=self.kept_size[layer])

    def flat_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Physical rows (of a full layer's pool viewed as [blocks * block_size, Hkv, d]) of logical positions
        [B, n] of the slots [B], through the device block table (no host sync)."""
        bs = self.block_size
        blk = positions.div(bs, rounding_mode="floor").clamp(max=self.max_blocks - 1) + self.scratch_blocks
        return self.block_table[slots.to(self.block_table.device)[:, None], blk] * bs + positions % bs

    def gather(self, layer: int, slots: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n kept positions of each slot: k, v [B, n, Hkv, d] (sliding layers: a view when slots is one
        slot; full layers: a copy of the slots' blocks, in logical order)."""
        k, v = self.k[layer], self.v[layer]
        if not self.sliding[layer]:
            pos = self.constant(("pos", n), lambda: torch.arange(n, device=k.device))
            idx = self.flat_positions(slots, pos[None].expand(slots.numel(), n)).reshape(-1)
            shape = (slots.numel(), n, *k.shape[2:])
            return k.view(-1, *k.shape[2:])[idx].view(shape), v.view(-1, *v.shape[2:])[idx].view(shape)
        o = self.scratch  # the ring follows the canvas scratch head
        if slots.numel() == 1:
            s = int(slots[0])
            return k[s:s + 1, o:o + n], v[s:s + 1, o:o + n]
        return k[slots, o:o + n], v[slots, o:o + n]

    def slot_kv(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's buffer in one layer in position order, as a per-slot cache would hold it: [kept_size, Hkv, d]
        each (for tests and tools; positions past the slot's table read block 0)."""
        n = self.kept_size[layer]
        k, v = self.gather(layer, torch.tensor([slot]), n)
        return k[0], v[0]

    def host_flat(self, slot: int, start: int, end: int) -> list[int]:
        """Physical rows of positions [start, end) of a slot, from the host table (writes)."""
        bs, t = self.block_size, self.tables[slot]
        if end > len(t) * bs:
            raise RuntimeError(f"KV cache slot {slot}: positions up to {end} need {-(-end // bs)} blocks, it holds "
                               f"{len(t)}")
        return [t[p // bs] * bs + p % bs for p in range(start, end)]

    def append(self, layer: int, slot: int, length: int, k: torch.Tensor, v: torch.Tensor,
               rows: torch.Tensor | None = None) -> None:
        """Write a row's new tokens k/v [n, Hkv, d] after `length` committed tokens. Full layers write through the
        block table (`rows`: the physical rows of the written positions, from `host_flat`), never below
        `protected[slot]` (shared prefix blocks already hold those positions)."""
        n = k.shape[0]
        bk, bv = self.k[layer], self.v[layer]
        size = self.kept_size[layer]
        if not self.sliding[layer]:
            if length + n > size:
                raise RuntimeError(f"KV cache slot {slot} overflow: {length} + {n} > capacity {size}")
            skip = min(n, max(0, self.protected[slot] - length))
            if rows is None:
                rows = torch.tensor(self.host_flat(slot, length + skip, length + n), dtype=torch.long,
                                    device=bk.device)
            bk.view(-1, *bk.shape[2:]).index_copy_(0, rows, k[skip:].to(bk.dtype))
            bv.view(-1, *bv.shape[2:]).index_copy_(0, rows, v[skip:].to(bv.dtype))
            return
        bk, bv = bk[slot, self.scratch:], bv[slot, self.scratch:]  # the ring
        old = min(length, size)
        keep_old = max(0, min(old, size - n))  # old tokens that stay, shifted to the front
        if keep_old and keep_old < old:
            bk[:keep_old] = bk[old - keep_old:old].clone()
            bv[:keep_old] = bv[old - keep_old:old].clone()
        take = min(n, size)
        bk[keep_old:keep_old + take] = k[n - take:]
        bv[keep_old:keep_old + take] = v[n - take:]


def _as_long(x, device=None) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device)


class EncodeSegment:
    """Causal rows: rows' new tokens are right-padded to a common width; `n_new[b]` of them are real."""

    causal = True
    sc_embeds = None
    image_embeds = None  # [vision] (flat row index [N], soft tokens [N, H]) placed over image tokens (vision_prompt.py)
    image_blocks = None  # [vision] [B, L] image number per new token, -1 for text: bidirectional within an image

    def __init__(self, cache: KVCache, input_ids: torch.Tensor, slots, n_new=None):
        self.cache = cache
        self.input_ids = input_ids
        b, width = input_ids.shape
        self.slots = _as_long(slots)
        self.n_new = _as_long(n_new if n_new is not None else [width] * b)
        self.start = cache.lengths[self.slots].clone()  # [B] committed tokens before this segment
        if int((self.start + self.n_new).max()) > cache.capacity:
            raise RuntimeError(f"KV cache capacity {cache.capacity} exceeded")
        dev = input_ids.device
        ar = torch.arange(width, device=dev)
        self.positions = self.start.to(dev)[:, None] + ar
        self._write_rows: dict[int, torch.Tensor] = {}
        self.window = cache.cfg.sliding_window

    def _row_mask(self, layer: int, b: int, c: int, n: int, i: int, j: int) -> torch.Tensor:
        """[j - i, c + n] bool: which of row b's keys (its c cached positions, then its n new tokens) its new
        tokens i..j-1 see: causal, within the window on sliding layers, and [vision] bidirectional inside an
        image."""
        dev = self.input_ids.device
        start = int(self.start[b])
        qpos = torch.arange(start + i, start + j, device=dev)
        kpos = torch.arange(start - c, start + n, device=dev)
        m = kpos[None, :] <= qpos[:, None]
        if self.cache.sliding[layer]:
            m &= (qpos[:, None] - kpos[None, :]) < self.window
        if self.image_blocks is not None:  # [vision] an image's tokens see each other (every layer type)
            blk = self.image_blocks[b, :n].to(dev)
            m[:, c:] |= (blk[i:j, None] == blk[None, :]) & (blk[i:j, None] >= 0)
        return m

    def attend(self, layer: int, q, k, v):
        """Each row with exactly its own keys (its cached prefix, gathered through the block table, and its new
        tokens), one row at a time in both modes: the workspace is one row's, however long its batch mates are,
        and in exact mode a row's result cannot depend on its batch mates."""
        if not self.cache.sliding[layer]:
            k, v = self._shared(layer, k, v)
        out = torch.zeros_like(q)
        kept = self.cache.kept(layer, self.start)
        for b in range(q.shape[0]):
            n, c = int(self.n_new[b]), int(kept[b])
            if c:
                ck, cv = self.cache.gather(layer, self.slots[b:b + 1], c)
                keys = torch.cat([ck.to(k.dtype), k[b:b + 1, :n]], 1)
                vals = torch.cat([cv.to(v.dtype), v[b:b + 1, :n]], 1)
            else:
                keys, vals = k[b:b + 1, :n], v[b:b + 1, :n]
            # Queries in pieces when the row's [queries, keys] masks would be large (long contexts): each piece's
            # masks are at most MASK_PAIRS elements; the expanded keys are shared by the pieces.
            step = max(1, MASK_PAIRS // (c + n))
            rep = q.shape[2] // k.shape[2]
            if step < n and rep > 1:  # expand the grouped KV heads once, not once per piece
                keys, vals = keys.repeat_interleave(rep, dim=2), vals.repeat_interleave(rep, dim=2)
            for i in range(0, n, step):
                j = min(n, i + step)
                out[b:b + 1, i:j] = attention(q[b:b + 1, i:j], keys, vals, self._row_mask(layer, b, c, n, i, j)[None])
        for b in range(q.shape[0]):
            n, slot = int(self.n_new[b]), int(self.slots[b])
            rows = None if self.cache.sliding[layer] else self._rows(b)
            self.cache.append(layer, slot, int(self.start[b]), k[b, :n].detach(), v[b, :n].detach(), rows)
        return out

    def _rows(self, b: int) -> torch.Tensor:
        """Physical rows the full layers write row b's unprotected new tokens to (the same in every full layer)."""
        if b not in self._write_rows:
            slot, start, n = int(self.slots[b]), int(self.start[b]), int(self.n_new[b])
            skip = min(n, max(0, self.cache.protected[slot] - start))
            self._write_rows[b] = torch.tensor(self.cache.host_flat(slot, start + skip, start + n), dtype=torch.long,
                                               device=self.input_ids.device)
        return self._write_rows[b]

    def _shared(self, layer: int, k, v):
        """Full layers: new tokens below the slot's protected length (re-encoded over a cached prefix, to rebuild
        the sliding layers) take the cached K/V of their positions instead of their own, as a run without the
        prefix cache computed them. Returns k, v (copies when a row is protected)."""
        cut = [(b, min(int(self.n_new[b]), self.cache.protected[int(self.slots[b])] - int(self.start[b])))
               for b in range(k.shape[0])]
        cut = [(b, m) for b, m in cut if m > 0]
        if not cut:
            return k, v
        k, v = k.clone(), v.clone()
        for b, m in cut:
            start = int(self.start[b])
            pos = torch.arange(start, start + m, device=k.device)[None]
            rows = self.cache.flat_positions(self.slots[b:b + 1], pos)[0]
            bk, bv = self.cache.k[layer], self.cache.v[layer]
            k[b, :m] = bk.view(-1, *bk.shape[2:])[rows].to(k.dtype)
            v[b, :m] = bv.view(-1, *bv.shape[2:])[rows].to(v.dtype)
        return k, v

    def finish(self) -> None:
        """Advance the slot lengths once every layer has written its tokens."""
        self.cache.set_lengths(self.slots.tolist(), (self.start + self.n_new).tolist())


class DecodeSegment:
    """Bidirectional canvases [B, C] reading their slots' cache."""

    causal = False

    def __init__(self, cache: KVCache, canvas: torch.Tensor, slots, sc_embeds: torch.Tensor | None = None):
        self.cache = cache
        self.input_ids = canvas
        self.sc_embeds = sc_embeds
        self.slots = _as_long(slots)
        dev = canvas.device
        self.lengths = cache.lengths[self.slots].clone()
        self.positions = self.lengths.to(dev)[:, None] + torch.arange(canvas.shape[1], device=dev)
        self._masks: dict[int, tuple[int, torch.Tensor]] = {}

    def _mask(self, layer: int) -> tuple[int, torch.Tensor]:
        size = self.cache.kept_size[layer]
        if size not in self._masks:
            dev = self.input_ids.device
            kept = self.cache.kept(layer, self.lengths).to(dev)
            kc = int(kept.max()) if kept.numel() else 0
            b, c = self.input_ids.shape
            cvalid = torch.arange(kc, device=dev)[None] < kept[:, None]
            kvalid = torch.cat([cvalid, torch.ones(b, c, dtype=torch.bool, device=dev)], 1)
            self._masks[size] = (kc, kvalid[:, None, :].expand(b, c, kc + c))
        return self._masks[size]

    def attend(self, layer: int, q, k, v):
        kc, mask = self._mask(layer)
        if batch_invariant.enabled():
            kept = self.cache.kept(layer, self.lengths)
            rows = []
            for b in range(q.shape[0]):
                ck, cv = self.cache.gather(layer, self.slots[b:b + 1], int(kept[b]))
                kb, vb = torch.cat([ck.to(k.dtype), k[b:b + 1]], 1), torch.cat([cv.to(v.dtype), v[b:b + 1]], 1)
                rows.append(attention(q[b:b + 1], kb, vb, None))
            return torch.cat(rows)
        if kc:
            ck, cv = self.cache.gather(layer, self.slots, kc)
            k, v = torch.cat([ck.to(k.dtype), k], 1), torch.cat([cv.to(v.dtype), v], 1)
        return attention(q, k, v, mask)


MASK_PAIRS = 1 << 24  # an encode row's queries go in pieces whose [queries, keys] masks stay below this
BACKENDS = ("gather", "flex")  # how the fast decode's full layers read the paged pool (docs/kv_cache.md)


def key_bucket(n: int, quantum: int = 64) -> int:
    """A key count rounded up to a short geometric ladder (multiples of `quantum`, then 8 steps per doubling), so a
    compiled or captured decode step sees few distinct key lengths however the context grows. The keys past each
    row's own length are masked, so the bucket changes no result."""
    if n <= 8 * quantum:
        return -(-n // quantum) * quantum
    step = 1 << (n.bit_length() - 4)  # 8 steps per power of two
    return -(-n // step) * step


class CanvasSegment:
    """Fast bidirectional decode of the canvases of slots [0, B) (batch invariance off).

    Rows whose slot is not denoising ride along (their outputs are discarded by the engine): the shapes then depend
    on B only, never on which slots are busy, which is what a captured step needs. Every layer writes the canvas K/V
    into the slot's *scratch head* (sliding layers: the positions before the ring; full layers: the slot's scratch
    blocks), at indices that never change, and reads the keys canvas first: a decode query has no positional mask,
    so key order is free. Sliding layers read [canvas | ring] in place, as a view; full layers read [scratch blocks |
    the slot's blocks] with one gather of K and V together (the GATHER backend, docs/kv_cache.md). In both, key j of
    a row is masked when j - C >= its committed length, so one mask serves every layer when the canvas fills whole
    blocks (C a multiple of the block size).

    `key_lens` maps a cache buffer size to a key count, the longest row's kept positions plus the canvas, bucketed
    (the host knows every slot's length, so the engine picks it without a device sync; see `key_bucket`)."""

    causal = False

    def __init__(self, cache: KVCache, canvas: torch.Tensor, lengths: torch.Tensor, sc_embeds: torch.Tensor | None,
                 key_lens: dict[int, int], mask_dtype: torch.dtype, backend: str = "gather"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown paged attention backend {backend!r} (one of {', '.join(BACKENDS)})")
        self.cache, self.input_ids, self.sc_embeds, self.backend = cache, canvas, sc_embeds, backend
        b, c = canvas.shape
        dev = canvas.device
        bs, sb = cache.block_size, cache.scratch_blocks
        if cache.scratch < c:
            raise ValueError(f"the cache's scratch ({cache.scratch}) is smaller than the canvas ({c})")
        self.positions = lengths[:, None] + cache.constant(("arange", c), lambda: torch.arange(c, device=dev))
        self._plan: dict[tuple[int, bool], tuple] = {}  # (kept size, sliding) -> the layer kind's plan
        kinds = sorted(set(zip(cache.kept_size, cache.sliding)))
        ext = {}  # kind -> keys read (canvas head included)
        for size, sliding in kinds:
            if not sliding:  # full layers: whole blocks after the scratch blocks
                nblk = min(-(-max(key_lens[size] - c, 1) // bs), cache.max_blocks)
                ext[size, sliding] = (sb + nblk) * bs
            else:
                ext[size, sliding] = cache.scratch + min(max(key_lens[size] - c, 0), size)

        def head(kind):  # keys before the cached positions: the canvas, then padding
            return cache.scratch if kind[1] else sb * bs

        def shared(off, width):
            # key j >= off stands for cached position j - off: masked when that is >= the row's length; the canvas
            # keys (j < C) get a position below any length; padding (C <= j < off) is -inf in a constant base.
            j = cache.constant(("arange", width), lambda: torch.arange(width, device=dev))
            keys = cache.constant(("keys", off, width), lambda: torch.where(j < off, -2**62, j - off)[None, None, None])
            base = cache.constant(("base", b, width, off, c, mask_dtype), lambda: torch.zeros(
                b, 1, 1, width, dtype=mask_dtype, device=dev).masked_fill(((j >= c) & (j < off))[None, None, None],
                                                                          float("-inf")))
            return base.masked_fill(keys >= lengths[:, None, None, None], float("-inf"))

        masks = {}  # one per head width: a single mask for every layer when the canvas fills whole blocks
        for kind in kinds:
            size, sliding = kind
            off = head(kind)
            if off not in masks:
                masks[off] = shared(off, max(ext[z] for z in ext if head(z) == off))
            mask = masks[off][..., :ext[kind]]
            if not sliding:
                write = cache.constant(("blocks_write", b, c), lambda: (
                    (cache.num_blocks + torch.arange(b, device=dev) * sb)[:, None] * bs
                    + torch.arange(c, device=dev)).reshape(-1))
                read = cache.block_table[:b, :ext[kind] // bs]  # [B, blocks]: a view of the table
            else:
                buf = cache.scratch + size
                write = cache.constant(("ring_write", b, c, buf), lambda: (
                    (torch.arange(b, device=dev) * buf)[:, None] + torch.arange(c, device=dev)).reshape(-1))
                read = None
            self._plan[kind] = (ext[kind], write, mask, read)
        if backend == "flex" and not all(cache.sliding):
            self._block_mask = self._flex_mask(b, c, lengths, dev)

    def _flex_mask(self, b, c, lengths, dev):
        """FLEX backend (full layers): a BlockMask over the whole pool whose KV blocks are the pages, listing for
        row b its scratch blocks then its first ceil(len / bs) logical blocks (the block table row, read in place:
        no copy of any key), with a mask_mod that keeps the filled positions of each listed page (a per-row fill
        per physical block; it also carries membership, so the unfused math fallback is exact too)."""
        from torch.nn.attention.flex_attention import BlockMask

        cache = self.cache
        bs, sb = cache.block_size, cache.scratch_blocks
        width = sb + cache.max_blocks
        full = next(i for i, sl in enumerate(cache.sliding) if not sl)
        rep = cache.cfg.num_attention_heads // cache.cfg.layer_kv_heads(full)
        table = cache.block_table[:b]  # [B, W]
        first = cache.constant(("flex_first", width), lambda: (torch.arange(width, device=dev) - sb) * bs)
        canvas_fill = cache.constant(("flex_canvas", width, c), lambda: torch.where(
            torch.arange(width, device=dev) < sb, (c - torch.arange(width, device=dev) * bs).clamp(0, bs), 0))
        fill = torch.where(first < 0, canvas_fill, (lengths[:, None] - first).clamp(0, bs))  # [B, W]
        zeros = cache.constant(("flex_zeros", b), lambda: torch.zeros(b, cache.pool_blocks, dtype=torch.long,
                                                                        device=dev))
        row_fill = zeros.scatter_add(1, table, fill)  # [B, pool blocks]: filled positions of each of the row's pages
        num = (lengths.div(bs, rounding_mode="floor") + (lengths % bs > 0).long() + sb).to(torch.int32)

        def mask_mod(bi, h, qi, kv):
            return (kv % bs) < row_fill[bi, kv // bs]

        # kv_indices spans every KV block of the keys (the pool); entries past `num` are never read
        pad = cache.constant(("flex_pad", b, width), lambda: torch.zeros(b, cache.pool_blocks - width,
                                                                          dtype=torch.long, device=dev))
        indices = torch.cat([table, pad], 1).to(torch.int32)
        return BlockMask.from_kv_blocks(num[:, None, None], indices[:, None, None, :],
                                        BLOCK_SIZE=(rep * c, bs), mask_mod=mask_mod,
                                        seq_lengths=(rep * c, cache.pool_blocks * bs))

    def attend(self, layer: int, q, k, v):
        b, c, hq, d = q.shape
        hkv = k.shape[2]
        n_keys, write, mask, read = self._plan[self.cache.kept_size[layer], self.cache.sliding[layer]]
        bk, bv = self.cache.k[layer], self.cache.v[layer]
        bk.view(-1, hkv, d).index_copy_(0, write, k.reshape(b * c, hkv, d).to(bk.dtype))
        bv.view(-1, hkv, d).index_copy_(0, write, v.reshape(b * c, hkv, d).to(bv.dtype))
        rep = hq // hkv
        # Fold the query heads that share a KV head into the query axis: [B, Hkv, rep * C, d].
        qf = q.view(b, c, hkv, rep, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, rep * c, d)
        if read is not None and self.backend == "flex":  # the whole pool as keys [1, Hkv, blocks * bs, d], in place
            from torch.nn.attention.flex_attention import flex_attention

            keys = bk.view(-1, hkv, d).transpose(0, 1)[None]
            vals = bv.view(-1, hkv, d).transpose(0, 1)[None]
            out = flex_attention(qf, keys.to(q.dtype), vals.to(q.dtype), block_mask=self._block_mask, scale=1.0)
            return out.view(b, hkv, rep, c, d).permute(0, 3, 1, 2, 4).reshape(b, c, hq, d)
        if read is None:
            keys = bk[:b, :n_keys].transpose(1, 2)  # [B, Hkv, K, d], a view of the cache
            vals = bv[:b, :n_keys].transpose(1, 2)
        else:  # one gather of the rows' blocks, K and V together: [B, blocks, bs, Hkv, 2, d]
            blocks = self.cache.kv[layer][read].view(b, n_keys, hkv, 2, d)
            keys, vals = blocks[..., 0, :].transpose(1, 2), blocks[..., 1, :].transpose(1, 2)
        out = F.scaled_dot_product_attention(qf, keys, vals, attn_mask=mask, scale=1.0)
        return out.view(b, hkv, rep, c, d).permute(0, 3, 1, 2, 4).reshape(b, c, hq, d)
