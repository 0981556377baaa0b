"""The C bitmap library against a Python set model."""
import random
import threading

import numpy as np
import pytest

from replication import native


def model_runs(bits):
    out, run = [], None
    for i in sorted(bits):
        if run and run[0] + run[1] == i:
            run[1] += 1
        else:
            run = [i, 1]
            out.append(run)
    return [tuple(r) for r in out]


def as_set(m, nbits):
    return {i for i in range(nbits) if native.bm_test(m, nbits, i)}


@pytest.mark.parametrize("seed", range(40))
def test_ops_match_model(seed):
    rnd = random.Random(seed)
    nbits = rnd.choice([1, 63, 64, 65, 130, 1000, 4097])
    m = np.zeros(native.words_for(nbits), np.uint64)
    model = set()
    for _ in range(60):
        first = rnd.randrange(nbits)
        count = rnd.randint(0, nbits - first)
        if rnd.random() < 0.6:
            native.bm_set(m, nbits, first, count)
            model |= set(range(first, first + count))
        else:
            native.bm_clear(m, nbits, first, count)
            model -= set(range(first, first + count))
        assert native.bm_count(m, nbits) == len(model)
        start = rnd.randrange(nbits)
        nxt = min((i for i in model if i >= start), default=-1)
        assert native.bm_next_set(m, nbits, start) == nxt
        nclear = min((i for i in range(start, nbits) if i not in model), default=-1)
        assert native.bm_next_clear(m, nbits, start) == nclear
        s, n = native.bm_runs(m, nbits)
        assert list(zip(s.tolist(), n.tolist())) == model_runs(model)
    assert as_set(m, nbits) == model


def test_runs_with_limit_and_chunks():
    nbits = 300000
    m = np.zeros(native.words_for(nbits), np.uint64)
    bits = set(range(0, nbits, 3))          # 100000 runs: more than one C chunk
    for b in bits:
        native.bm_set(m, nbits, b)
    s, n = native.bm_runs(m, nbits)
    assert len(s) == 100000 and set(s.tolist()) == bits and set(n.tolist()) == {1}
    s, n = native.bm_runs(m, nbits, limit=10)
    assert s.tolist() == list(range(0, 30, 3))


def test_or_andnot_merge():
    rnd = random.Random(7)
    nbits = 1000
    w = native.words_for(nbits)
    a, b = (np.zeros(w, np.uint64) for _ in range(2))
    sa, sb = set(rnd.sample(range(nbits), 300)), set(rnd.sample(range(nbits), 300))
    for x in sa:
        native.bm_set(a, nbits, x)
    for x in sb:
        native.bm_set(b, nbits, x)
    o = a.copy()
    native.bm_or(o, b, nbits)
    assert as_set(o, nbits) == sa | sb
    d = a.copy()
    native.bm_andnot(d, b, nbits)
    assert as_set(d, nbits) == sa - sb


def test_merge_interval_zero_map():
    # src interval: blocks 0,1 written, 0 zeroed; dst: block 1 written as data, 2 zeroed
    nr, nb = 4, 8
    src = [np.zeros(1, np.uint64) for _ in range(3)]
    dst = [np.zeros(1, np.uint64) for _ in range(3)]
    native.bm_set(src[0], nr, 0); native.bm_set(src[1], nb, 0, 2); native.bm_set(src[2], nb, 0)
    native.bm_set(dst[0], nr, 1); native.bm_set(dst[1], nb, 1, 2); native.bm_set(dst[2], nb, 2)
    native.merge_interval(dst, src, nr, nb)
    assert as_set(dst[0], nr) == {0, 1}
    assert as_set(dst[1], nb) == {0, 1, 2}
    assert as_set(dst[2], nb) == {0, 2}     # block 1's later data write wins


def test_concurrent_setters_lose_nothing():
    nbits = 64 * 4
    m = np.zeros(native.words_for(nbits), np.uint64)
    def setter(k):
        for i in range(k, nbits, 8):
            native.bm_set(m, nbits, i)
    ts = [threading.Thread(target=setter, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert native.bm_count(m, nbits) == nbits


def test_bounds_are_checked():
    m = np.zeros(2, np.uint64)
    with pytest.raises(ValueError):
        native.bm_set(m, 128, 120, 9)
    with pytest.raises(ValueError):
        native.bm_test(m, 129, 0)           # map too small for nbits
    with pytest.raises(TypeError):
        native.bm_count(np.zeros(2, np.uint32), 64)
    ro = np.zeros(2, np.uint64)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        native.bm_set(ro, 128, 0)
