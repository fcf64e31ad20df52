"""The KV cache of committed tokens, and the two kinds of forward segment that use it.

`KVCache` is preallocated per sequence *slot*, with a per-slot length, so one forward can batch many sequences of
different lengths. Full-attention layers keep every position up to `capacity`. Sliding layers keep only the last
`sliding_window - 1` positions (exactly what the reference's sliding cache keeps, and all that a sliding query can
see), so a 262,144-token context costs full-length KV only in the full layers.

Buffers are laid out [slot, position, kv_head, head_dim], so writing a row's new tokens is one contiguous copy.
Sliding buffers hold a slot's last `min(length, window)` tokens left-aligned, oldest first.

- `EncodeSegment`: causal rows (prompt prefill, canvas commit). Attends to the cache plus its own tokens, causally,
  with the sliding window; appends its tokens to the cache; `finish()` advances the slot lengths.
- `DecodeSegment`: bidirectional canvases. Attends to the cache (sliding layers: the whole kept window) plus the
  whole canvas. Reads only. Exact: each row attends alone, over exactly its own keys (the batch-invariant twin of
  the reference).
- `CanvasSegment`: the fast decode (batch invariance off). Rows are the slots `[0, B)`; each layer writes the
  canvas K/V into a per-slot *scratch tail* of the cache (the `scratch` positions after the kept ones, never
  committed), so the keys are read in place as a view, without any gather or concatenation of the prefix; the
  grouped KV heads are folded into the query axis; one SDPA call per layer with a per-row key-length mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TextConfig
from . import batch_invariant
from .model import attention


class KVCache:
    def __init__(self, cfg: TextConfig, num_slots: int, capacity: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", scratch: int = 0):
        if capacity <= 0 or num_slots <= 0 or scratch < 0:
            raise ValueError(f"KVCache needs num_slots > 0, capacity > 0 and scratch >= 0, got {num_slots}, "
                             f"{capacity} and {scratch}")
        self.cfg, self.num_slots, self.capacity, self.scratch = cfg, num_slots, capacity, scratch
        self.window = cfg.sliding_window - 1  # tokens a sliding layer keeps
        self.k: list[torch.Tensor] = []  # per layer: [slots, positions kept + scratch, kv_heads, head_dim]
        self.v: list[torch.Tensor] = []
        self.sliding: list[bool] = []
        self.kept_size: list[int] = []  # per layer: committed positions a slot keeps (the scratch tail follows)
        for i in range(cfg.num_hidden_layers):
            sliding = cfg.is_sliding(i)
            size = min(capacity, self.window) if sliding else capacity
            shape = (num_slots, size + scratch, cfg.layer_kv_heads(i), cfg.layer_head_dim(i))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
            self.sliding.append(sliding)
            self.kept_size.append(size)
        self.lengths = torch.zeros(num_slots, dtype=torch.long)  # [slots] committed tokens (positions) per slot
        self.host_lengths = [0] * num_slots  # the same numbers as Python ints (read without a device sync)
        self.dev_lengths = torch.zeros(num_slots, dtype=torch.long, device=device)  # and on the cache's device
        self._constants: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def bytes_needed(cfg: TextConfig, num_slots: int, capacity: int, dtype: torch.dtype, scratch: int = 0) -> int:
        per = torch.empty((), dtype=dtype).element_size()
        total = 0
        for i in range(cfg.num_hidden_layers):
            size = min(capacity, cfg.sliding_window - 1) if cfg.is_sliding(i) else capacity
            total += 2 * (size + scratch) * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i)
        return total * per * num_slots

    def constant(self, key: tuple, make) -> torch.Tensor:
        """A read-only index tensor of the fast decode, made once per shape (`make()`) and reused by every step."""
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = make()
        return t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self, slot: int) -> None:
        self.set_lengths([slot], [0])

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

    def gather(self, layer: int, slots: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n kept positions of each slot's buffer: k, v [B, n, Hkv, d] (a view when slots is one slot)."""
        k, v = self.k[layer], self.v[layer]
        if slots.numel() == 1:
            s = int(slots[0])
            return k[s:s + 1, :n], v[s:s + 1, :n]
        return k[slots, :n], v[slots, :n]

    def append(self, layer: int, slot: int, length: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a row's new tokens k/v [n, Hkv, d] after `length` committed tokens."""
        n = k.shape[0]
        bk, bv = self.k[layer], self.v[layer]
        size = self.kept_size[layer]
        if not self.sliding[layer]:
            if length + n > size:
                raise RuntimeError(f"KV cache slot {slot} overflow: {length} + {n} > capacity {size}")
            bk[slot, length:length + n] = k
            bv[slot, length:length + n] = v
            return
        old = min(length, size)
        keep_old = max(0, min(old, size - n))  # old tokens that stay, shifted to the front
        if keep_old and keep_old < old:
            bk[slot, :keep_old] = bk[slot, old - keep_old:old].clone()
            bv[slot, :keep_old] = bv[slot, old - keep_old:old].clone()
        take = min(n, size)
        bk[slot, keep_old:keep_old + take] = k[n - take:]
        bv[slot, keep_old:keep_old + take] = v[n - take:]


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
        self._masks: dict[tuple[int, bool], tuple[int, torch.Tensor]] = {}  # (buffer size, sliding) -> (kept, mask)
        self.window = cache.cfg.sliding_window

    def _mask(self, layer: int) -> tuple[int, torch.Tensor]:
        size = self.cache.kept_size[layer]
        key = (size, self.cache.sliding[layer])
        if key not in self._masks:
            dev = self.input_ids.device
            kept = self.cache.kept(layer, self.start).to(dev)  # [B]
            kc = int(kept.max()) if kept.numel() else 0
            width = self.input_ids.shape[1]
            start = self.start.to(dev)
            qpos = self.positions  # [B, L]
            # cached key j of row b sits at position start_b - kept_b + j
            cpos = (start - kept)[:, None] + torch.arange(kc, device=dev)
            cvalid = torch.arange(kc, device=dev)[None] < kept[:, None]
            npos = self.positions
            nvalid = torch.arange(width, device=dev)[None] < self.n_new.to(dev)[:, None]
            kpos = torch.cat([cpos, npos], 1)  # [B, K]
            kvalid = torch.cat([cvalid, nvalid], 1)
            m = kvalid[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
            if self.cache.sliding[layer]:
                m &= (qpos[:, :, None] - kpos[:, None, :]) < self.window
            if self.image_blocks is not None:  # [vision] an image's tokens see each other (every layer type)
                blk = self.image_blocks.to(dev)
                m[:, :, kc:] |= (blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0) & nvalid[:, None, :]
            self._masks[key] = (kc, m)
        return self._masks[key]

    def attend(self, layer: int, q, k, v):
        kc, mask = self._mask(layer)
        if batch_invariant.enabled():
            out = self._attend_rows(layer, q, k, v, kc, mask)
        else:
            if kc:
                ck, cv = self.cache.gather(layer, self.slots, kc)
                keys, vals = torch.cat([ck.to(k.dtype), k], 1), torch.cat([cv.to(v.dtype), v], 1)
            else:
                keys, vals = k, v
            out = attention(q, keys, vals, mask)
        for b in range(q.shape[0]):
            n = int(self.n_new[b])
            self.cache.append(layer, int(self.slots[b]), int(self.start[b]), k[b, :n].detach(), v[b, :n].detach())
        return out

    def _attend_rows(self, layer, q, k, v, kc, mask):
        """Each row with its exact query and key lengths, so its result cannot depend on its batch mates."""
        out = torch.zeros_like(q)
        kept = self.cache.kept(layer, self.start)
        for b in range(q.shape[0]):
            n, c = int(self.n_new[b]), int(kept[b])
            ck, cv = self.cache.gather(layer, self.slots[b:b + 1], c)
            keys = torch.cat([ck.to(k.dtype), k[b:b + 1, :n]], 1)
            vals = torch.cat([cv.to(v.dtype), v[b:b + 1, :n]], 1)
            m = torch.cat([mask[b:b + 1, :n, :c], mask[b:b + 1, :n, kc:kc + n]], 2)
            out[b:b + 1, :n] = attention(q[b:b + 1, :n], keys, vals, m)
        return out

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
    on B only, never on which slots are busy, which is what a captured step needs. Per layer, the canvas K/V is
    written into the slot's scratch tail, right after its kept positions, and the keys [0, key_len) of the slots are
    read in place; a row's keys past its own kept + canvas length are masked out.

    `key_lens` maps a cache buffer size to the number of key positions to read (the host knows every slot's length,
    so the engine picks it without a device sync; see `key_bucket`)."""

    causal = False

    def __init__(self, cache: KVCache, canvas: torch.Tensor, lengths: torch.Tensor, sc_embeds: torch.Tensor | None,
                 key_lens: dict[int, int], mask_dtype: torch.dtype):
        self.cache, self.input_ids, self.sc_embeds = cache, canvas, sc_embeds
        b, c = canvas.shape
        dev = canvas.device
        self.positions = lengths[:, None] + cache.constant(("arange", c), lambda: torch.arange(c, device=dev))
        self._plan: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        for size in sorted(set(cache.kept_size)):
            kept = lengths if size >= cache.capacity else lengths.clamp(max=size)  # full layers keep everything
            buf = size + cache.scratch  # positions per slot in this buffer
            # flat (slot, position) of each canvas token: slot * buf + kept + j
            grid = cache.constant(("grid", b, c, buf), lambda: (torch.arange(b, device=dev) * buf)[:, None]
                                  + torch.arange(c, device=dev))
            write = (grid + kept[:, None]).reshape(-1)  # [B*C]
            n_keys = min(key_lens[size], buf)
            # key j of a row is masked when j >= kept + C, i.e. j - C >= kept
            keys = cache.constant(("keys", n_keys, c), lambda: torch.arange(-c, n_keys - c, device=dev)[None, None, None])
            zeros = cache.constant(("zeros", b, n_keys, mask_dtype),
                                   lambda: torch.zeros(b, 1, 1, n_keys, dtype=mask_dtype, device=dev))
            mask = zeros.masked_fill(keys >= kept[:, None, None, None], float("-inf"))
            self._plan[size] = (n_keys, write, mask)

    def attend(self, layer: int, q, k, v):
        b, c, hq, d = q.shape
        hkv = k.shape[2]
        n_keys, write, mask = self._plan[self.cache.kept_size[layer]]
        bk, bv = self.cache.k[layer], self.cache.v[layer]
        bk.view(-1, hkv, d).index_copy_(0, write, k.reshape(b * c, hkv, d).to(bk.dtype))
        bv.view(-1, hkv, d).index_copy_(0, write, v.reshape(b * c, hkv, d).to(bv.dtype))
        keys = bk[:b, :n_keys].transpose(1, 2)  # [B, Hkv, K, d], a view of the cache
        vals = bv[:b, :n_keys].transpose(1, 2)
        rep = hq // hkv
        # Fold the query heads that share a KV head into the query axis: [B, Hkv, rep * C, d].
        qf = q.view(b, c, hkv, rep, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, rep * c, d)
        out = F.scaled_dot_product_attention(qf, keys, vals, attn_mask=mask, scale=1.0)
        return out.view(b, hkv, rep, c, d).permute(0, 3, 1, 2, 4).reshape(b, c, hq, d)
