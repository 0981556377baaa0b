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
import logging
import os
import threading
import time

import numpy as np

from . import faults, native
from .errors import NotFoundError, RefusedError, StateError
from .maps import MapFile, create_copy, file_digest
from .state import StateDir, flocked, fsync_dir, new_interval, volume_size
from .units import check_name

log = logging.getLogger(__name__)

AL_HEADER = 4096
AL_MAGIC = b"PREPL-AL\x01\x00\x00\x00\x00\x00\x00\x00"
KINDS = ("cmap", "bmap", "zmap")
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
        self.body = body
        self.dirty = False
        self.nregions, self.nblocks, self.nextents = geometry(body)
        self.size = body["size"]
        self.vol_fd = self._open_volume()
        self.al_fd = os.open(self.sd.p("al"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.recovered = None
        self._check_closed_digests()
        if not body["clean"]:
            self.recovered = self._recover()
        # every file is opened and checked before anything is written: a
        # start refused for a damaged file leaves the log as it was
        self.maps = self._open_maps(self.open_interval)
        snaps = [(sp["name"], Snapshot(self.sd, body, sp["snapshot"]))
                 for sp in body["snappoints"] if sp["snapshot"]]
        self._reset_al()
        self.vol = native.Volume(self.vol_fd, self.size, body["region_size"],
                                 body["block_size"], self.al_fd, body["al_extent"], AL_HEADER)
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

    def start(self):
        """Called once the server serves (nbdkit's after_fork): from now on
        a stop without close() is unclean.  Until then nothing was written,
        so a server that fails to start (e.g. its socket is taken) leaves
        the state as it found it."""
        with self.lock:
            self.body["clean"] = False
            self._save()
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

    def _check_closed_digests(self):
        for iv in self.body["intervals"][:-1]:
            for k in KINDS:
                p = self.sd.p("maps", iv["maps"][k])
                try:
                    d = file_digest(p)
                except FileNotFoundError:
                    raise StateError(f"map file {p} is missing: the state directory is damaged")
                if d != iv["digests"][k]:
                    raise StateError(f"map file {p} is corrupt (digest mismatch): the state "
                                     "directory is damaged; nothing was changed")

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
        body = self.body
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
        for sp in body["snappoints"]:
            if sp["snapshot"]:
                for p in (self.sd.p("snaps", f"s{sp['snapshot']['id']}.img"),
                          self.sd.p("maps", f"s{sp['snapshot']['id']}.vmap")):
                    if os.path.exists(p):
                        os.unlink(p)
                sp["snapshot"] = None
                sp["invalidated"] = "unclean stop: snapshot not trusted"
                dropped.append(sp["name"])
        for name in os.listdir(self.sd.p("snaps")):
            os.unlink(self.sd.p("snaps", name))
        self._save()
        info = {"al_extents": extents, "orphan_maps_merged": merged_orphans,
                "snapshots_dropped": dropped}
        log.warning("recovered from an unclean stop: %d activity-log extents marked changed, "
                    "%d orphan maps merged, snapshots dropped: %s", extents, merged_orphans,
                    ", ".join(dropped) or "none")
        return info

    def _save(self):
        """Writes the in-memory metadata durably.  If that fails (e.g. the
        state filesystem is full) the server keeps the in-memory truth and
        retries on every housekeeping tick (self.dirty)."""
        self.dirty = True
        self.sd.write_meta(self.body)
        self.dirty = False

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

    def _next_file_id(self):
        n = self.body["next_file_id"]
        self.body["next_file_id"] = n + 1
        return n

    def create_snappoint(self, name, dataless=False):
        check_name(name)
        with self.lock:
            self._check_open()
            if any(sp["name"] == name for sp in self.body["snappoints"]):
                raise RefusedError(f"snappoint {name!r} already exists in {self.sd}")
            if not dataless and len(self.snaps) >= MAX_SNAPSHOTS:
                raise RefusedError(f"{MAX_SNAPSHOTS} snapshots are active already; convert or "
                                   "delete one first (prepl snappoint convert NAME --dataless)")
            body = self.body
            seq = body["next_seq"]
            iv = new_interval(seq, self._next_file_id())
            snap = None
            created = [self.sd.p("maps", f) for f in iv["maps"].values()]
            try:
                create_interval_files(self.sd, body, iv)
                new_maps = self._open_maps(iv)
                if not dataless:
                    rec = {"id": body["next_snap_id"]}
                    body["next_snap_id"] += 1          # ids are never reused
                    created += [self.sd.p("snaps", f"s{rec['id']}.img"),
                                self.sd.p("maps", f"s{rec['id']}.vmap")]
                    snap = Snapshot(self.sd, body, rec, create=True)
                    fsync_dir(self.sd.p("snaps"))
            except BaseException:
                for p in created:
                    if os.path.exists(p):
                        os.unlink(p)
                raise
            old_iv, old_maps = self.open_interval, self.maps
            # from here on the in-memory metadata must follow the switch
            self.vol.switch(self._c_maps(new_maps), snap.c if snap else None)
            faults.point("primary.snappoint.after_switch")
            t = time.time()
            self.maps = new_maps
            body["next_seq"] = seq + 1
            if snap:
                self.snaps[name] = snap
            old_iv["closed_by"] = name
            old_iv["closed_at"] = t
            # nothing writes the closed maps any more: their digests are final
            old_iv["digests"] = {k: old_maps[k].digest() for k in KINDS}
            body["intervals"].append(iv)
            body["snappoints"].append({"name": name, "seq": old_iv["seq"], "created": t,
                                       "snapshot": {"id": snap.id} if snap else None,
                                       "invalidated": None})
            self.dirty = True
            self.vol.flush()
            for m in old_maps.values():
                m.sync()
            self._save()
            faults.point("primary.snappoint.after_save")
            self.vol.al_trim()
            log.info("snappoint %s created (%s), interval %d closed", name,
                     "dataless" if dataless else "with snapshot", old_iv["seq"])
            return self.snappoint_info(self._find(name))

    def _drop_snapshot(self, sp, reason=None):
        snap = self.snaps.pop(sp["name"], None)
        if snap is not None:
            self.vol.drop_snap(snap.c)
            snap.remove(self.vol)
        sp["snapshot"] = None
        if reason:
            sp["invalidated"] = reason

    def convert_snappoint(self, name):
        with self.lock:
            self._check_open()
            sp = self._find(name)
            if sp["snapshot"] is None:
                return self.snappoint_info(sp)
            self._drop_snapshot(sp)
            self._save()
            log.info("snappoint %s converted to dataless", name)
            return self.snappoint_info(sp)

    def delete_snappoint(self, name):
        with self.lock:
            self._check_open()
            sp = self._find(name)
            users = [ln for ln, link in self.body["links"].items() if link.get("cursor") == name]
            if users:
                raise RefusedError(f"snappoint {name!r} is the base of link(s) "
                                   f"{', '.join(users)}; it cannot be deleted")
            ivs = self.body["intervals"]
            i = self._interval_closed_by(name)
            src, dst = ivs[i], ivs[i + 1]
            src_maps = self.closed_interval_maps(src)
            src_bits = self._c_maps(src_maps)
            old_files = [self.sd.p("maps", src["maps"][k]) for k in KINDS]
            self._drop_snapshot(sp)
            if dst["closed_by"] is None:
                self.vol.merge_open(src_bits)
                for m in self.maps.values():
                    m.sync()
            else:
                dmaps = self.closed_interval_maps(dst)
                fid = self._next_file_id()
                names = {k: f"i{dst['seq']}-{fid}.{k}" for k in KINDS}
                new = {k: create_copy(dmaps[k], self.sd.p("maps", names[k])) for k in KINDS}
                native.merge_interval(self._c_maps(new), src_bits, self.nregions, self.nblocks)
                for m in new.values():
                    m.sync()
                fsync_dir(self.sd.p("maps"))
                old_files += [self.sd.p("maps", dst["maps"][k]) for k in KINDS]
                dst["maps"] = names
                dst["digests"] = {k: new[k].digest() for k in KINDS}
                self.closed_maps.pop(dst["seq"], None)
            del ivs[i]
            self.body["snappoints"].remove(sp)
            self.closed_maps.pop(src["seq"], None)
            self._save()
            for p in old_files:
                os.unlink(p)
            log.info("snappoint %s deleted; interval %d merged into interval %d", name,
                     src["seq"], dst["seq"])

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
        """Persists invalidations that the C write path made (e.g. ENOSPC
        during copy-on-write) and frees those snapshots' space."""
        with self.lock:
            if self.closed:
                return
            changed = False
            for sp in self.body["snappoints"]:
                snap = self.snaps.get(sp["name"])
                if snap is not None and not snap.c.valid:
                    err = snap.c.error
                    reason = f"copy-on-write failed: {os.strerror(err)}"
                    log.error("snapshot of snappoint %s invalidated: %s", sp["name"], reason)
                    self._drop_snapshot(sp, reason)
                    changed = True
            if changed or self.dirty:
                try:
                    self._save()
                except OSError as e:
                    log.error("cannot write the metadata of %s (%s); will retry", self.sd, e)

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
            "shutdown": lambda r: self.close(),
        }

    LINK_FIELDS = ("replica_uuid", "secondary", "cursor", "state", "last_cycle", "progress")
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
            link = self.body["links"].setdefault(name, {})
            if link.get("replica_uuid") and fields.get("replica_uuid") not in \
                    (None, link["replica_uuid"]):
                raise RefusedError(f"link {name!r} replicates to replica {link['replica_uuid']},"
                                   f" not {fields['replica_uuid']}; choose another --name")
            if fields.get("cursor") is not None:
                self._find(fields["cursor"])
            link.update(fields)
            if set(fields) - self.TRANSIENT_LINK_FIELDS:
                self._save()      # what the link did is durable; its state of the
            return link           # moment and progress are not worth an fsync

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
                "links": {name: self.link_status(name, link)
                          for name, link in b["links"].items()},
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
            if self.closed:
                return
            self.check_snapshots()
            self.closed = True
            self.vol.close()
            self.vol.flush()
            for m in self.maps.values():
                m.sync()
            for s in self.snaps.values():
                s.sync()
            self.body["clean"] = True
            self._save()
            log.info("clean stop of %s", self.sd)


def _parse_map_name(name):
    """'i12-7.cmap' -> (12, 'cmap'); other names -> (None, kind)."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("i") and "-" in stem:
        try:
            return int(stem[1:].split("-")[0]), kind
        except ValueError:
            pass
    return None, kind
