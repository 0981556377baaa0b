"""Snapshots of a primary: the point-in-time images behind snap/NAME.

What it owns: STATE/snaps/sN.img (sparse image of copied blocks) and
STATE/maps/sN.vmap (valid map: bit per block copied) of every snapshot,
and the set of snapshots the C write path copies into.  What it promises:

* A snapshot is served (snap/NAME, pack/NAME/...) exactly while it is
  recorded in the metadata and valid; its files go only after the record
  of its removal (files that no record names, left by a stop in between,
  are removed at the next start).
* A copy-on-write that fails (ENOSPC) invalidates its snapshot at once in
  C; collect_invalidated() drops it (export gone, space freed) and keeps
  the reason until the record is written -- the one exception to "memory
  follows the disk" (ARCHITECTURE §4).
* After an unclean stop no snapshot is trusted (replication/actlog.py).
* A converted or deleted snapshot's image leaves snaps/ at once (into
  STATE/trash/); its blocks are freed by a background thread a step at a
  time (workers.Reaper): an unlink of a file of scattered blocks costs
  tens of ms of kernel CPU, which the snappoint's caller and the writers
  on a busy CPU would otherwise wait for.  An invalidated snapshot's
  space is freed at once: its copy-on-write found the disk full.
"""
import logging
import os

from . import native
from .chain import nbits
from .errors import StateError
from .maps import MapFile
from .meta import SnapshotRecord, fsync_dir
from .workers import Reaper

log = logging.getLogger(__name__)

MAX_SNAPSHOTS = native.MAX_SNAPSHOTS     # PR_MAX_SNAPS of native/prepl.h


class Snapshot:
    """A snapshot of the volume at a snappoint: sparse image + valid map."""

    def __init__(self, sd, body, rec, create=False, sync=True):
        """rec: its meta.SnapshotRecord.  create: new files (their valid
        map durable on return unless sync is False, as MapFile's)."""
        self.id = rec.id
        self.img_path = sd.p("snaps", f"s{self.id}.img")
        self.vmap_path = sd.p("maps", f"s{self.id}.vmap")
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(self.img_path, flags, 0o600)
        if create:
            os.ftruncate(self.fd, body.size)
        elif os.fstat(self.fd).st_size != body.size:
            have = os.fstat(self.fd).st_size
            os.close(self.fd)
            raise StateError(f"snapshot image {self.img_path} has {have} bytes, expected "
                             f"{body.size}: it was damaged; refusing to serve it as a "
                             "snapshot (nothing was changed)")
        self.vmap = MapFile(self.vmap_path, nbits(body, "vmap"), create=create, sync=sync)
        self.c = native.Snapshot(self.fd, self.vmap.bits, self.vmap.nbits)
        # None: a whole image; else a snapshot of the changes after that
        # interval (replication/snappoints.py, snapshot_of_changes)
        self.changes_after = None

    def sync(self):
        os.fsync(self.fd)
        self.vmap.sync()

    def remove(self, vol, reaper=None):
        """Deletes the files; readers holding this object get ESTALE.  The
        image's space is freed at once, or by reaper in the background."""
        self.c.release(vol)
        for p in (self.img_path, self.vmap_path):
            try:
                if reaper is not None and p == self.img_path:
                    reaper.discard(p)
                else:
                    os.unlink(p)
            except FileNotFoundError:
                pass


class Snapshots:
    """The valid snapshots of a primary, by snappoint name."""

    def __init__(self, sd):
        self.sd = sd
        self.active = {}          # snappoint name -> Snapshot (valid ones)
        self.invalidated = {}     # snappoint name -> reason: dropped, not yet recorded
        self.reaper = Reaper(sd.p("trash"))     # started and closed by the tracker

    @staticmethod
    def open_recorded(sd, body):
        """[(name, Snapshot)] of the snapshots the metadata records (at start,
        before anything is written: a damaged image refuses the start)."""
        return [(sp.name, Snapshot(sd, body, sp.snapshot))
                for sp in body.snappoints if sp.snapshot]

    def remove_unknown(self, body):
        """Removes snapshot files that no snappoint of body names."""
        known = {f"s{sp.snapshot.id}.{ext}" for sp in body.snappoints
                 if sp.snapshot for ext in ("img", "vmap")}
        for d, ext in (("snaps", ".img"), ("maps", ".vmap")):
            for name in os.listdir(self.sd.p(d)):
                if name.endswith(ext) and name.startswith("s") and name not in known:
                    os.unlink(self.sd.p(d, name))

    def create(self, body, new_body, sync=True):
        """A new, empty snapshot with the next id of new_body (a copy of the
        metadata not yet written); its files are durable (but for its valid
        map's, unless sync: the caller's sync_created makes that durable
        with the other new maps)."""
        rec = SnapshotRecord(new_body.next_snap_id)
        new_body.next_snap_id += 1             # ids are never reused
        snap = Snapshot(self.sd, body, rec, create=True, sync=sync)
        fsync_dir(self.sd.p("snaps"))
        return snap

    def valid(self, name):
        """The valid Snapshot of snappoint name, or None."""
        snap = self.active.get(name)
        return snap if snap is not None and snap.c.valid else None

    def free(self, name, vol, now=False):
        """Stops copy-on-write into the snapshot of snappoint name and
        removes its files (after the record says it is gone, or never was);
        its space is freed in the background, or at once if now."""
        snap = self.active.pop(name, None)
        if snap is not None:
            vol.drop_snap(snap.c)
            snap.remove(vol, None if now else self.reaper)

    def collect_invalidated(self, names, vol):
        """Drops the snapshots (of snappoints in names) that the write path
        invalidated; returns {name: reason} of those still to be recorded."""
        for name in names:
            snap = self.active.get(name)
            if snap is not None and not snap.c.valid:
                reason = f"copy-on-write failed: {os.strerror(snap.c.error)}"
                log.error("snapshot of snappoint %s invalidated: %s", name, reason)
                self.free(name, vol, now=True)
                self.invalidated[name] = reason
        return self.invalidated

    def sync(self):
        for s in self.active.values():
            s.sync()

    def __len__(self):
        return len(self.active)
