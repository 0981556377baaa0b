"""The tracked volume, as the server holds it: the interval chain and its
snappoints.

What it owns: the state directory of a primary while its server runs (it
holds the lock): the volume, the open interval's maps and the C write path
(replication/native.py).  It delegates the snapshots (replication/
snapshots.py), the activity log and recovery (replication/actlog.py), the
links (replication/links.py) and the metadata file (replication/meta.py).
What it promises:

* One chain of intervals.  Interval k has a change map (bit per region), a
  block map (bit per block written) and a zero map (bit per block that was
  zeroed or trimmed entirely and not written since).  A snappoint closes
  the open interval and opens the next one; the C write path switches maps
  atomically with respect to in-flight writes.
* Snappoint creation, in order: switch (new maps, new snapshot), fdatasync
  of the volume, msync of the closed maps, digests, metadata written
  durably, and only then snap/NAME exists and the activity log is
  trimmed.  Nothing reads a closed interval before its maps and the volume
  are durable; if anything before the record fails, the switch is undone.
* Deleting a snappoint merges its interval forward (nothing is lost, and
  a damaged map is never laundered into a fresh digest) and refuses while
  a link needs it as its base.
* Memory follows the disk: every change of the metadata is written durably
  before anything in memory or any export shows it (replication/meta.py).
"""
import copy
import logging
import os
import threading
import time

from . import faults, native, status
from .actlog import AL_HEADER, ActivityLog
from .chain import (carry_damage, check_closed_files, create_interval_files, damaged_intervals,
                    geometry, merge_into_closed, new_interval, open_interval_maps,
                    upgrade_digests)
from .errors import MetadataWriteError, NotFoundError, RefusedError, StateError
from .links import Links
from .maps import KINDS
from .meta import Metadata
from .snapshots import MAX_SNAPSHOTS, Snapshots
from .state import StateDir, volume_size
from .units import check_name

log = logging.getLogger(__name__)

_MISSING = object()


class Tracker:
    def __init__(self, path):
        self.sd = StateDir(path)
        self.lock = threading.RLock()
        body = self.sd.read_meta()
        if body["role"] != "primary":
            raise StateError(f"{self.sd} is a {body['role']} state directory; serving a "
                             "secondary's replica is not supported by this version yet")
        self._lockfile = self.sd.lock()
        self.md = Metadata(self.sd.path, body)
        self.nregions, self.nblocks, _ = geometry(body)
        self.size = body["size"]
        self.vol_fd = self._open_volume()
        self.al = ActivityLog(self.sd, body)
        self.snaps = Snapshots(self.sd)
        self.links = Links(self.sd, self.md, self)
        self.recovered = None
        check_closed_files(self.sd, body)
        if upgrade_digests(self.sd, self.md):
            log.info("upgraded the closed maps' digests to XXH3-128")
        if not body["clean"]:
            self.recovered = self.al.recover(self.md, self.snaps)
        # every file is opened and checked before anything is written: a
        # start refused for a damaged file leaves the log as it was
        self.maps = open_interval_maps(self.sd, self.body, self.open_interval)
        recorded = Snapshots.open_recorded(self.sd, self.body)
        self.al.reset()
        self.vol = native.Volume(self.vol_fd, self.size, self.body["region_size"],
                                 self.body["block_size"], self.al.fd, self.body["al_extent"],
                                 AL_HEADER)
        for point, code in native.WRITE_PATH_FAULTS.items():
            if faults.armed(point) is not None:
                self.vol.set_fault(code)
        self.vol.switch(self._c_maps(self.maps))
        for name, s in recorded:
            self.snaps.active[name] = s
            self.vol.switch(self._c_maps(self.maps), s.c)
        self.closed_maps = {}     # seq -> {kind: MapFile} (read-only, lazily)
        self.closed = False
        self.uri = None           # where the server listens (set by the server)
        self.snaps.remove_unknown(self.body)

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
            body["clean"] = False
        log.info("serving volume %s (%d bytes, uuid %s) from %s%s", self.body["volume"],
                 self.size, self.body["volume_uuid"], self.sd,
                 " after recovery from an unclean stop" if self.recovered else "")

    # ---- the chain -----------------------------------------------------------
    def _open_volume(self):
        path, want = self.body["volume"], self.body["size"]
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
        return self.body["intervals"][-1]

    @staticmethod
    def _c_maps(maps):
        return tuple(maps[k].bits for k in KINDS)

    def interval_maps(self, interval):
        """The maps of an interval: the open ones, or a closed one's mapped
        read-only (cached while its files stay the same)."""
        if interval["closed_by"] is None:
            return self.maps
        m = self.closed_maps.get(interval["seq"])
        if m is None or m["cmap"].path != self.sd.p("maps", interval["maps"]["cmap"]):
            m = self.closed_maps[interval["seq"]] = open_interval_maps(
                self.sd, self.body, interval, writable=False)
        return m

    def blocks_after(self, seq):
        """Blocks written in the intervals after interval seq."""
        return sum(self.interval_maps(iv)["bmap"].count()
                   for iv in self.body["intervals"] if iv["seq"] > seq)

    def damaged(self):
        """The closed intervals whose maps are damaged, for status: each with
        the file, the reason and the links whose next cycle needs it."""
        return [{"interval": iv["seq"], "file": e.path, "error": str(e),
                 "needed_by": self.links.needing(iv["seq"])}
                for iv, e in damaged_intervals(self.sd, self.body)]

    # ---- snappoints --------------------------------------------------------
    def find(self, name, default=_MISSING):
        """The snappoint record named name (NotFoundError, or default)."""
        for sp in self.body["snappoints"]:
            if sp["name"] == name:
                return sp
        if default is not _MISSING:
            return default
        raise NotFoundError(f"no snappoint named {name!r} in {self.sd}")

    def interval_closed_by(self, name):
        """The interval record that snappoint name closes."""
        for iv in self.body["intervals"]:
            if iv["closed_by"] == name:
                return iv
        raise StateError(f"snappoint {name!r} closes no interval: the metadata is inconsistent")

    @staticmethod
    def _next_file_id(body):
        n = body["next_file_id"]
        body["next_file_id"] = n + 1
        return n

    def create_snappoint(self, name, dataless=False):
        """Closes the open interval at one instant.  Its effects outside the
        metadata come in an order that nothing observable runs ahead of the
        record: the C switch (writers see new maps), then the closed
        interval made durable and digested, then the metadata written; only
        then does snap/NAME exist and the log get trimmed.  If anything
        before the record fails, the switch is undone (the closed maps take
        the new interval's bits back) and the operation fails."""
        check_name(name)
        with self.lock:
            self._check_open()
            if self.find(name, None) is not None:
                raise RefusedError(f"snappoint {name!r} already exists in {self.sd}")
            if not dataless and len(self.snaps) >= MAX_SNAPSHOTS:
                raise RefusedError(f"{MAX_SNAPSHOTS} snapshots are active already; convert or "
                                   "delete one first (prepl snappoint convert NAME --dataless)")
            new = copy.deepcopy(self.body)
            seq = new["next_seq"]
            iv = new_interval(seq, self._next_file_id(new))
            snap = None
            created = [self.sd.p("maps", f) for f in iv["maps"].values()]
            switched = False
            old_maps = self.maps
            try:
                create_interval_files(self.sd, new, iv)
                new_maps = open_interval_maps(self.sd, new, iv)
                if not dataless:
                    snap = self.snaps.create(self.body, new)
                    created += [snap.img_path, snap.vmap_path]
                self.vol.switch(self._c_maps(new_maps), snap.c if snap else None)
                switched = True
                faults.point("primary.snappoint.after_switch")
                closed = self._close_interval(new, name, old_maps, snap)
                new["intervals"].append(iv)
                new["next_seq"] = seq + 1
                self.md.commit(new)
            except BaseException:
                if switched:
                    self.vol.unswitch(self._c_maps(old_maps), snap.c if snap else None)
                if snap is not None:
                    snap.remove(self.vol)
                for p in created:
                    if os.path.exists(p):
                        os.unlink(p)
                raise
            self.maps = new_maps
            if snap:
                self.snaps.active[name] = snap
            faults.point("primary.snappoint.after_save")
            self.vol.al_trim()
            log.info("snappoint %s created (%s), interval %d closed", name,
                     "dataless" if dataless else "with snapshot", closed["seq"])
            return self.snappoint_info(self.find(name))

    def _close_interval(self, new, name, old_maps, snap):
        """After the switch: the interval old_maps belong to is made durable
        and recorded (in new, not yet written) as closed by snappoint name."""
        t = time.time()
        closed = new["intervals"][-1]
        closed["closed_by"] = name
        closed["closed_at"] = t
        self.vol.flush()
        for m in old_maps.values():
            m.sync()
        # nothing writes the closed maps any more: their digests are final
        closed["digests"] = {k: old_maps[k].digest() for k in KINDS}
        new["snappoints"].append({"name": name, "seq": closed["seq"], "created": t,
                                  "snapshot": {"id": snap.id} if snap else None,
                                  "invalidated": None})
        return closed

    def convert_snappoint(self, name):
        with self.lock:
            self._check_open()
            if self.find(name)["snapshot"] is not None:
                with self.md.change() as new:
                    next(sp for sp in new["snappoints"] if sp["name"] == name)["snapshot"] = None
                self.snaps.free(name, self.vol)
                log.info("snappoint %s converted to dataless", name)
            return self.snappoint_info(self.find(name))

    def delete_snappoint(self, name):
        with self.lock:
            self._check_open()
            self.find(name)
            users = self.links.is_base(name)
            if users:
                raise RefusedError(f"snappoint {name!r} is the base of link(s) "
                                   f"{', '.join(users)}; it cannot be deleted")
            new = copy.deepcopy(self.body)
            ivs = new["intervals"]
            i = next(k for k, iv in enumerate(ivs) if iv["closed_by"] == name)
            src, dst = ivs[i], ivs[i + 1]
            src_bits = self._c_maps(self.interval_maps(src))
            old_files = [self.sd.p("maps", src["maps"][k]) for k in KINDS]
            carry_damage(self.sd, new, src, dst, self.links.needing)
            created = []
            try:
                if dst["closed_by"] is None:
                    # more bits in the open interval are harmless if the
                    # record then fails (a change counted twice is sent
                    # twice); bits missing after the record would be lost
                    self.vol.merge_open(src_bits)
                    for m in self.maps.values():
                        m.sync()
                else:
                    old_files += [self.sd.p("maps", dst["maps"][k]) for k in KINDS]
                    created = merge_into_closed(self.sd, new, src_bits, dst,
                                                self.interval_maps(dst), self._next_file_id(new))
                del ivs[i]
                new["snappoints"] = [x for x in new["snappoints"] if x["name"] != name]
                self.md.commit(new)
            except BaseException:
                for p in created:
                    if os.path.exists(p):
                        os.unlink(p)
                raise
            self.snaps.free(name, self.vol)
            self.closed_maps.pop(dst["seq"], None)
            self.closed_maps.pop(src["seq"], None)
            for p in old_files:
                os.unlink(p)
            log.info("snappoint %s deleted; interval %d merged into interval %d", name,
                     src["seq"], dst["seq"])

    def snappoint_info(self, sp):
        iv = self.interval_closed_by(sp["name"])
        snap = self.snaps.active.get(sp["name"])
        maps = self.interval_maps(iv)
        return {"name": sp["name"], "interval": iv["seq"], "created": sp["created"],
                "snapshot": "valid" if snap else ("invalid" if sp.get("invalidated") else "none"),
                "invalidated": sp.get("invalidated"),
                "export": f"snap/{sp['name']}" if snap else None,
                "changed_regions": maps["cmap"].count(),
                "changed_blocks": maps["bmap"].count(),
                "copied_blocks": snap.vmap.count() if snap else 0}

    def list_snappoints(self):
        with self.lock:
            self.check_snapshots()
            return [self.snappoint_info(sp) for sp in self.body["snappoints"]]

    def check_snapshots(self):
        """Records invalidations that the C write path made (e.g. ENOSPC
        during copy-on-write); the snapshots are dropped at once
        (replication/snapshots.py), the record is retried on every
        housekeeping tick until it is written."""
        with self.lock:
            if self.closed:
                return
            pending = self.snaps.collect_invalidated(
                [sp["name"] for sp in self.body["snappoints"]], self.vol)
            if not pending:
                return
            try:
                with self.md.change() as new:
                    for x in new["snappoints"]:
                        if x["name"] in pending:
                            x["snapshot"] = None
                            x["invalidated"] = pending[x["name"]]
                pending.clear()
            except MetadataWriteError as e:
                log.error("%s; will retry", e)

    def snapshot(self, name):
        """The valid Snapshot of snappoint name, or None."""
        return self.snaps.valid(name)

    # ---- control socket ---------------------------------------------------
    def control_handlers(self):
        return {
            "status": lambda r: self.status(),
            "snappoint_create": lambda r: self.create_snappoint(r.get("name"),
                                                                bool(r.get("dataless"))),
            "snappoint_list": lambda r: self.list_snappoints(),
            "snappoint_convert": lambda r: self.convert_snappoint(r.get("name")),
            "snappoint_delete": lambda r: self.delete_snappoint(r.get("name")),
            "maps": lambda r: self.dump_maps(),
            "link_update": lambda r: self._locked(self.links.update, r.get("name"),
                                                  r.get("fields") or {}),
            "link_resync": lambda r: self._locked(self.links.resync, r.get("name")),
            "shutdown": lambda r: self.close(),
        }

    def _locked(self, f, *args):
        with self.lock:
            self._check_open()
            return f(*args)

    def tick(self):
        self.check_snapshots()

    # ---- status -----------------------------------------------------------
    def status(self):
        with self.lock:
            self.check_snapshots()
            return status.primary(self)

    def dump_maps(self, limit=100000):
        """Every map as runs [[start, length], ...] (for tests and debugging)."""
        with self.lock:
            return status.maps(self, limit)

    # ---- shutdown -----------------------------------------------------------
    def _check_open(self):
        if self.closed:
            raise StateError("the server is shutting down")

    def close(self):
        """Clean stop: everything durable, then the metadata says clean."""
        with self.lock:
            if self.body["clean"]:
                return
            if not self.closed:
                self.check_snapshots()
                self.closed = True
                self.vol.close()
            # all of it again if a retry follows a failure (the volume's
            # flush error is sticky: a stop after one is never clean)
            self.vol.flush()
            for m in self.maps.values():
                m.sync()
            self.snaps.sync()
            if self.snaps.invalidated:
                log.error("invalidated snapshots of %s are not recorded; the stop is "
                          "unclean", ", ".join(sorted(self.snaps.invalidated)))
                return
            with self.md.change() as body:
                body["clean"] = True
            log.info("clean stop of %s", self.sd)
