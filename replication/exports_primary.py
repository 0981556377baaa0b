"""The exports of a primary (ARCHITECTURE §3), as nbdkit handles:
  ""           the volume, read-write
  snap/NAME    read-only image of snappoint NAME while it has a valid
               snapshot; block status: blocks written in the interval NAME
               closes are data (zeroed/trimmed ones: data + zero flag),
               every other block a hole *without* the zero flag.
  pack/NAME/BASE/FP
               read-only, not listed: the data pieces of the interval union
               (BASE, NAME] one after the other (replication/pack.py); FP
               must be the fingerprint of that union's run list
  info         read-only, not listed: JSON, what this node is (role,
               volume UUID, generation, geometry, what it was promoted
               from): what a failover asks of the old primary (--peer)
Opening or listing an export never changes state.  A connection to snap/
or pack/ (the agent's reads) is served at background CPU priority
(priority.background_priority): on a busy CPU the volume's writes go first.
"""
import errno
import json
import logging

import numpy as np

from . import pack, status
from .chain import union_run_array
from .errors import StateError
from .exports import DocHandle, Handle, parse_seq
from .priority import background_priority

log = logging.getLogger(__name__)

EXTENT_HOLE = 1     # nbdkit.EXTENT_HOLE
EXTENT_ZERO = 2     # nbdkit.EXTENT_ZERO
MAX_EXTENT_BLOCKS = 1 << 20   # blocks described per extents call at most
SNAP_PREFIX = "snap/"
PACK_PREFIX = "pack/"


def list_exports(t):
    """(name, description) of the listed exports of tracker t."""
    out = [("", f"prepl volume {t.body.volume} ({t.body.volume_uuid})")]
    for sp in t.body.snappoints:
        if t.snapshot(sp.name) is not None:
            out.append((SNAP_PREFIX + sp.name, f"snapshot at snappoint {sp.name}"))
    return out


def open_export(t, name, readonly):
    """The handle of export name of tracker t (OSError ENOENT/EINVAL)."""
    if name == "":
        return VolumeHandle(t, readonly or t.writes_refused)
    if name == "info":
        return DocHandle(json.dumps(status.primary_info(t), sort_keys=True).encode())
    if name.startswith(SNAP_PREFIX):
        snap = t.snapshot(name[len(SNAP_PREFIX):])
        if snap is not None:    # a reader of a snapshot is background work: its
            background_priority()     # connection's threads yield to the volume's
            return SnapHandle(t, name[len(SNAP_PREFIX):], snap)
    if name.startswith(PACK_PREFIX):
        handle = _open_pack(t, name)
        background_priority()
        return handle
    raise OSError(errno.ENOENT, f"unknown export {name[:200]!r}: exports are \"\" (the "
                  "volume) and snap/NAME for snappoints with a valid snapshot")


def _open_pack(t, name):
    parts = name.split("/")
    base = parse_seq(parts[2]) if len(parts) == 4 else None
    if len(parts) != 4 or (base is None and parts[2] != "none"):
        raise OSError(errno.EINVAL, "malformed pack export name: pack/NAME/BASE/FP takes "
                      "a snappoint, BASE 'none' or an interval number and a fingerprint")
    snap = t.snapshot(parts[1])
    if snap is None:
        raise OSError(errno.ENOENT, f"snappoint {parts[1][:64]!r} has no valid snapshot")
    with t.lock:
        try:
            target = t.interval_closed_by(parts[1]).seq
            if base is not None and base >= target:
                raise StateError(f"interval {base} is not before interval {target}")
            runs = union_run_array(t.sd, t.body, base, target)
        except (StateError, OSError) as e:
            log.error("refused pack export %r: %s", name[:200], e)
            raise OSError(errno.EINVAL, str(e))
    if pack.fingerprint(runs) != parts[3]:
        log.error("refused pack export %r: the run list of intervals (%s, %d] here has "
                  "fingerprint %s", name[:200], parts[2], target, pack.fingerprint(runs))
        raise OSError(errno.EINVAL, "the fingerprint does not match this server's run list")
    return PackHandle(t, snap, pack.Stream(runs))


class VolumeHandle(Handle):
    can_zero = True
    fua_native = True

    def __init__(self, tracker, readonly):
        vol = tracker.vol
        self.writable = not readonly
        self.can_zero = not readonly
        self.size = tracker.size
        # bound straight to the C binding: one Python frame less per request
        self.pread = vol.pread
        self.pwrite = vol.pwrite
        self.zero = vol.zero
        self.trim = vol.trim
        self.flush = vol.flush

    def extents(self, count, offset):
        return [(offset, count, 0)]


class SnapHandle(Handle):
    is_snapshot = True

    def __init__(self, tracker, name, snap):
        self.tracker = tracker
        self.name = name
        self.snap = snap
        self.size = tracker.size

    def pread(self, buf, offset):
        self.tracker.vol.snap_pread(self.snap.c, buf, offset)

    def extents(self, count, offset):
        t = self.tracker
        bs = t.body.block_size
        with t.lock:
            maps = t.interval_maps(t.interval_closed_by(self.name))
            b0 = offset // bs
            b1 = min(-(-(offset + count) // bs), t.nblocks, b0 + MAX_EXTENT_BLOCKS)
            w0 = b0 // 64
            w1 = -(-b1 // 64)
            lo, hi = b0 - w0 * 64, b1 - w0 * 64
            b = np.unpackbits(maps.bmap.bits[w0:w1].view(np.uint8), bitorder="little")[lo:hi]
            z = np.unpackbits(maps.zmap.bits[w0:w1].view(np.uint8), bitorder="little")[lo:hi]
        kind = np.where(b == 0, EXTENT_HOLE, np.where(z == 1, EXTENT_ZERO, 0))
        edges = np.flatnonzero(np.diff(kind)) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [len(kind)]))
        out = []
        for s, e in zip(starts.tolist(), ends.tolist()):
            start = (b0 + s) * bs
            end = min((b0 + e) * bs, self.size)
            out.append((start, end - start, int(kind[s])))
        return out


class PackHandle(Handle):
    """pack/NAME/BASE/FP: the interval's data pieces, packed."""

    def __init__(self, tracker, snap, stream):
        self.vol = tracker.vol
        self.snap = snap
        self.stream = stream
        self.size = stream.size

    def pread(self, buf, offset):
        mv = memoryview(buf)
        try:
            segments = self.stream.segments(offset, len(mv))
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e))
        self.vol.snap_pread_segments(self.snap.c, mv, segments)
