"""The paged KV cache's host allocator (dgemma/block_pool.py): reference counts, reservations, the prefix table and
its LRU eviction order, checked on hand cases and on random operation sequences (hypothesis)."""

import pytest
from hypothesis import given, settings, strategies as st

from dgemma.block_pool import ROOT_HASH, BlockPool, OutOfBlocksError, chain_hash


def hashes(tokens, bs, extra=b""):
    out, h = [], ROOT_HASH
    for i in range(0, len(tokens) - bs + 1, bs):
        h = chain_hash(h, tokens[i:i + bs], extra)
        out.append(h)
    return out


def test_chain_hash_depends_on_prefix_content_and_extra():
    a = chain_hash(ROOT_HASH, [1, 2, 3])
    assert a == chain_hash(ROOT_HASH, [1, 2, 3])  # stable (no Python hash randomisation)
    assert a != chain_hash(ROOT_HASH, [1, 2, 4])
    assert chain_hash(a, [5, 6]) != chain_hash(chain_hash(ROOT_HASH, [1, 2, 4]), [5, 6])  # same block, other prefix
    assert chain_hash(ROOT_HASH, [1, 2, 3], b"img") != a
    assert chain_hash(ROOT_HASH, [256]) != chain_hash(ROOT_HASH, [1, 0])  # ids are fixed-width, not concatenated text


def test_refcounts_share_and_free():
    pool = BlockPool(4, 2)
    pool.reserve(2)
    a = pool.allocate(2)
    hs = hashes([1, 2, 3, 4], 2)
    for b, h in zip(a, hs):
        assert pool.register(b, h) == b
    assert pool.num_used == 2
    hit = pool.match_prefix(hashes([1, 2, 3, 4, 5, 6], 2))
    assert hit == a and [pool.refs[b] for b in a] == [2, 2]
    pool.release(a)
    assert pool.num_used == 2  # still held by the second request
    pool.release(hit)
    assert pool.num_used == 0 and len(pool.lru) == 2 and len(pool.free) == 2
    with pytest.raises(RuntimeError):
        pool.release([a[0]])  # no double free
    pool.check()


def test_lru_evicts_oldest_unreferenced_tail_first():
    pool = BlockPool(4, 1)
    pool.reserve(4)
    x = pool.allocate(2)
    y = pool.allocate(2)
    for blocks, toks in ((x, [1, 2]), (y, [3, 4])):
        for b, h in zip(blocks, hashes(toks, 1)):
            pool.register(b, h)
    pool.release(x)  # x's tail, then x's head enter the LRU
    pool.release(y)
    assert list(pool.lru) == [x[1], x[0], y[1], y[0]]
    pool.reserve(1)
    assert pool.allocate(1) == [x[1]]  # the oldest: x's tail
    assert pool.match_prefix(hashes([1, 2], 1)) == [x[0]]  # x's head is still cached; its tail is gone
    assert pool.evictions == 1
    pool.check()


def test_reservations_are_never_broken():
    pool = BlockPool(3, 1)
    pool.reserve(2)
    with pytest.raises(OutOfBlocksError):
        pool.reserve(2)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2, reserved=False)  # only one is unreserved
    b = pool.allocate(1, reserved=False)
    pool.register(b[0], hashes([7], 1)[0])
    pool.release(b)
    assert pool.num_available == 1
    pool.reserve(1)  # now every free or evictable block is promised
    assert pool.match_prefix(hashes([7], 1)) == []  # taking the cached block would break a reservation
    assert pool.allocate(3) and pool.reserved == 0
    pool.check()


def test_register_keeps_first_block_for_a_hash():
    pool = BlockPool(2, 2)
    pool.reserve(2)
    a, b = pool.allocate(2)
    h = hashes([1, 2], 2)[0]
    assert pool.register(a, h) == a
    assert pool.register(b, h) == a  # b stays private and goes to the free list when released
    pool.release([a, b])
    assert list(pool.free) == [b] and list(pool.lru) == [a]
    pool.check()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "grow", "finish"]), st.integers(0, 7), st.integers(0, 3)),
                max_size=60))
def test_random_operations_keep_the_invariants(ops):
    bs, pool = 2, BlockPool(10, 2)
    reqs: list[dict] = []
    for op, a, b in ops:
        if op == "admit":
            toks = [a % 3, b] * (a + 1)  # few distinct prefixes, so hits happen
            hs = hashes(toks, bs)
            hit = pool.match_prefix(hs)
            need = len(toks) // bs + 1 - len(hit)
            if need > pool.num_available:
                pool.release(hit)
            else:
                pool.reserve(need)
                reqs.append(dict(blocks=list(hit), hs=hs, left=need))
        elif op == "grow" and reqs:
            r = reqs[a % len(reqs)]
            if r["left"]:
                (blk,) = pool.allocate(1)
                r["left"] -= 1
                i = len(r["blocks"])
                r["blocks"].append(blk)
                if i < len(r["hs"]):
                    pool.register(blk, r["hs"][i])
        elif op == "finish" and reqs:
            r = reqs.pop(a % len(reqs))
            pool.release(r["blocks"])
            pool.unreserve(r["left"])
        pool.check()
        assert pool.num_used == len({x for r in reqs for x in r["blocks"]})
    for r in reqs:
        pool.release(r["blocks"])
        pool.unreserve(r["left"])
    pool.check()
    assert pool.num_used == 0 and pool.reserved == 0
