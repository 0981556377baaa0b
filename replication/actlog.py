"""The activity log of a primary, and recovery after an unclean stop.

What it owns: STATE/al, a header page (AL_MAGIC) and a bitmap of coarse
extents (al_extent bytes each).  The C write path makes a write's extent
durable in the log before the write's data can reach the disk (the first
write to an extent not in the log pays one fdatasync of the small log); a
snappoint trims the log to the extents of the new interval and of every
closed one whose data may not be durable yet (native/writepath.c,
replication/durability.py).  What it promises (invariant I2): after an unclean
stop, recover() rebuilds the open interval as (its surviving bits) OR
(every block of every extent in the log) OR (maps of an interval whose
switch had not reached the metadata), and no snapshot is trusted: all
become dataless.  No change bit is lost although the open maps are never
fsynced per write.
"""
import logging
import os

import numpy as np

from . import native
from .chain import geometry, nbits, open_interval_maps
from .maps import KINDS, MapFile
from .spares import is_spare

log = logging.getLogger(__name__)

AL_HEADER = 4096
AL_MAGIC = b"PREPL-AL\x01\x00\x00\x00\x00\x00\x00\x00"


class ActivityLog:
    def __init__(self, sd, body):
        self.sd = sd
        self.nextents = geometry(body)[2]
        self.fd = os.open(sd.p("al"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def words(self):
        return native.words_for(self.nextents)

    def read(self):
        """Extent bits of the log on disk (zeroes if never written)."""
        n = self.words()
        raw = os.pread(self.fd, AL_HEADER + n * 8, 0)
        if len(raw) < AL_HEADER or raw[:len(AL_MAGIC)] != AL_MAGIC:
            # never written: nothing was written through this server either,
            # since the first write writes the header before any data
            return np.zeros(n, dtype=np.uint64)
        bits = np.zeros(n, dtype=np.uint64)
        rest = raw[AL_HEADER:]
        bits[:len(rest) // 8] = np.frombuffer(rest[:len(rest) // 8 * 8], dtype=np.uint64)
        return bits

    def reset(self):
        """An empty, durable log with a header (after the maps are durable),
        written in full so that later page writes never need new space."""
        pages = -(-self.words() * 8 // AL_HEADER)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, AL_MAGIC.ljust(AL_HEADER, b"\0") + bytes(pages * AL_HEADER), 0)
        os.fdatasync(self.fd)

    def recover(self, md, snapshots):
        """Unclean stop: rebuilds the open interval (durable on return), then
        records every snapshot as dropped and removes their files.  Returns
        what it did (for status)."""
        sd, body = self.sd, md.body
        iv = body.open_interval
        for k in KINDS:
            p = sd.p("maps", iv.maps[k])
            if not os.path.exists(p):
                MapFile(p, nbits(body, k), create=True)
        maps = open_interval_maps(sd, body, iv)
        merged_orphans = self._merge_orphans(body, iv, maps)
        extents = self._mark_logged_extents(body, maps)
        maps.sync()
        dropped = []
        with md.change() as new:
            for sp in new.snappoints:
                if sp.snapshot:
                    sp.snapshot = None
                    sp.invalidated = "unclean stop: snapshot not trusted"
                    dropped.append(sp.name)
        # the record first, then the files (a stop in between leaves files
        # that no snappoint names: removed at the next start)
        snapshots.remove_unknown(md.body)
        log.warning("recovered from an unclean stop: %d activity-log extents marked changed, "
                    "%d orphan maps merged, snapshots dropped: %s", extents, merged_orphans,
                    ", ".join(dropped) or "none")
        return {"al_extents": extents, "orphan_maps_merged": merged_orphans,
                "snapshots_dropped": dropped}

    def _merge_orphans(self, body, iv, maps):
        """Maps of intervals after the open one that the metadata does not
        know (a switch whose record was never written; spare maps, which
        such a switch may have taken, replication/spares.py) are OR-ed into
        the open interval; other unknown interval maps are removed."""
        known = {f for i in body.intervals for f in i.maps.values()}
        known |= {f"s{sp.snapshot.id}.vmap" for sp in body.snappoints if sp.snapshot}
        merged = 0
        for name in sorted(os.listdir(self.sd.p("maps"))):
            if name in known:
                continue
            seq, kind = _parse_map_name(name)
            p = self.sd.p("maps", name)
            later = is_spare(name) or (seq is not None and seq > iv.seq)
            if later and kind in ("cmap", "bmap"):
                orphan = MapFile(p, nbits(body, kind), writable=False)
                native.bm_or(getattr(maps, kind).bits, orphan.bits, orphan.nbits)
                merged += 1
            os.unlink(p)
        return merged

    def _mark_logged_extents(self, body, maps):
        """Every block of every extent in the log counts as written (data,
        not zero) in the open interval; returns the number of extents."""
        nregions, nblocks, _ = geometry(body)
        rs, bs, ext = body.region_size, body.block_size, body.al_extent
        starts, lengths = native.bm_runs(self.read(), self.nextents)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            lo, hi = s * ext, min((s + n) * ext, body.size)
            native.bm_set(maps.cmap.bits, nregions, lo // rs, -(-hi // rs) - lo // rs)
            b0, b1 = lo // bs, -(-hi // bs)
            native.bm_set(maps.bmap.bits, nblocks, b0, b1 - b0)
            native.bm_clear(maps.zmap.bits, nblocks, b0, b1 - b0)
        return int(lengths.sum()) if len(lengths) else 0


def _parse_map_name(name):
    """'i12-7.cmap' -> (12, 'cmap'); other names -> (None, kind)."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("i") and "-" in stem:
        try:
            return int(stem[1:].split("-")[0]), kind
        except ValueError:
            pass
    return None, kind
