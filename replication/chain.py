"""The interval chain: its geometry and map files, and the union of closed
intervals (after, upto] as block maps, as any reader sees it (read-only from
the map files: closed maps never change; their digests are in the
metadata).  The server creates interval files here; replication/tracker.py
switches and merges them.

Every closed map is verified against its recorded digest before it is
used, and again whenever its file changed (its inode, size or times): a
damaged map never silently drops change bits.  A damaged interval raises
DamagedMapError naming the file; the metadata may also record an interval
as damaged (a damaged map merged into it, replication/tracker.py)."""
import os
import threading

import numpy as np

from . import manifest, native
from .maps import (DIGEST_PREFIX, KINDS, IntervalMaps, MapFile, digest_matches,
                   file_digest)
from .errors import DamagedMapError, StateError
from .meta import Interval, fsync_dir

_verified = {}            # path -> what it was verified as (stat + digest)
_verified_lock = threading.Lock()


def geometry(body):
    """(regions, blocks, activity-log extents) of the volume."""
    size, rs, bs = body.size, body.region_size, body.block_size
    return -(-size // rs), -(-size // bs), -(-size // body.al_extent)


def nbits(body, kind):
    """Bits of a map of that kind: a change map has one per region, every
    other map (block, zero, valid) one per block."""
    nregions, nblocks, _ = geometry(body)
    return nregions if kind == "cmap" else nblocks


def new_interval(seq, file_id):
    return Interval(seq, map_names(seq, file_id))


def map_names(seq, file_id):
    """{kind: file name} of interval seq's maps, file_id making them new."""
    return {k: f"i{seq}-{file_id}.{k}" for k in KINDS}


def create_interval_files(sd, body, names, sync=True):
    """An interval's map files, new and zero, named by names ({kind: file
    name}, as an Interval's maps); returns them mapped writable.  Durable
    with their directory entries on return, unless sync is False: then the
    caller calls sync_created once it has created the other files it needs
    (every allocation made before the first sync, one journal commit
    carries them all: a commit is a wait for the writers that meet it)."""
    maps = IntervalMaps(*(MapFile(sd.p("maps", names[k]), nbits(body, k),
                                  create=True, sync=False) for k in KINDS))
    if sync:
        sync_created(sd, maps)
    return maps


def sync_created(sd, maps, *more):
    """Makes new map files durable, with their directory entries: maps
    (IntervalMaps, or () if there are none) and more (MapFiles in maps/,
    e.g. a snapshot's valid map)."""
    if not (maps or more):
        return
    for m in (*maps, *more):
        m.sync()
    fsync_dir(sd.p("maps"))


def remove_files(paths):
    """Removes those of paths that exist: files an operation created before
    its record was written (the record failed, or a crash left them)."""
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


def open_interval_maps(sd, body, interval, writable=True):
    """The IntervalMaps of interval, mapped."""
    return IntervalMaps(*(MapFile(sd.p("maps", interval.maps[k]), nbits(body, k),
                                  writable=writable) for k in KINDS))


def check_closed_files(sd, body):
    """Every closed map exists and has its size, else the state directory
    is damaged beyond what replication can route around (StateError).
    Their contents are verified when they are used."""
    for iv in body.closed_intervals:
        for k in KINDS:
            p = sd.p("maps", iv.maps[k])
            try:
                have = os.stat(p).st_size
            except FileNotFoundError:
                raise StateError(f"map file {p} is missing: the state directory is damaged")
            want = native.words_for(nbits(body, k)) * 8
            if have != want:
                raise StateError(f"map file {p} has {have} bytes, expected {want}: the "
                                 "state directory is damaged")


def upgrade_digests(sd, md):
    """Format 1 recorded SHA-256 digests of closed maps; they become
    XXH3-128 digests of the same bytes (verified first; a map that does not
    match is recorded as damaged, never re-digested).  Returns how many
    intervals were converted."""
    legacy = [iv.seq for iv in md.body.closed_intervals
              if iv.digests and not all(d.startswith(DIGEST_PREFIX)
                                        for d in iv.digests.values())]
    if not legacy:
        return 0
    with md.change() as new:
        for iv in new.closed_intervals:
            if iv.seq not in legacy:
                continue
            for k in KINDS:
                if file_digest(sd.p("maps", iv.maps[k]), legacy=True) != iv.digests.get(k):
                    iv.damaged = f"digest mismatch of {iv.maps[k]} at the upgrade"
                    break
            else:
                iv.digests = {k: file_digest(sd.p("maps", iv.maps[k])) for k in KINDS}
    return len(legacy)


def verify_interval(sd, iv):
    """Raises DamagedMapError unless every map of the closed interval iv
    matches its recorded digest (cached while the file does not change)."""
    if iv.damaged:
        raise DamagedMapError(sd.path, iv.seq, sd.p("maps", iv.maps["cmap"]), iv.damaged)
    for k in KINDS:
        path = sd.p("maps", iv.maps[k])
        want = (iv.digests or {}).get(k)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DamagedMapError(sd.path, iv.seq, path, "the file is missing")
        key = _verify_key(st, want)
        with _verified_lock:
            if _verified.get(path) == key:
                continue
        if want is None:
            raise DamagedMapError(sd.path, iv.seq, path, "no digest is recorded")
        if not digest_matches(want, path):
            raise DamagedMapError(sd.path, iv.seq, path, "digest mismatch")
        with _verified_lock:
            _verified[path] = key


def _verify_key(st, digest):
    """What a verification is valid for: the file as stat saw it, and the
    digest it matched."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)


def verified_as_written(sd, iv):
    """The map files of the closed interval iv count as verified: their
    digests (recorded in iv) were computed from the bytes just written and
    made durable, so their next use need not read and hash them again.  A
    later change of a file changes its stat, and it is verified then."""
    for k in KINDS:
        path = sd.p("maps", iv.maps[k])
        key = _verify_key(os.stat(path), iv.digests[k])
        with _verified_lock:
            _verified[path] = key


def merge_into_closed(sd, new, src_bits, dst, dst_maps, into, fresh):
    """Deleting a snappoint whose next interval dst is closed: into (zero
    map files, IntervalMaps) become dst's maps, durable, with dst's bits
    (dst_maps) and those of the interval before it (src_bits: cmap, bmap,
    zmap) merged in; dst, in the body new (not yet written), names them
    and their digests.  fresh: into's directory entries are not durable yet
    (new files, not spare ones: replication/spares.py).  The caller
    removes into's files if this or the record fails."""
    nregions, nblocks, _ = geometry(new)
    for m, src in zip(into, dst_maps):
        m.bits[:] = src.bits
    native.merge_interval(into.bits(), src_bits, nregions, nblocks)
    if fresh:
        sync_created(sd, into)
    else:
        into.sync()
    dst.maps = into.names()
    dst.digests = into.digests()


def carry_damage(sd, new, src, dst, needing):
    """Deleting a snappoint merges its interval src into dst: a damaged map
    must not be laundered by the merge (the merged maps get fresh, matching
    digests).  In the body new (not yet written): dst is recorded as damaged
    while some link still needs it (needing(seq, body) names them), and the
    chain no longer holds every change since the volume was created
    (chain_truncated: no initial sync is skipped for a new link)."""
    why = None
    for iv in (src, dst) if dst.closed else (src,):
        try:
            verify_interval(sd, iv)
        except DamagedMapError as e:
            why = why or f"merged with damaged interval {iv.seq} ({e.path})"
    if why is None:
        return
    new.chain_truncated = True
    if needing(dst.seq, new):
        target = new.interval(dst.seq)
        target.damaged = target.damaged or why


def damaged_intervals(sd, body):
    """[(interval, DamagedMapError)] of the closed intervals of body."""
    out = []
    for iv in body.closed_intervals:
        try:
            verify_interval(sd, iv)
        except DamagedMapError as e:
            out.append((iv, e))
    return out


def interval_union(sd, body, after_seq, upto_seq):
    """(data_bits, zero_bits) over blocks for the closed intervals with
    after_seq < seq <= upto_seq (after_seq None: from the start).  Zero
    bits describe the end state: a block zeroed and later written is data."""
    nregions, nblocks, _ = geometry(body)
    words = native.words_for(nblocks)
    bmap = np.zeros(words, np.uint64)
    zmap = np.zeros(words, np.uint64)
    cmap = np.zeros(native.words_for(nregions), np.uint64)
    found = False
    for iv in body.closed_intervals:
        if (after_seq is not None and iv.seq <= after_seq) or iv.seq > upto_seq:
            continue
        verify_interval(sd, iv)
        m = open_interval_maps(sd, body, iv, writable=False)
        nb = np.array(m.bmap.bits[:words])
        nz = np.array(m.zmap.bits[:words])
        nc = np.array(m.cmap.bits)
        native.merge_interval((nc, nb, nz), (cmap, bmap, zmap), cmap.size * 64, nblocks)
        cmap, bmap, zmap = nc, nb, nz
        found = found or iv.seq == upto_seq
    if not found:
        raise StateError(f"interval {upto_seq} is not a closed interval of {sd}")
    return bmap & ~zmap, zmap


def union_runs(sd, body, after_seq, upto_seq):
    """The run list (manifest.runs) of interval_union(...): what a transfer
    of the intervals (after_seq, upto_seq] sends, as the agent, the pack
    export and the tests all see it."""
    data, zero = interval_union(sd, body, after_seq, upto_seq)
    return manifest.runs(data, zero, geometry(body)[1], body.block_size, body.size)


def union_run_array(sd, body, after_seq, upto_seq):
    """union_runs(...) as manifest.run_array."""
    data, zero = interval_union(sd, body, after_seq, upto_seq)
    return manifest.run_array(data, zero, geometry(body)[1], body.block_size, body.size)
