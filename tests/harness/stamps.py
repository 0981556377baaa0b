"""The soak's judge: stamped blocks and the writer's log.

A stamped block (stamp) holds (MAGIC, tag, write id, block number) repeated
over its 4 KiB, so whatever an image shows can be decoded back (decode) to
"never written" (0), "write W of this block" (W), or garbage (-1: torn,
misplaced or foreign).  WriterLog holds every (write id, block) a writer
issued and decides, for the decoded blocks of an image:

* cut(vis): is the image a point in time of the writer's history -- some W
  such that every block shows the last write <= W to it (I1)?
* lost(vis, flushed): which blocks lost a write that a completed flush
  covered (I2)?

tests/unit/test_stamps.py checks both against a brute-force model.
"""
import struct

import numpy as np

BLOCK = 4096
MAGIC = b"PREPLSOK"
MAGIC_U64 = struct.unpack("<Q", MAGIC)[0]


def stamp(tag, wid, b0, n):
    return b"".join(struct.pack("<8sQQQ", MAGIC, tag, wid, b) * (BLOCK // 32)
                    for b in range(b0, b0 + n))


def decode(chunk, first_block, tag):
    """Per block of chunk: 0 (all zero: never written), the write id of a
    valid stamp of this block, or -1 (anything else: torn, misplaced or
    foreign data)."""
    n = len(chunk) // BLOCK
    a = np.frombuffer(chunk, np.uint8).reshape(n, BLOCK // 32, 32)
    head = np.ascontiguousarray(a[:, 0, :])
    repeated = (a == head[:, None, :]).all(axis=(1, 2))
    q = head.view("<u8")
    ok = (repeated & (q[:, 0] == MAGIC_U64) & (q[:, 1] == tag)
          & (q[:, 3] == np.arange(first_block, first_block + n, dtype=np.uint64)))
    zero = ~a.reshape(n, -1).any(axis=1)
    return np.where(zero, 0, np.where(ok, q[:, 2].astype(np.int64), -1))


class WriterLog:
    """The writer's issued writes as (write id, block) pairs, sorted by block
    then id, for the point-in-time and lost-write checks."""

    INF = np.iinfo(np.int64).max

    def __init__(self, wids, blocks, nblocks):
        self.nblocks = nblocks
        self.m = int(wids.max()) + 2 if len(wids) else 2
        order = np.lexsort((wids, blocks))
        self.sb, self.sw = blocks[order], wids[order]
        self.keys = self.sb * self.m + self.sw
        self.idx = np.arange(nblocks, dtype=np.int64)

    def _at(self, pos):
        """(block, wid) at sorted positions (block -1 past the end)."""
        inside = pos < len(self.keys)
        p = np.where(inside, pos, 0)
        if not len(self.keys):
            return np.full(len(pos), -1), np.zeros(len(pos), np.int64)
        return np.where(inside, self.sb[p], -1), np.where(inside, self.sw[p], 0)

    def cut(self, vis):
        """Point-in-time check: returns None if some W makes every block show
        the last write <= W to it, else a description of the violation."""
        b = self.idx
        bad = vis < 0
        written = vis > 0
        q = b * self.m + np.where(written, vis, 0)
        pos = np.searchsorted(self.keys, q)
        pb, pw = self._at(pos)
        found = (pb == b) & (pw == vis)
        unknown = written & ~found           # a stamp of a write never issued to b
        # visible v: W in [v, next write to b after v - 1]
        nb, nw = self._at(pos + found.astype(np.int64))
        nxt = np.where(written, np.where(nb == b, nw, self.INF),
                       np.where(pb == b, pw, self.INF))   # never written: W < first
        lo = np.where(written, vis, 0)
        hi = np.where(nxt == self.INF, self.INF, nxt - 1)
        good = ~bad & ~unknown
        if not good.any():
            lo_max, hi_min = 0, self.INF
        else:
            lo_max, hi_min = int(lo[good].max()), int(hi[good].min())
        if not bad.any() and not unknown.any() and lo_max <= hi_min:
            return None
        return {"garbage_blocks": int(bad.sum()), "unknown_stamps": int(unknown.sum()),
                "latest_visible_write": lo_max,
                "earliest_overwritten_write": hi_min + 1 if hi_min != self.INF else None,
                "blocks_newer_than_cut": int((good & (lo > hi_min)).sum()),
                "first_blocks_newer": np.flatnonzero(good & (lo > hi_min))[:8].tolist(),
                "first_garbage_blocks": np.flatnonzero(bad | unknown)[:8].tolist()}

    def lost(self, vis, flushed):
        """Blocks whose last write <= flushed is neither visible nor
        overwritten by a later write of the writer: returns (count, first)."""
        b = self.idx
        pos = np.searchsorted(self.keys, b * self.m + flushed, side="right") - 1
        pb, pw = self._at(np.maximum(pos, 0))
        must = np.where((pos >= 0) & (pb == b), pw, 0)
        q = b * self.m + np.where(vis > 0, vis, 0)
        vpos = np.searchsorted(self.keys, q)
        vb, vw = self._at(vpos)
        valid = (vis > 0) & (vb == b) & (vw == vis)
        lost = (must > 0) & ~(valid & (vis >= must))
        where = np.flatnonzero(lost)
        return int(lost.sum()), [{"block": int(i), "flushed_write": int(must[i]),
                                  "shows": int(vis[i])} for i in where[:8]]
