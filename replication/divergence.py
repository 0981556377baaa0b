"""The divergence of two nodes after a failover (ARCHITECTURE §4a): the
blocks this node wrote after the divergence point, what a failback
overwrites, and when that is a split brain.

The rule (the README's "Split brain"): the old primary's writes after the
divergence point are its own to lose if none can have been made after the
failover -- its write clock (replication/writeclock.py) says no write was
accepted after WRITTEN, the promoted node recorded the failover at F, and
WRITTEN + CLOCK_MARGIN <= F proves it (the margin covers the two clocks'
skew and a stalled stamp).  Otherwise, and always on the promoted node
(its writes since the failover are after it by definition), writes after
the divergence point need --discard-my-data.  Nothing is discarded
without a report of it."""
import time

import numpy as np

from . import native
from .chain import geometry, verify_interval
from .errors import DamagedMapError

CLOCK_MARGIN = 2.0          # seconds two nodes' clocks may differ (and a stamp stall)


def written_after(t, point):
    """The block bits this tracker wrote after interval point (an
    IntervalRef of its chain): every interval after it, the open one too;
    (bits, None) -- or every block, with why, if point is not in the chain
    or a map after it is damaged."""
    b = t.body
    nblocks = geometry(b)[1]
    bits = np.zeros(native.words_for(nblocks), np.uint64)
    start = next((iv for iv in b.intervals if point is not None and iv.ref() == point), None)
    why = None if start else "the divergence point is not in this node's chain"
    for iv in b.intervals if start else ():
        if iv.seq <= start.seq:
            continue
        try:
            if iv.closed:
                verify_interval(t.sd, iv)
        except DamagedMapError as e:
            why = f"interval {iv.seq}'s maps are damaged ({e})"
            break
        bits |= t.interval_maps(iv).bmap.bits
    if why:
        native.bm_set(bits, nblocks, 0, nblocks)
    return bits, why


def report(t, bits, whole, mine, peer, promoted):
    """What a failback overwrites and whether it is a split brain."""
    b = t.body
    nblocks = geometry(b)[1]
    blocks = native.bm_count(bits, nblocks)
    after = [iv for iv in b.intervals if mine is not None and iv.seq > mine.seq]
    written = t.clock.written
    failover_at = peer.promoted.at if not promoted else b.promoted.at
    mine_after = blocks > 0 and (promoted or written + CLOCK_MARGIN > failover_at)
    return {
        "bytes": min(blocks * b.block_size, b.size), "blocks": blocks,
        "whole_volume": whole,
        "divergence": mine.to_json() if mine else None,
        "intervals": [iv.seq for iv in after],
        "first": mine.time if mine else None, "last_write": written or None,
        "activity_log_extents": (t.recovered or {}).get("al_extents", 0),
        "failover_at": failover_at,
        "peer_bytes": peer.written_since_failover,
        "peer_last_write": peer.last_write,
        "this_node_promoted": promoted,
        "split_brain": bool(mine_after),
        "clock_margin": CLOCK_MARGIN,
    }


def when(ts):
    """A time for operators: local, to the second ("?" if unknown)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "?"


def split_brain_message(t, r, uri):
    mine = (f"this node ({t.sd}) wrote {r['bytes']} bytes after the divergence point "
            f"(from {when(r['first'])} to {when(r['last_write'])} by its clock)")
    peer = (f"the peer at {uri} wrote {r['peer_bytes'] or 0} bytes since the failover "
            f"(from {when(r['failover_at'])} to {when(r['peer_last_write'])} by its clock)")
    why = ("it is the promoted node: its writes since the failover are the peer's to lose "
           "or its own" if r["this_node_promoted"] else
           f"some of them may have been made after the failover at {when(r['failover_at'])} "
           f"(within {CLOCK_MARGIN:g} s of clock margin, or later)")
    return (f"split brain: {mine}, and {why}; {peer}. Failing back would discard this node's "
            f"writes. If they are the ones to lose, run `prepl failback {t.sd} --peer {uri} "
            "--discard-my-data`; to keep them, run the failback with --discard-my-data on the "
            "peer instead. Nothing was changed")
