"""The soak's judge (tests/harness/stamps.py) against an independent,
brute-force model: if the judge were wrong, the soak could pass with a
divergent replica or a lost write."""
import random

import numpy as np
import pytest

from tests.harness.stamps import BLOCK, WriterLog, decode, stamp

TAG = 77


def history(rnd, nblocks, nwrites):
    """A writer's log: write w (1..nwrites) covers 1-3 consecutive blocks."""
    log = []
    for w in range(1, nwrites + 1):
        n = rnd.choice((1, 1, 2, 3))
        b0 = rnd.randrange(nblocks - n + 1)
        log += [(w, b) for b in range(b0, b0 + n)]
    return log


def image_at(log, nblocks, cut):
    """What every block shows at point W=cut: the last write <= cut."""
    vis = np.zeros(nblocks, np.int64)
    for w, b in log:
        if w <= cut:
            vis[b] = max(vis[b], w)
    return vis


def model_is_cut(log, nblocks, vis):
    """Brute force: some W makes the image the history at W."""
    if (vis < 0).any():
        return False
    return any((image_at(log, nblocks, w) == vis).all()
               for w in range(0, max((w for w, _ in log), default=0) + 1))


def model_lost(log, nblocks, vis, flushed):
    """Brute force: blocks whose last write <= flushed is neither shown nor
    overwritten by a later write that the block shows."""
    lost = []
    for b in range(nblocks):
        must = max((w for w, bb in log if bb == b and w <= flushed), default=0)
        shown = int(vis[b])
        valid = shown > 0 and (shown, b) in set(log)
        if must and not (valid and shown >= must):
            lost.append(b)
    return lost


def judge(log, nblocks):
    w = np.array([x for x, _ in log], np.int64)
    b = np.array([y for _, y in log], np.int64)
    return WriterLog(w, b, nblocks)


def test_stamp_decodes_back():
    data = stamp(TAG, 42, 10, 3)
    assert len(data) == 3 * BLOCK
    assert decode(data, 10, TAG).tolist() == [42, 42, 42]
    assert decode(bytes(BLOCK), 0, TAG).tolist() == [0]                  # never written
    assert decode(data[:BLOCK], 11, TAG).tolist() == [-1]                # misplaced
    assert decode(stamp(TAG + 1, 5, 0, 1), 0, TAG).tolist() == [-1]      # foreign
    torn = data[:BLOCK // 2] + stamp(TAG, 43, 10, 1)[BLOCK // 2:]
    assert decode(torn, 10, TAG).tolist() == [-1]                        # torn
    flipped = bytearray(data[:BLOCK])
    flipped[1000] ^= 1
    assert decode(bytes(flipped), 10, TAG).tolist() == [-1]


@pytest.mark.parametrize("seed", range(40))
def test_cut_agrees_with_the_model(seed):
    rnd = random.Random(seed)
    nblocks = rnd.randint(4, 24)
    log = history(rnd, nblocks, rnd.randint(1, 30))
    j = judge(log, nblocks)
    top = max(w for w, _ in log)
    for w in range(top + 1):                       # every true point in time passes
        assert j.cut(image_at(log, nblocks, w)) is None
    for _ in range(30):                             # mixes of two points in time
        a, b = sorted(rnd.randint(0, top) for _ in range(2))
        va, vb = image_at(log, nblocks, a), image_at(log, nblocks, b)
        vis = np.where(np.array([rnd.random() < 0.5 for _ in range(nblocks)]), va, vb)
        if rnd.random() < 0.1:
            vis[rnd.randrange(nblocks)] = -1        # garbage
        if rnd.random() < 0.1:
            vis[rnd.randrange(nblocks)] = top + 5   # a write never issued
        assert (j.cut(vis) is None) == model_is_cut(log, nblocks, vis), (log, vis.tolist())


@pytest.mark.parametrize("seed", range(40))
def test_lost_agrees_with_the_model(seed):
    rnd = random.Random(1000 + seed)
    nblocks = rnd.randint(4, 24)
    log = history(rnd, nblocks, rnd.randint(1, 30))
    j = judge(log, nblocks)
    top = max(w for w, _ in log)
    for _ in range(30):
        flushed = rnd.randint(0, top)
        vis = image_at(log, nblocks, rnd.randint(0, top))
        for _ in range(rnd.randint(0, 3)):          # a power cut loses some blocks
            vis[rnd.randrange(nblocks)] = rnd.choice((0, -1, rnd.randint(1, top)))
        count, first = j.lost(vis, flushed)
        want = model_lost(log, nblocks, vis, flushed)
        assert count == len(want) and [x["block"] for x in first] == want[:8]


def test_a_flushed_write_that_is_gone_is_lost_and_a_later_one_covers_it():
    log = [(1, 0), (2, 1), (3, 0)]
    j = judge(log, 2)
    assert j.lost(np.array([0, 2]), 2)[0] == 1            # write 1 of block 0 is gone
    assert j.lost(np.array([3, 2]), 2)[0] == 0            # write 3 overwrote it
    assert j.lost(np.array([1, 0]), 1)[0] == 0            # write 2 was never flushed
    assert j.cut(np.array([3, 0])) is not None            # 3 without 2: no point in time
    assert j.cut(np.array([1, 2])) is None                # W = 2
