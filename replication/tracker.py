"""The tracked volume, as the server holds it: the interval chain, the
snappoints and their snapshots, the activity log, and recovery.

What it owns: everything in the state directory while the server runs
(it holds the lock).  What it promises:

* One chain of intervals.  Interval k has a change map (bit per region), a
  block map (bit per block written) and a zero map (bit per block that was
  zeroed or trimmed entirely and not written since).  A snappoint closes
  the open interval and opens the next one; the C write path switches maps
  atomically with respect to in-flight writes (replication/native.py).
* Snappoint creation, in order: switch (new maps, new snapshot), fdatasync
  of the volume, msync of the closed maps, digests, metadata written
  durably, and only then the activity log is trimmed.  Nothing reads a
  closed interval before its maps and the volume are durable.
* Durable change tracking without an fsync per write (invariant I2): the C
  write path makes the activity-log extent of a write durable before the
  write's data can reach the disk (the first write to an extent that is
  not in the log pays one fdatasync of the small log; a snappoint trims
  the log to the extents of the new and the previous interval).  The open
  maps are mapped memory, never fsynced per write.  After an unclean stop the open
  interval becomes (its surviving bits) OR (every block of every extent in
  the log) OR (maps of an interval whose switch had not reached the
  metadata), and no snapshot is trusted: all become dataless.
* Deleting a snappoint merges its interval forward (nothing is lost) and
  refuses while a link needs it as its base.
* The in-memory metadata is the truth while the server runs; every change
  is written durably before the operation returns.
"""
import copy
import logging
import os
import threading
import time

import numpy as np

from . import faults, native
from .errors import NotFoundError, RefusedError, StateError
from .chain import DamagedMapError, damaged_intervals, verify_interval
from .maps import KINDS, DIGEST_PREFIX, MapFile, create_copy, file_digest
from .meta import Metadata, MetadataWriteError
from .state import StateDir, flocked, fsync_dir, new_interval, volume_size
from .units import check_name

log = logging.getLogger(__name__)

AL_HEADER = 4096
AL_MAGIC = b"PREPL-AL\x01\x00\x00\x00\x00\x00\x00\x00"
MAX_SNAPSHOTS = 64        # MAX_SNAPS in native/writepath.c


def geometry(body):
    size, rs, bs = body["size"], body["region_size"], body["block_size"]
    return -(-size // rs), -(-size // bs), -(-size // body["al_extent"])


def _nbits(body, kind):
    nregions, nblocks, _ = geometry(body)
    return nregions if kind == "cmap" else nblocks


def create_interval_files(sd, body, interval):
    for kind in KINDS:
        MapFile(sd.p("maps", interval["maps"][kind]), _nbits(body, kind), create=True)
    fsync_dir(sd.p("maps"))


class Snapshot:
    """A snapshot of the volume at a snappoint: sparse image + valid map."""

    def __init__(self, sd, body, rec, create=False):
        self.id = rec["id"]
        self.img_path = sd.p("snaps", f"s{self.id}.img")
        self.vmap_path = sd.p("maps", f"s{self.id}.vmap")
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(self.img_path, flags, 0o600)
        if create:
            os.ftruncate(self.fd, body["size"])
        elif os.fstat(self.fd).st_size != body["size"]:
            have = os.fstat(self.fd).st_size
            os.close(self.fd)
            raise StateError(f"snapshot image {self.img_path} has {have} bytes, expected "
                             f"{body['size']}: it was damaged; refusing to serve it as a "
                             "snapshot (nothing was changed)")
        self.vmap = MapFile(self.vmap_path, _nbits(body, "vmap"), create=create)
        self.c = native.Snapshot(self.fd, self.vmap.bits, self.vmap.nbits)

    def sync(self):
        os.fsync(self.fd)
        self.vmap.sync()

    def remove(self, vol):
        """Deletes the files and frees their space at once; readers
        holding this object get ESTALE."""
        self.c.release(vol)
        for p in (self.img_path, self.vmap_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


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
        self.invalidated = {}     # snappoint -> reason: dropped, not yet recorded
        self.transient = {}       # link -> fields never written (state, progress)
        self.nregions, self.nblocks, self.nextents = geometry(body)
        self.size = body["size"]
        self.vol_fd = self._open_volume()
        self.al_fd = os.open(self.sd.p("al"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.recovered = None
        self._check_closed_files()
        self._upgrade_digests()
        if not body["clean"]:
            self.recovered = self._recover()
        # every file is opened and checked before anything is written: a
        # start refused for a damaged file leaves the log as it was
        self.maps = self._open_maps(self.open_interval)
        snaps = [(sp["name"], Snapshot(self.sd, self.body, sp["snapshot"]))
                 for sp in self.body["snappoints"] if sp["snapshot"]]
        self._reset_al()
        self.vol = native.Volume(self.vol_fd, self.size, self.body["region_size"],
                                 self.body["block_size"], self.al_fd, self.body["al_extent"],
                                 AL_HEADER)
        for point, code in native.WRITE_PATH_FAULTS.items():
            if faults.armed(point) is not None:
                self.vol.set_fault(code)
        self.snaps = {}           # snappoint name -> Snapshot (valid ones)
        self.vol.switch(self._c_maps(self.maps))
        for name, s in snaps:
            self.snaps[name] = s
            self.vol.switch(self._c_maps(self.maps), s.c)
        self.closed_maps = {}     # seq -> {kind: MapFile} (read-only, lazily)
        self.closed = False
        self.uri = None           # where the server listens (set by the server)
        self._remove_unknown_snapshots()

    @property
    def body(self):
        """The metadata as last written (read-only: change it through
        self.md.change())."""
        return self.md.body

    def _remove_unknown_snapshots(self):
        """Snapshot files no snappoint names (a stop between a convert's or a
        delete's metadata write and the removal of its files)."""
        known = {f"s{sp['snapshot']['id']}.{ext}" for sp in self.body["snappoints"]
                 if sp["snapshot"] for ext in ("img", "vmap")}
        for d, ext in (("snaps", ".img"), ("maps", ".vmap")):
            for name in os.listdir(self.sd.p(d)):
                if name.endswith(ext) and name.startswith("s") and name not in known:
                    os.unlink(self.sd.p(d, name))

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

    # ---- opening ---------------------------------------------------------
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

    def _open_maps(self, interval, writable=True):
        return {k: MapFile(self.sd.p("maps", interval["maps"][k]), _nbits(self.body, k),
                           writable=writable) for k in KINDS}

    @staticmethod
    def _c_maps(maps):
        return tuple(maps[k].bits for k in KINDS)

    def closed_interval_maps(self, interval):
        m = self.closed_maps.get(interval["seq"])
        if m is None or m["cmap"].path != self.sd.p("maps", interval["maps"]["cmap"]):
            m = self.closed_maps[interval["seq"]] = self._open_maps(interval, writable=False)
        return m

    def _check_closed_files(self):
        """Every closed map exists and has its size (else the state directory
        is damaged beyond what replication can route around: refuse to
        start).  Their contents are verified when they are used."""
        for iv in self.body["intervals"][:-1]:
            for k in KINDS:
                p = self.sd.p("maps", iv["maps"][k])
                try:
                    have = os.stat(p).st_size
                except FileNotFoundError:
                    raise StateError(f"map file {p} is missing: the state directory is damaged")
                want = native.words_for(_nbits(self.body, k)) * 8
                if have != want:
                    raise StateError(f"map file {p} has {have} bytes, expected {want}: the "
                                     "state directory is damaged")

    def _upgrade_digests(self):
        """Format 1 recorded SHA-256 digests of closed maps; they become
        XXH3-128 digests of the same bytes (verified first; a map that does
        not match is recorded as damaged, never re-digested)."""
        legacy = [iv for iv in self.body["intervals"][:-1]
                  if iv.get("digests") and not all(d.startswith(DIGEST_PREFIX)
                                                   for d in iv["digests"].values())]
        if not legacy:
            return
        with self.md.change() as new:
            for iv in new["intervals"][:-1]:
                if iv not in legacy:
                    continue
                for k in KINDS:
                    p = self.sd.p("maps", iv["maps"][k])
                    if file_digest(p, legacy=True) != iv["digests"][k]:
                        iv["damaged"] = f"digest mismatch of {iv['maps'][k]} at the upgrade"
                        break
                else:
                    iv["digests"] = {k: file_digest(self.sd.p("maps", iv["maps"][k]))
                                     for k in KINDS}
        log.info("upgraded the digests of %d closed intervals to XXH3-128", len(legacy))

    def damaged(self):
        """The closed intervals whose maps are damaged, for status: each with
        the file, the reason and the links whose next cycle needs it."""
        out = []
        for iv, e in damaged_intervals(self.sd, self.body):
            needed = [name for name, link in self.body["links"].items()
                      if self._cursor_seq(link) < iv["seq"]]
            out.append({"interval": iv["seq"], "file": e.path, "error": str(e),
                        "needed_by": needed})
        return out

    def _cursor_seq(self, link):
        """The interval a link's replica holds (-1: none)."""
        sp = next((x for x in self.body["snappoints"] if x["name"] == link.get("cursor")), None)
        return sp["seq"] if sp else -1

    # ---- activity log and recovery ---------------------------------------
    def _al_words(self):
        return native.words_for(self.nextents)

    def _read_al(self):
        """Extent bits of the activity log on disk (zeroes if absent)."""
        n = self._al_words()
        raw = os.pread(self.al_fd, AL_HEADER + n * 8, 0)
        if len(raw) < AL_HEADER or raw[:len(AL_MAGIC)] != AL_MAGIC:
            # never written: nothing was written through this server either,
            # since the first write writes the header before any data
            return np.zeros(n, dtype=np.uint64)
        bits = np.zeros(n, dtype=np.uint64)
        body = raw[AL_HEADER:]
        bits[:len(body) // 8] = np.frombuffer(body[:len(body) // 8 * 8], dtype=np.uint64)
        return bits

    def _reset_al(self):
        """An empty, durable log with a header (after the maps are durable),
        written in full so that later page writes never need new space."""
        pages = -(-self._al_words() * 8 // AL_HEADER)
        os.ftruncate(self.al_fd, 0)
        os.pwrite(self.al_fd, AL_MAGIC.ljust(AL_HEADER, b"\0") + bytes(pages * AL_HEADER), 0)
        os.fdatasync(self.al_fd)

    def _recover(self):
        """Unclean stop: rebuild the open interval, drop every snapshot."""
        body = self.md.body
        iv = self.open_interval
        for k in KINDS:
            p = self.sd.p("maps", iv["maps"][k])
            if not os.path.exists(p):
                MapFile(p, _nbits(body, k), create=True)
        maps = self._open_maps(iv)
        known = {f for i in body["intervals"] for f in i["maps"].values()}
        known |= {f"s{sp['snapshot']['id']}.vmap" for sp in body["snappoints"] if sp["snapshot"]}
        merged_orphans = 0
        for name in sorted(os.listdir(self.sd.p("maps"))):
            if name in known:
                continue
            seq, kind = _parse_map_name(name)
            p = self.sd.p("maps", name)
            if seq is not None and seq > iv["seq"] and kind in ("cmap", "bmap"):
                orphan = MapFile(p, _nbits(body, kind), writable=False)
                native.bm_or(maps[kind].bits, orphan.bits, orphan.nbits)
                merged_orphans += 1
            os.unlink(p)
        al = self._read_al()
        rs, bs, ext = body["region_size"], body["block_size"], body["al_extent"]
        starts, lengths = native.bm_runs(al, self.nextents)
        extents = 0
        for s, n in zip(starts.tolist(), lengths.tolist()):
            lo, hi = s * ext, min((s + n) * ext, self.size)
            native.bm_set(maps["cmap"].bits, self.nregions, lo // rs, -(-hi // rs) - lo // rs)
            b0, b1 = lo // bs, -(-hi // bs)
            native.bm_set(maps["bmap"].bits, self.nblocks, b0, b1 - b0)
            native.bm_clear(maps["zmap"].bits, self.nblocks, b0, b1 - b0)
            extents += n
        for m in maps.values():
            m.sync()
        dropped = []
        with self.md.change() as new:
            for sp in new["snappoints"]:
                if sp["snapshot"]:
                    sp["snapshot"] = None
                    sp["invalidated"] = "unclean stop: snapshot not trusted"
                    dropped.append(sp["name"])
        # the record first, then the files (a stop in between leaves files
        # that no snappoint names: removed at the next start)
        self._remove_unknown_snapshots()
        info = {"al_extents": extents, "orphan_maps_merged": merged_orphans,
                "snapshots_dropped": dropped}
        log.warning("recovered from an unclean stop: %d activity-log extents marked changed, "
                    "%d orphan maps merged, snapshots dropped: %s", extents, merged_orphans,
                    ", ".join(dropped) or "none")
        return info

    # ---- snappoints --------------------------------------------------------
    def _find(self, name):
        for sp in self.body["snappoints"]:
            if sp["name"] == name:
                return sp
        raise NotFoundError(f"no snappoint named {name!r} in {self.sd}")

    def _interval_closed_by(self, name):
        for i, iv in enumerate(self.body["intervals"]):
            if iv["closed_by"] == name:
                return i
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
            if any(sp["name"] == name for sp in self.body["snappoints"]):
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
                new_maps = self._open_maps(iv)
                if not dataless:
                    rec = {"id": new["next_snap_id"]}
                    new["next_snap_id"] += 1          # ids are never reused
                    created += [self.sd.p("snaps", f"s{rec['id']}.img"),
                                self.sd.p("maps", f"s{rec['id']}.vmap")]
                    snap = Snapshot(self.sd, new, rec, create=True)
                    fsync_dir(self.sd.p("snaps"))
                self.vol.switch(self._c_maps(new_maps), snap.c if snap else None)
                switched = True
                faults.point("primary.snappoint.after_switch")
                t = time.time()
                closed = new["intervals"][-1]
                closed["closed_by"] = name
                closed["closed_at"] = t
                # the closed interval durable before anything reads it
                self.vol.flush()
                for m in old_maps.values():
                    m.sync()
                # nothing writes the closed maps any more: their digests are final
                closed["digests"] = {k: old_maps[k].digest() for k in KINDS}
                new["next_seq"] = seq + 1
                new["intervals"].append(iv)
                new["snappoints"].append({"name": name, "seq": closed["seq"], "created": t,
                                          "snapshot": {"id": snap.id} if snap else None,
                                          "invalidated": None})
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
                self.snaps[name] = snap
            faults.point("primary.snappoint.after_save")
            self.vol.al_trim()
            log.info("snappoint %s created (%s), interval %d closed", name,
                     "dataless" if dataless else "with snapshot", closed["seq"])
            return self.snappoint_info(self._find(name))

    def _free_snapshot(self, name):
        """Stops copy-on-write into the snapshot of snappoint name and frees
        its files (after the record says it is gone, or never was)."""
        snap = self.snaps.pop(name, None)
        if snap is not None:
            self.vol.drop_snap(snap.c)
            snap.remove(self.vol)

    def convert_snappoint(self, name):
        with self.lock:
            self._check_open()
            sp = self._find(name)
            if sp["snapshot"] is None:
                return self.snappoint_info(sp)
            with self.md.change() as new:
                _find_in(new, name)["snapshot"] = None
            self._free_snapshot(name)
            log.info("snappoint %s converted to dataless", name)
            return self.snappoint_info(self._find(name))

    def delete_snappoint(self, name):
        with self.lock:
            self._check_open()
            sp = self._find(name)
            users = [ln for ln, link in self.body["links"].items() if link.get("cursor") == name]
            if users:
                raise RefusedError(f"snappoint {name!r} is the base of link(s) "
                                   f"{', '.join(users)}; it cannot be deleted")
            new = copy.deepcopy(self.body)
            ivs = new["intervals"]
            i = self._interval_closed_by(name)
            src, dst = ivs[i], ivs[i + 1]
            src_maps = self.closed_interval_maps(src)
            src_bits = self._c_maps(src_maps)
            old_files = [self.sd.p("maps", src["maps"][k]) for k in KINDS]
            self._carry_damage(new, src, dst)
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
                    dmaps = self.closed_interval_maps(dst)
                    fid = self._next_file_id(new)
                    names = {k: f"i{dst['seq']}-{fid}.{k}" for k in KINDS}
                    created = [self.sd.p("maps", names[k]) for k in KINDS]
                    merged = {k: create_copy(dmaps[k], self.sd.p("maps", names[k]))
                              for k in KINDS}
                    native.merge_interval(self._c_maps(merged), src_bits, self.nregions,
                                          self.nblocks)
                    for m in merged.values():
                        m.sync()
                    fsync_dir(self.sd.p("maps"))
                    old_files += [self.sd.p("maps", dst["maps"][k]) for k in KINDS]
                    dst["maps"] = names
                    dst["digests"] = {k: merged[k].digest() for k in KINDS}
                del ivs[i]
                new["snappoints"] = [x for x in new["snappoints"] if x["name"] != name]
                self.md.commit(new)
            except BaseException:
                for p in created:
                    if os.path.exists(p):
                        os.unlink(p)
                raise
            self._free_snapshot(name)
            self.closed_maps.pop(dst["seq"], None)
            self.closed_maps.pop(src["seq"], None)
            for p in old_files:
                os.unlink(p)
            log.info("snappoint %s deleted; interval %d merged into interval %d", name,
                     src["seq"], dst["seq"])

    def _carry_damage(self, new, src, dst):
        """Deleting a snappoint merges its interval src into dst: a damaged
        map must not be laundered by the merge (the merged maps get fresh,
        matching digests).  dst is recorded as damaged while some link still
        needs it, and the chain no longer holds every change since the
        volume was created (chain_truncated: no initial sync is skipped)."""
        why = None
        for iv in (src, dst) if dst["closed_by"] else (src,):
            try:
                verify_interval(self.sd, iv)
            except DamagedMapError as e:
                why = why or f"merged with damaged interval {iv['seq']} ({e.path})"
        if why is None:
            return
        new["chain_truncated"] = True
        if any(self._cursor_seq(link) < dst["seq"] for link in new["links"].values()):
            target = next(iv for iv in new["intervals"] if iv["seq"] == dst["seq"])
            target["damaged"] = target.get("damaged") or why

    def snappoint_info(self, sp):
        iv = self.body["intervals"][self._interval_closed_by(sp["name"])]
        snap = self.snaps.get(sp["name"])
        maps = self.closed_interval_maps(iv)
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
        during copy-on-write).  The one exception to "memory follows the
        disk" (ARCHITECTURE §4): such a snapshot is dropped at once -- its
        export disappears and its space is freed -- and recorded as soon as
        a metadata write succeeds (retried on every housekeeping tick)."""
        with self.lock:
            if self.closed:
                return
            for sp in self.body["snappoints"]:
                snap = self.snaps.get(sp["name"])
                if snap is not None and not snap.c.valid:
                    reason = f"copy-on-write failed: {os.strerror(snap.c.error)}"
                    log.error("snapshot of snappoint %s invalidated: %s", sp["name"], reason)
                    self._free_snapshot(sp["name"])
                    self.invalidated[sp["name"]] = reason
            if self.invalidated:
                try:
                    with self.md.change() as new:
                        for x in new["snappoints"]:
                            if x["name"] in self.invalidated:
                                x["snapshot"] = None
                                x["invalidated"] = self.invalidated[x["name"]]
                    self.invalidated = {}
                except MetadataWriteError as e:
                    log.error("%s; will retry", e)

    def snapshot(self, name):
        """The valid Snapshot of snappoint name, or None."""
        snap = self.snaps.get(name)
        return snap if snap is not None and snap.c.valid else None

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
            "link_update": lambda r: self.link_update(r.get("name"), r.get("fields") or {}),
            "link_resync": lambda r: self.link_resync(r.get("name")),
            "shutdown": lambda r: self.close(),
        }

    LINK_FIELDS = ("replica_uuid", "secondary", "cursor", "state", "last_cycle", "progress",
                   "resync")
    TRANSIENT_LINK_FIELDS = {"state", "progress"}

    def link_update(self, name, fields):
        """The agent of link `name` records what it did (only the server
        writes the metadata).  A link is identified by its replica's UUID:
        a link name cannot be reused for another replica."""
        check_name(name, "link name")
        with self.lock:
            self._check_open()
            unknown = set(fields) - set(self.LINK_FIELDS)
            if unknown:
                raise RefusedError(f"unknown link fields {sorted(unknown)}")
            link = self.body["links"].get(name, {})
            if link.get("replica_uuid") and fields.get("replica_uuid") not in \
                    (None, link["replica_uuid"]):
                raise RefusedError(f"link {name!r} replicates to replica {link['replica_uuid']},"
                                   f" not {fields['replica_uuid']}; choose another --name")
            if fields.get("cursor") is not None:
                self._find(fields["cursor"])
            durable = {k: v for k, v in fields.items() if k not in self.TRANSIENT_LINK_FIELDS}
            if durable:       # what the link did is durable; its state of the
                with self.md.change() as new:      # moment and progress are not
                    new["links"].setdefault(name, {}).update(durable)  # worth an fsync
            link = self.transient.setdefault(name, {})
            link.update({k: v for k, v in fields.items() if k in self.TRANSIENT_LINK_FIELDS})
            return dict(self.body["links"].get(name, {}), **link)

    def link_resync(self, name):
        """The operator's remedy for a link whose changes cannot be trusted
        (a damaged closed map, a replica that is no image of this chain):
        its next cycle sends the whole volume (like DRBD's invalidate)."""
        with self.lock:
            self._check_open()
            if name not in self.body["links"]:
                raise NotFoundError(f"no link named {name!r} in {self.sd} (links: "
                                    f"{', '.join(sorted(self.body['links'])) or 'none'})")
            with self.md.change() as new:
                new["links"][name]["resync"] = True
            log.warning("link %s: the next cycle replicates the whole volume", name)
            return {"link": name, "resync": True}

    def tick(self):
        self.check_snapshots()

    # ---- status -----------------------------------------------------------
    def status(self):
        with self.lock:
            self.check_snapshots()
            b = self.body
            return {
                "state_dir": self.sd.path,
                "role": b["role"],
                "volume": b["volume"],
                "volume_uuid": b["volume_uuid"],
                "generation": b["generation"],
                "size": b["size"],
                "region_size": b["region_size"],
                "block_size": b["block_size"],
                "al_extent": b["al_extent"],
                "tracked_since_empty": b["tracked_since_empty"],
                "pid": os.getpid(),
                "uri": self.uri,
                "recovered": self.recovered,
                "open_interval": {"seq": self.open_interval["seq"],
                                  "changed_regions": self.maps["cmap"].count(),
                                  "changed_blocks": self.maps["bmap"].count()},
                "intervals": len(b["intervals"]),
                "snappoints": [self.snappoint_info(sp) for sp in b["snappoints"]],
                "links": {name: self.link_status(name, dict(link, **self.transient.get(name, {})))
                          for name, link in b["links"].items()},
                "damaged_intervals": self.damaged(),
                "volume_sync_error": os.strerror(self.vol.sync_error)
                if self.vol.sync_error else None,
                "unrecorded_invalidations": sorted(self.invalidated),
                "writers_in_c": self.vol.writers,
                "max_concurrent_writers_in_c": self.vol.max_writers,
                "activity_log_syncs": self.vol.al_syncs,
                "writes_total": self.vol.writes_total,
            }

    def link_status(self, name, link):
        """What an operator asks of a link: is its agent running, what does
        the replica hold, how old is it (RPO), how much is waiting."""
        now = time.time()
        out = dict(link, name=name)
        sd_lock = self.sd.p(f"agent.{name}.lock")
        out["agent_running"] = flocked(sd_lock)
        if not out["agent_running"] and link.get("state") not in (None, "idle"):
            out["state"] = "disconnected"
        cursor = link.get("cursor")
        sp = next((x for x in self.body["snappoints"] if x["name"] == cursor), None)
        out["last_applied"] = {"snappoint": cursor, "time": sp["created"]} if sp else None
        out["rpo_seconds"] = round(now - sp["created"], 3) if sp else None
        pending = 0
        after = sp["seq"] if sp else -1
        for iv in self.body["intervals"]:
            if iv["seq"] > after:
                maps = self.maps if iv["closed_by"] is None else self.closed_interval_maps(iv)
                pending += maps["bmap"].count() * self.body["block_size"]
        out["bytes_pending"] = pending
        return out

    def dump_maps(self, limit=100000):
        """Every map as runs [[start, length], ...] (for tests and debugging)."""
        def runs(m):
            s, n = m.runs(limit)
            return [[a, b] for a, b in zip(s.tolist(), n.tolist())]
        with self.lock:
            out = {"intervals": [], "snapshots": {}}
            for iv in self.body["intervals"]:
                maps = self.maps if iv["closed_by"] is None else self.closed_interval_maps(iv)
                out["intervals"].append({"seq": iv["seq"], "closed_by": iv["closed_by"],
                                         **{k: runs(maps[k]) for k in KINDS}})
            for name, snap in self.snaps.items():
                out["snapshots"][name] = {"valid": snap.c.valid, "vmap": runs(snap.vmap)}
            return out

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
            for s in self.snaps.values():
                s.sync()
            if self.invalidated:
                log.error("invalidated snapshots of %s are not recorded; the stop is "
                          "unclean", ", ".join(sorted(self.invalidated)))
                return
            with self.md.change() as body:
                body["clean"] = True
            log.info("clean stop of %s", self.sd)


def _find_in(body, name):
    return next(sp for sp in body["snappoints"] if sp["name"] == name)


def _parse_map_name(name):
    """'i12-7.cmap' -> (12, 'cmap'); other names -> (None, kind)."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("i") and "-" in stem:
        try:
            return int(stem[1:].split("-")[0]), kind
        except ValueError:
            pass
    return None, kind
