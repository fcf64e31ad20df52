"""The host-side allocator of the paged KV cache: fixed-size blocks, reference counts, and the prefix cache.

The full-attention layers keep their K/V in one pool of `num_blocks` blocks of `block_size` positions
(`kv_cache.KVCache`); this module decides which block holds what, in pure Python (no tensor is touched):

- a free list, a reference count per block, and *reservations*: the engine reserves, at admission, every block a
  request can ever need, and allocates them as the request grows, so a running request never fails to grow;
- the prefix cache: a full block of prompt tokens gets a content hash chained with the hash of the prefix before it
  (`chain_hash`, blake2b over the token ids' bytes: stable across processes, unlike Python's `hash`). A request whose
  prompt starts with the same full blocks shares them (`match_prefix` takes a reference on each);
- an LRU of cached blocks nobody references: they stay matchable until the allocator needs them, and are reused
  oldest first (`allocate` evicts them once the free list is empty). A cached block with references is never
  evicted.

Invariants (tests/test_block_pool.py checks them under random operation sequences): every block is exactly one of
free, cached-and-unreferenced (in the LRU) or referenced; a block is in the prefix table iff it has a hash; the
reserved count never exceeds what is free or evictable.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

ROOT_HASH = b""  # the chain hash "before" the first block


def chain_hash(parent: bytes, tokens, extra: bytes = b"") -> bytes:
    """The content hash of one full block of tokens following a prefix whose chain hash is `parent`. `extra` mixes in
    what else decides the block's K/V besides its token ids (an image's pixel digest)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent)
    h.update(len(extra).to_bytes(4, "little"))
    h.update(extra)
    h.update(b"".join(int(t).to_bytes(4, "little") for t in tokens))
    return h.digest()


class OutOfBlocksError(RuntimeError):
    """More blocks were asked for than are free, evictable and unreserved."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}  # block -> chain hash (cached blocks, referenced or not)
        self.table: dict[bytes, int] = {}  # chain hash -> block
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks with no reference, oldest first
        self.reserved = 0  # blocks promised to admitted requests, not yet allocated
        self.evictions = 0

    # -- counts --------------------------------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - len(self.free) - len(self.lru)

    @property
    def num_available(self) -> int:
        """Blocks a new reservation may take: free or evictable, less what is already reserved."""
        return len(self.free) + len(self.lru) - self.reserved

    # -- reservations and allocation ------------------------------------------------------------------------------
    def reserve(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot reserve {n} blocks")
        if n > self.num_available:
            raise OutOfBlocksError(f"cannot reserve {n} blocks: {self.num_available} available")
        self.reserved += n

    def unreserve(self, n: int) -> None:
        if not 0 <= n <= self.reserved:
            raise ValueError(f"cannot unreserve {n} of {self.reserved} reserved blocks")
        self.reserved -= n

    def allocate(self, n: int, reserved: bool = True) -> list[int]:
        """n blocks with one reference each: free ones first, then the least recently used cached ones (their hash
        is forgotten). `reserved`: the blocks come out of an earlier `reserve`."""
        if n > len(self.free) + len(self.lru) - (0 if reserved else self.reserved) or (reserved and n > self.reserved):
            raise OutOfBlocksError(f"cannot allocate {n} blocks: {len(self.free)} free, {len(self.lru)} evictable, "
                                   f"{self.reserved} reserved")
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.lru.popitem(last=False)
                del self.table[self.hash_of.pop(b)]
                self.evictions += 1
            self.refs[b] = 1
            out.append(b)
        if reserved:
            self.reserved -= n
        return out

    def release(self, blocks) -> None:
        """Drop one reference from each block; a block nobody holds goes to the LRU if it is cached, else to the
        free list. Pass a request's blocks in order: the tail is released first, so it is evicted first."""
        for b in reversed(list(blocks)):
            if self.refs[b] <= 0:
                raise RuntimeError(f"block {b} released more often than referenced")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.lru[b] = None
                else:
                    self.free.append(b)

    # -- the prefix cache -----------------------------------------------------------------------------------------
    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of leading block hashes found, one reference taken on each. An
        unreferenced cached block is taken only while that leaves every reservation covered."""
        out = []
        for h in hashes:
            b = self.table.get(h)
            if b is None:
                break
            if self.refs[b] == 0:
                if self.num_available < 1:  # taking it would break a reservation: the rest is recomputed
                    break
                del self.lru[b]
            self.refs[b] += 1
            out.append(b)
        return out

    def register(self, block: int, h: bytes) -> int:
        """Publish a full block under its chain hash. If the hash is already cached (another request filled the
        same content first), the existing block stays the cached one and `block` stays private; returns the
        cached block."""
        if self.refs[block] <= 0:
            raise RuntimeError(f"block {block} is not held")
        if block in self.hash_of:
            return block
        cached = self.table.get(h)
        if cached is not None:
            return cached
        self.table[h] = block
        self.hash_of[block] = h
        return block

    def check(self) -> None:
        """Assert the invariants (module doc); for tests."""
        free, lru = set(self.free), set(self.lru)
        assert len(free) == len(self.free), "a block is free twice"
        assert not free & lru
        for b in range(self.num_blocks):
            held = self.refs[b] > 0
            states = (b in free) + (b in lru) + held
            assert states == 1, f"block {b} is in {states} states"
            assert (b in lru) <= (b in self.hash_of)
        assert all(self.table[h] == b for b, h in self.hash_of.items()) and len(self.table) == len(self.hash_of)
        assert 0 <= self.reserved <= len(self.free) + len(self.lru)
