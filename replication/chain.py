"""The interval chain as a reader outside the server sees it: the union of
closed intervals (after, upto] as block maps, read-only from the map files
(closed maps never change; their digests are in the metadata).

Every closed map is verified against its recorded digest before it is
used, and again whenever its file changed (its inode, size or times): a
damaged map never silently drops change bits.  A damaged interval raises
DamagedMapError naming the file; the metadata may also record an interval
as damaged (a damaged map merged into it, replication/tracker.py)."""
import os
import threading

import numpy as np

from . import manifest, native
from .maps import KINDS, MapFile, digest_matches
from .errors import StateError

_verified = {}            # path -> what it was verified as (stat + digest)
_verified_lock = threading.Lock()


class DamagedMapError(StateError):
    code = "damaged_map"

    def __init__(self, sd, iv, path, why):
        self.seq, self.path = iv["seq"], path
        super().__init__(
            f"closed map {path} of interval {iv['seq']} is damaged ({why}): the changes it "
            "records cannot be trusted. The volume is served as before; a link that needs "
            f"interval {iv['seq']} must be replicated again in full: "
            f"`prepl link resync {sd.path} LINK`")


def verify_interval(sd, iv):
    """Raises DamagedMapError unless every map of the closed interval iv
    matches its recorded digest (cached while the file does not change)."""
    if iv.get("damaged"):
        raise DamagedMapError(sd, iv, sd.p("maps", iv["maps"]["cmap"]), iv["damaged"])
    for k in KINDS:
        path = sd.p("maps", iv["maps"][k])
        want = (iv.get("digests") or {}).get(k)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DamagedMapError(sd, iv, path, "the file is missing")
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, want)
        with _verified_lock:
            if _verified.get(path) == key:
                continue
        if want is None:
            raise DamagedMapError(sd, iv, path, "no digest is recorded")
        if not digest_matches(want, path):
            raise DamagedMapError(sd, iv, path, "digest mismatch")
        with _verified_lock:
            _verified[path] = key


def damaged_intervals(sd, body):
    """[(interval, DamagedMapError)] of the closed intervals of body."""
    out = []
    for iv in body["intervals"][:-1]:
        try:
            verify_interval(sd, iv)
        except DamagedMapError as e:
            out.append((iv, e))
    return out


def interval_union(sd, body, after_seq, upto_seq):
    """(data_bits, zero_bits) over blocks for the closed intervals with
    after_seq < seq <= upto_seq (after_seq None: from the start).  Zero
    bits describe the end state: a block zeroed and later written is data."""
    nblocks = -(-body["size"] // body["block_size"])
    words = native.words_for(nblocks)
    bmap = np.zeros(words, np.uint64)
    zmap = np.zeros(words, np.uint64)
    cmap = np.zeros(native.words_for(-(-body["size"] // body["region_size"])), np.uint64)
    found = False
    for iv in body["intervals"]:
        if iv["closed_by"] is None:
            break
        if (after_seq is not None and iv["seq"] <= after_seq) or iv["seq"] > upto_seq:
            continue
        verify_interval(sd, iv)
        m = {k: MapFile(sd.p("maps", iv["maps"][k]),
                        nblocks if k != "cmap" else cmap.size * 64, writable=False)
             for k in ("cmap", "bmap", "zmap")}
        nb = np.array(m["bmap"].bits[:words])
        nz = np.array(m["zmap"].bits[:words])
        nc = np.array(m["cmap"].bits)
        native.merge_interval((nc, nb, nz), (cmap, bmap, zmap), cmap.size * 64, nblocks)
        cmap, bmap, zmap = nc, nb, nz
        found = found or iv["seq"] == upto_seq
    if not found:
        raise StateError(f"interval {upto_seq} is not a closed interval of {sd}")
    return bmap & ~zmap, zmap


def union_runs(sd, body, after_seq, upto_seq):
    """The run list (manifest.runs) of interval_union(...): what a transfer
    of the intervals (after_seq, upto_seq] sends, as the agent, the pack
    export and the tests all see it."""
    data, zero = interval_union(sd, body, after_seq, upto_seq)
    return manifest.runs(data, zero, -(-body["size"] // body["block_size"]),
                         body["block_size"], body["size"])
