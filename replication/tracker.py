"""The tracked volume, as the server holds it: the interval chain.

What it owns: the state directory of a primary while its server runs (it
holds the lock): the volume, the open interval's maps, the closed ones
(mapped when used) and the C write path (replication/native.py).  It
delegates the snappoint operations (replication/snappoints.py), the
snapshots (replication/snapshots.py), the map files made ahead
(replication/spares.py), the activity log and recovery
(replication/actlog.py), the links (replication/links.py) and the metadata
file (replication/meta.py).  What it promises:

* One chain of intervals.  Interval k has a change map (bit per region), a
  block map (bit per block written) and a zero map (bit per block that was
  zeroed or trimmed entirely and not written since).  A snappoint closes
  the open interval and opens the next one; the C write path switches maps
  atomically with respect to in-flight writes.
* A start changes nothing until every file is opened and checked; after
  an unclean stop it recovers (replication/actlog.py) before it serves.
* A clean stop makes the volume, the maps and the snapshots durable before
  the metadata says clean.
* Memory follows the disk: every change of the metadata is written durably
  before anything in memory or any export shows it (replication/meta.py).
"""
import errno
import logging
import os
import threading

import numpy as np

from . import faults, native, status
from .actlog import AL_HEADER, ActivityLog
from .chain import check_closed_files, damaged_intervals, geometry, open_interval_maps, \
    upgrade_digests, verified_as_written
from .durability import DEFAULT_INTERVAL, VolumeDurability
from .errors import NotFoundError, RefusedError, StateError
from .links import Links
from .meta import Metadata
from .snappoints import Snappoints
from .snapshots import Snapshots
from .spares import SpareMaps, remove_spares
from .state import StateDir, volume_size
from .writeclock import WriteClock

log = logging.getLogger(__name__)

_MISSING = object()


class Tracker:
    def __init__(self, path, lockfile=None, force=False, sync_interval=DEFAULT_INTERVAL):
        """lockfile: the state directory's lock, taken already (a failover
        hands over the replica's); else it is taken here.  force: serve ""
        read-write although this primary is superseded (`serve --force`).
        sync_interval: seconds between the volume's durable points
        (`serve --sync-interval`, replication/durability.py)."""
        self.sd = StateDir(path)
        self.force = force
        self.lock = threading.RLock()
        body = self.sd.read_meta()
        if body.role != "primary":
            raise StateError(f"{self.sd} is a {body.role} state directory; serving a "
                             "secondary's replica is not supported by this version yet")
        self._lockfile = lockfile or self.sd.lock()
        self.md = Metadata(self.sd.path, body)
        self.nregions, self.nblocks, _ = geometry(body)
        self.size = body.size
        self.vol_fd = self._open_volume()
        self.al = ActivityLog(self.sd, body)
        self.snaps = Snapshots(self.sd)
        self.links = Links(self.sd, self.md, self)
        self.snappoints = Snappoints(self)
        self.recovered = None
        check_closed_files(self.sd, body)
        if upgrade_digests(self.sd, self.md):
            log.info("upgraded the closed maps' digests to XXH3-128")
        if not body.clean:
            self.recovered = self.al.recover(self.md, self.snaps)
        # every file is opened and checked before anything is written: a
        # start refused for a damaged file leaves the log as it was
        self.maps = open_interval_maps(self.sd, self.body, self.open_interval)
        recorded = Snapshots.open_recorded(self.sd, self.body)
        self.al.reset()
        self.vol = native.Volume(self.vol_fd, self.size, body.region_size, body.block_size,
                                 self.al.fd, body.al_extent, AL_HEADER)
        for point, code in native.WRITE_PATH_FAULTS.items():
            if faults.armed(point) is not None:
                self.vol.set_fault(code)
        self._fence = self.fenced
        if self.fenced:
            self.vol.refuse_writes(errno.EROFS)
        self.vol.switch(self.maps.bits())
        for name, s in recorded:
            self.snaps.active[name] = s
            self.vol.switch(self.maps.bits(), s.c)
        self.closed_maps = {}     # seq -> IntervalMaps (read-only, opened when first used)
        self.closed = False
        # when a write was last accepted (roles.py: failback)
        self.clock = WriteClock(self.sd, lambda: self.vol.writes_total, not body.clean)
        self.uri = None           # where the server listens (set by the server)
        self.snaps.remove_unknown(self.body)
        # interval map files made ahead of the snappoints (spares.py)
        remove_spares(self.sd, self.body)
        self.spares = SpareMaps(self.sd, self.body)
        # the volume made durable in the background (durability.py)
        self.durability = VolumeDurability(self.vol, sync_interval)

    @property
    def body(self):
        """The metadata as last written (read-only: change it through
        self.md.change())."""
        return self.md.body

    def start(self):
        """Called once the server serves (nbdkit's after_fork): from now on
        a stop without close() is unclean.  Until then nothing was written,
        so a server that fails to start (e.g. its socket is taken) leaves
        the state as it found it."""
        with self.lock, self.md.change() as body:
            body.clean = False
        self.snaps.reaper.start()
        self.durability.start()
        self.spares.start()
        if not self.fenced:
            self.clock.start()
        else:
            self.clock.settle()
            log.warning("%s is superseded: export \"\" is read-only (%s)", self.sd,
                        self.superseded_remedy())
        if self.force and self.body.superseded:
            log.warning("--force: serving the superseded volume read-write; writes from now "
                        "on conflict with the promoted node %s (split brain)",
                        self.body.superseded.by_volume_uuid)
        log.info("serving volume %s (%d bytes, uuid %s) from %s%s", self.body.volume,
                 self.size, self.body.volume_uuid, self.sd,
                 " after recovery from an unclean stop" if self.recovered else "")

    # ---- fencing (replication/roles.py) ------------------------------------
    @property
    def fenced(self):
        """Export "" refuses writes: the replica was promoted (superseded)."""
        return self.body.superseded is not None and not self.force

    @property
    def writes_refused(self):
        """Export "" refuses writes now: fenced, or by a migration's fence."""
        return self.fenced or self._fence

    def fence(self):
        """After the record of supersession (or for a migration, with no
        record): in-flight writes drain, later ones fail with EROFS; the
        write clock stamps the last of them."""
        self.vol.refuse_writes(errno.EROFS)
        self._fence = True
        self.clock.stop()

    def unfence(self):
        """Writes are accepted again (a failback that was refused), with a
        new write clock."""
        self.clock = WriteClock(self.sd, lambda: self.vol.writes_total, False)
        self.vol.refuse_writes(0)
        self._fence = False
        self.clock.start()

    def retire(self):
        """After a failback's record: this tracker serves nothing any more
        (writes fail; connections opened before still read the volume)."""
        with self.lock:
            self.closed = True
            self.vol.close()
            self.clock.stop()
            self.durability.close()
            self.snaps.reaper.close()
            self.spares.close()
            f, self._lockfile = self._lockfile, None
            return f

    def superseded_remedy(self):
        s = self.body.superseded
        return (f"its replica {s.by_volume_uuid} at {s.by_uri or '?'} was promoted by a "
                f"failover (generation {s.generation}); fail back onto it with `prepl "
                f"failback {self.sd} --peer URI`, or serve it read-write anyway with `prepl "
                f"serve --force` (split brain)")

    # ---- the chain -----------------------------------------------------------
    def _open_volume(self):
        path, want = self.body.volume, self.body.size
        try:
            have = volume_size(path)
        except FileNotFoundError:
            raise StateError(f"volume {path} of {self.sd} does not exist")
        if have != want:
            raise StateError(f"volume {path} is {have} bytes but {self.sd} tracks a volume of "
                             f"{want} bytes; refusing to serve it (nothing was changed)")
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    @property
    def open_interval(self):
        return self.body.open_interval

    def interval_maps(self, interval):
        """The maps of an interval: the open ones, or a closed one's mapped
        read-only (cached while its files stay the same)."""
        if not interval.closed:
            return self.maps
        m = self.closed_maps.get(interval.seq)
        if m is None or m.cmap.path != self.sd.p("maps", interval.maps["cmap"]):
            m = self.closed_maps[interval.seq] = open_interval_maps(
                self.sd, self.body, interval, writable=False)
        return m

    def keep_maps(self, interval, maps):
        """maps (IntervalMaps), just made durable and digested as the closed
        interval's (a snappoint's switch, a delete's merge), stay mapped for
        its later uses, read-only, and count as verified: a snappoint after
        a snappoint neither maps nor hashes again what it just wrote."""
        for m in maps:
            m.bits.flags.writeable = False
        self.closed_maps[interval.seq] = maps
        verified_as_written(self.sd, interval)

    def forget_maps(self, *seqs):
        """Unmaps closed intervals whose files were replaced or removed."""
        for seq in seqs:
            self.closed_maps.pop(seq, None)

    def mark_changed(self, runs):
        """Blocks [[first, count], ...] counted as written in the open
        interval (a failback's divergence map: its cycle then sends them as
        any change, packed).  More bits only ever send more."""
        nb, per = self.nblocks, self.body.region_size // self.body.block_size
        b = np.zeros(native.words_for(nb), np.uint64)
        c = np.zeros(native.words_for(self.nregions), np.uint64)
        total = 0
        for run in runs if isinstance(runs, list) else [None]:
            if not (isinstance(run, list) and len(run) == 2
                    and all(type(x) is int for x in run)
                    and 0 <= run[0] and 0 < run[1] <= nb - run[0]):
                raise RefusedError(f"mark_changed takes runs [first block, count] within "
                                   f"the volume's {nb} blocks, not {str(run)[:80]}")
            native.bm_set(b, nb, run[0], run[1])
            native.bm_set(c, self.nregions, run[0] // per,
                          (run[0] + run[1] - 1) // per - run[0] // per + 1)
            total += run[1]
        with self.lock:
            self.check_open()
            self.vol.merge_open((c, b, np.zeros_like(b)))
        return {"blocks": total}

    def blocks_after(self, seq):
        """Blocks written in the intervals after interval seq."""
        return sum(self.interval_maps(iv).bmap.count()
                   for iv in self.body.intervals if iv.seq > seq)

    def damaged(self):
        """The closed intervals whose maps are damaged, for status: each with
        the file, the reason and the links whose next cycle needs it."""
        return [{"interval": iv.seq, "file": e.path, "error": str(e),
                 "needed_by": self.links.needing(iv.seq)}
                for iv, e in damaged_intervals(self.sd, self.body)]

    # ---- snappoints (replication/snappoints.py changes them) -----------------
    def find(self, name, default=_MISSING):
        """The snappoint record named name (NotFoundError, or default)."""
        sp = self.body.snappoint(name)
        if sp is not None or default is not _MISSING:
            return sp or default
        raise NotFoundError(f"no snappoint named {name!r} in {self.sd}")

    def interval_closed_by(self, name):
        """The interval record that snappoint name closes."""
        iv = self.body.closed_by(name)
        if iv is not None:
            return iv
        raise StateError(f"snappoint {name!r} closes no interval: the metadata is inconsistent")

    def snapshot(self, name):
        """The valid Snapshot of snappoint name, or None."""
        return self.snaps.valid(name)

    # ---- control socket ---------------------------------------------------
    def control_handlers(self):
        return {
            "status": lambda r: self.status(),
            "snappoint_create": lambda r: self.snappoints.create(
                r.get("name"), bool(r.get("dataless")), r.get("changes_after")),
            "snappoint_list": lambda r: self.snappoints.list_all(),
            "snappoint_convert": lambda r: self.snappoints.convert(r.get("name")),
            "snappoint_delete": lambda r: self.snappoints.delete(r.get("name")),
            "maps": lambda r: self.dump_maps(),
            "mark_changed": lambda r: self.mark_changed(r.get("runs")),
            "link_update": lambda r: self._locked(self.links.update, r.get("name"),
                                                  r.get("fields") or {}),
            "link_resync": lambda r: self._locked(self.links.resync, r.get("name")),
            "link_pause": lambda r: self._locked(self.links.set_paused, r.get("name"), True),
            "link_resume": lambda r: self._locked(self.links.set_paused, r.get("name"), False),
            "link_remove": lambda r: self._locked(self.links.remove, r.get("name")),
            "shutdown": lambda r: self.close(),
        }

    def _locked(self, f, *args):
        with self.lock:
            self.check_open()
            return f(*args)

    def tick(self):
        self.snappoints.record_invalidations()

    # ---- status -----------------------------------------------------------
    def status(self):
        with self.lock:
            self.snappoints.record_invalidations()
            return status.primary(self)

    def dump_maps(self, limit=100000):
        """Every map as runs [[start, length], ...] (for tests and debugging)."""
        with self.lock:
            return status.maps(self, limit)

    # ---- shutdown -----------------------------------------------------------
    def check_open(self):
        if self.closed:
            raise StateError("the server is shutting down")

    def close(self):
        """Clean stop: everything durable, then the metadata says clean."""
        with self.lock:
            if self.body.clean:
                return
            if not self.closed:
                self.snappoints.record_invalidations()
                self.closed = True
                self.vol.close()
                self.clock.stop()
                self.durability.close()
                self.spares.close()
            # all of it again if a retry follows a failure (the volume's
            # flush error is sticky: a stop after one is never clean)
            self.vol.flush()
            self.maps.sync()
            self.snaps.sync()
            if self.snaps.invalidated:
                log.error("invalidated snapshots of %s are not recorded; the stop is "
                          "unclean", ", ".join(sorted(self.snaps.invalidated)))
                return
            with self.md.change() as body:
                body.clean = True
                partial = self.snappoints.close_snapshots_of_changes(body)
            for name in partial:
                self.snaps.free(name, self.vol, now=True)
            log.info("clean stop of %s%s", self.sd, f" (snapshots of changes dropped: "
                     f"{', '.join(partial)})" if partial else "")
        self.snaps.reaper.close()
