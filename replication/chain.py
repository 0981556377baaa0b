"""The interval chain as a reader outside the server sees it: the union of
closed intervals (after, upto] as block maps, read-only from the map files
(closed maps never change; their digests are in the metadata)."""
import numpy as np

from . import manifest, native
from .maps import MapFile
from .errors import StateError


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
