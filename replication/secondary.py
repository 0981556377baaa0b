"""The secondary's replica: binding, staging, commit and atomic apply.

What it owns: a secondary state directory while its server runs (it holds
the lock): the replica volume, STATE/staging/ and the metadata.  What it
promises (invariant I1): export "" always reads as exactly the primary's
image at the snappoint of the last applied interval.

* Binding.  An unbound replica is bound, durably, by its first commit to
  the primary's volume UUID and geometry (size, region size, block size);
  from then on staging or commits from another volume or geometry are
  refused.  Opening an export never binds or changes anything.
* Staging.  Writes and zeroes to the staging export of one interval
  (stage/PRIMARY_UUID/BASE/TARGET) land in STATE/staging/data.img (sparse)
  and two block maps (data blocks, zero blocks); requests must be
  block-aligned.  Staging a new interval discards an incomplete one.  The
  first interval (initial sync) is staged in place, into the replica: until
  something is applied the replica is no image of anything to protect.
* Commit.  A manifest (primary UUID, replica UUID, geometry, base and
  target interval, extent count, bytes, digest of the staged data, see
  replication/manifest.py) is verified against the replica and against
  what was staged; the staged data is made durable, then one metadata
  write records the staging complete and the interval applied (the
  switch, below), and the receipt is returned.  A commit for an interval
  already applied returns the same receipt (idempotent).
* Apply.  Costs I/O proportional to the staged bytes, and the staged data
  is copied once.  Once the staging is durable and complete, the switch
  records the interval as applied and the staging becomes an overlay:
  reads of staged blocks come from the staging (zero blocks read as
  zeroes), all others from the replica, so export "" reads as the new
  point in time from the switch on, and a read never mixes two points (the
  switch waits for running reads only).  The receipt is returned then.  A
  merge thread copies the staging into the replica, makes it durable, and
  drops the overlay; the next staging waits for it.  A crash before the
  merge ends is recovered at the next start by redoing the merge from the
  durable, complete staging before anything is served.
* Hashing.  Each staged write is hashed as it arrives (XXH3-128, see
  replication/manifest.py); when the staged writes are exactly the manifest's pieces the commit
  needs no re-read, otherwise (a restart, other request boundaries) the
  staging is read back and hashed.
"""
import contextlib
import copy
import errno
import logging
import os
import queue
import threading
import time

import numpy as np

from . import faults, manifest, native
from .errors import RefusedError, StateError
from .maps import MapFile
from .meta import Metadata
from .state import StateDir, volume_size

log = logging.getLogger(__name__)

COMMIT_EXPORT_SIZE = 1 << 20
KEEP_RECEIPTS = 16
KEEP_STAGING = 0.25     # a staging data file up to this share of the replica is reused


class RWLock:
    """Many readers or one writer; writers wait for readers to leave."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self.longest_write_hold = 0.0      # seconds: how long readers were kept out

    def acquire_read(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            self._since = time.monotonic()
            while self._readers:
                self._cond.wait()

    def release_write(self):
        with self._cond:
            self._writer = False
            self.longest_write_hold = max(self.longest_write_hold,
                                          time.monotonic() - self._since)
            self._cond.notify_all()


def _pread_full(fd, n, off):
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), off + len(out))
        if not chunk:
            out += bytes(n - len(out))      # sparse file's tail
            break
        out += chunk
    return bytes(out)


class _Worker:
    """A daemon thread working through a queue of items (work(item)); a
    failure is logged and the next item taken.  Items put before start()
    wait for it: the server starts its threads in after_fork, never while
    nbdkit is still starting up.  wait() returns once every item put so
    far is done; close() ends the thread."""
    name = "prepl-worker"
    background = False      # run at a lower CPU priority (_background_priority)

    def __init__(self):
        self.cond = threading.Condition()
        self.pending = 0
        self.queue = queue.SimpleQueue()
        self.thread = None

    def start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def put(self, item):
        with self.cond:
            self.pending += 1
        self.queue.put(item)

    def _run(self):
        if self.background:
            _background_priority()
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                self.work(item)
            except OSError as e:
                log.warning("%s: %s", self.name, e)
            finally:
                with self.cond:
                    self.pending -= 1
                    self.cond.notify_all()

    def work(self, item):
        raise NotImplementedError

    def abandon(self, item):
        """An item left undone by close() before start()."""

    def wait(self):
        with self.cond:
            self.cond.wait_for(lambda: self.pending == 0)

    def close(self):
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            return
        while not self.queue.empty():
            self.abandon(self.queue.get())


class _Writeback(_Worker):
    """Starts the writeback of staged data in a thread of its own, once per
    STEP bytes staged, so the commit's fdatasync finds little left to write
    and no request pays for starting it.  (A sync_file_range per staged
    request cost a 1400-request transfer about 0.08 s; with none at all the
    commit's fdatasync took about as long.)  Advisory: the commit's
    fdatasync reports write errors."""
    name = "prepl-writeback"
    STEP = 8 << 20

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.staged_bytes = 0
        self.kicks = 0

    def staged(self, fd, n):
        with self.lock:
            self.staged_bytes += n
            if self.staged_bytes < self.STEP:
                return
            self.staged_bytes = 0
            # its own descriptor: the staging may be closed or removed meanwhile
            self.put(os.dup(fd))

    def work(self, fd):
        try:
            native.start_writeback(fd, 0, 0)      # 0: to the end of the file
            self.kicks += 1
        finally:
            os.close(fd)

    abandon = os.close


class _Reaper(_Worker):
    """Removes staging files moved to STATE/trash/ in a thread of its own,
    shrinking each from its end a step at a time first: freeing a file of
    scattered blocks at once (unlink) took seconds on a filesystem mounted
    with discard, and nothing should wait for it.  Files left by a stop are
    taken up again at the next start."""
    name = "prepl-reaper"
    background = True
    STEP = 8 << 20

    def __init__(self, directory):
        super().__init__()
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in sorted(os.listdir(directory)):
            self.put(os.path.join(directory, name))

    def discard(self, path):
        """Moves path into the trash (at once) and queues its removal."""
        dest = os.path.join(self.dir, f"{time.time_ns()}.img")
        os.rename(path, dest)
        self.put(dest)

    def work(self, path):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            while size > 0:
                size = max(0, size - self.STEP)
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
        os.unlink(path)


def _background_priority(niceness=10):
    """Lowers the calling thread's CPU priority (Linux: a thread id is a
    process id to setpriority), so that the server's request threads are
    served first; never raises it."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except OSError as e:            # not fatal: the merge just competes as before
        log.info("could not lower a background thread's priority: %s", e)


class Replica:
    def __init__(self, path):
        self.sd = StateDir(path)
        body = self.sd.read_meta()
        if body["role"] != "secondary":
            raise StateError(f"{self.sd} is a {body['role']} state directory, not a secondary")
        self._lockfile = self.sd.lock()
        for key, empty in (("bound", None), ("applied", None), ("receipts", []),
                           ("staging", None)):
            body.setdefault(key, empty)      # absent means empty: nothing to write
        self.md = Metadata(self.sd.path, body)
        self.size = body["size"]
        self.block = body["block_size"]
        self.nblocks = -(-self.size // self.block)
        have = volume_size(body["volume"])
        if have != self.size:
            raise StateError(f"replica {body['volume']} is {have} bytes but {self.sd} records "
                             f"{self.size}; refusing to serve it (nothing was changed)")
        self.fd = os.open(body["volume"], os.O_RDWR | os.O_CLOEXEC)
        self.lock = threading.RLock()      # staging and commit state
        self.rw = RWLock()                 # replica reads vs the apply switch
        self.stage_users = RWLock()        # staging requests vs the end of their staging
        self.overlay = False               # reads of staged blocks come from the staging
        self.merger = None                 # the merge thread of the last switch
        self.merge_error = None
        self.hashes = {}                   # offset -> (length, piece hash) of staged writes
        self.hash_locks = [threading.Lock() for _ in range(64)]
        self.writeback = _Writeback()
        self.reaper = _Reaper(self.sd.p("trash"))
        os.makedirs(self.sd.p("staging"), mode=0o700, exist_ok=True)
        self.stage = None
        self.uri = None
        st = body["staging"]
        if st and st["state"] == "complete":
            log.warning("redoing the apply of interval %s from its durable staging",
                        st["target"])
            self._open_staging(st.get("in_place", False), complete=True)
            if self._applied_seq() != st["target"]:    # recorded with "complete"
                raise StateError(f"{self.sd}: a complete staging of interval {st['target']} "
                                 "that is not recorded as applied: the metadata is damaged")
            self._serve_overlay(st)
            self._merge(st)
        elif st:
            self._open_staging(st.get("in_place", False))

    @property
    def body(self):
        """The metadata as last written (read-only: change it through
        self.md.change())."""
        return self.md.body

    # ---- identity ------------------------------------------------------
    def info(self):
        b = self.body
        return {"role": "secondary", "replica_uuid": b["volume_uuid"], "size": b["size"],
                "region_size": b["region_size"], "block_size": b["block_size"],
                "bound": b["bound"], "applied": b["applied"],
                "tracked_since_empty": b["tracked_since_empty"],
                "staging": {k: v for k, v in b["staging"].items() if k != "files"}
                if b["staging"] else None}

    def check_stage_name(self, primary_uuid, base, target):
        """Refuses (RefusedError) a staging export this replica will never
        accept; opening changes nothing."""
        bound = self.body["bound"]
        if bound and bound["primary_uuid"] != primary_uuid:
            raise RefusedError(f"replica {self.body['volume_uuid']} is bound to primary volume "
                               f"{bound['primary_uuid']}, not {primary_uuid}")
        applied = self._applied_seq()
        if base != (applied if applied is not None else "none"):
            raise RefusedError(f"stale or out-of-order interval: the replica has applied "
                               f"{applied if applied is not None else 'nothing'}, "
                               f"the staging starts from {base}")

    def _applied_seq(self):
        a = self.body["applied"]
        return str(a["target"]["seq"]) if a else None

    # ---- reads of the replica -------------------------------------------
    def pread(self, buf, offset):
        n = len(buf)
        self.rw.acquire_read()
        try:
            if not self.overlay:
                buf[:] = _pread_full(self.fd, n, offset)
                return
            # the overlay: each block from the staging (data), zeroes, or
            # the replica; runs of one kind are read at once
            b0, b1 = offset // self.block, (offset + n - 1) // self.block
            kinds = (_bits(self.stage["data"].bits, b0, b1)
                     + 2 * _bits(self.stage["zero"].bits, b0, b1))
            cuts = np.flatnonzero(np.diff(kinds)) + 1
            for first, last in zip([0] + cuts.tolist(), cuts.tolist() + [len(kinds)]):
                lo = max(offset, (b0 + first) * self.block)
                hi = min(offset + n, (b0 + last) * self.block)
                kind = kinds[first]
                view = memoryview(buf)[lo - offset:hi - offset]
                if kind >= 2:
                    view[:] = bytes(hi - lo)
                else:
                    view[:] = _pread_full(self.stage["fd"] if kind else self.fd, hi - lo, lo)
        finally:
            self.rw.release_read()

    # ---- staging -----------------------------------------------------------
    def _open_staging(self, in_place, complete=False):
        """in_place: the first interval (nothing applied yet, so the replica
        is no point in time of anything) is staged straight into the replica:
        an initial sync writes its data once, not twice.  A staging still
        receiving without data.bmap (a stop while an earlier staging was
        being removed: data.bmap goes first, data.img last) starts afresh;
        the agent sends its interval whole again.  Any other missing file,
        and any missing file of a complete staging, is damage: the map's
        FileNotFoundError ends the start."""
        maps = [self.sd.p("staging", n) for n in ("data.bmap", "zero.bmap")]
        data = self.sd.p("staging", "data.img")
        create = not complete and not os.path.exists(maps[0])
        if create and os.path.exists(maps[1]):
            os.unlink(maps[1])
        if in_place:
            fd = os.dup(self.fd)
        elif create:
            # a data file kept from the last interval is written over: only
            # the blocks of the maps created here count, the rest is never read
            fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, self.size)
        else:
            fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
        self.stage = {
            "receiving": not complete,      # see _staging_request
            "fd": fd,
            "data": MapFile(maps[0], self.nblocks, create=create),
            "zero": MapFile(maps[1], self.nblocks, create=create),
        }

    def _close_staging(self, held=False):
        """Closes the staging's descriptor; its running requests end first
        (held: the caller holds _staging_held already)."""
        with contextlib.nullcontext() if held else self._staging_held():
            self.hashes = {}
            if self.stage:
                os.close(self.stage["fd"])
                self.stage = None

    def _discard_staging(self, held=False):
        """Removes the staging's files (the caller records that it is gone,
        before or after, see _open_staging): its maps are removed; its data
        file is kept for the next staging while it holds at most
        KEEP_STAGING of the replica's size (its blocks are then allocated
        already, and nothing is freed per interval), else it goes to the
        reaper."""
        self._close_staging(held)
        # data.bmap first, data.img last: a stop in between leaves a staging
        # that starts afresh (see _open_staging)
        names = sorted(os.listdir(self.sd.p("staging")),
                       key=lambda n: (n == "data.img", n != "data.bmap"))
        for name in names:
            path = self.sd.p("staging", name)
            if name != "data.img":
                os.unlink(path)
            elif os.stat(path).st_blocks * 512 > self.size * KEEP_STAGING:
                self.reaper.discard(path)

    def begin_staging(self, primary_uuid, base, target):
        """The staging area of interval base->target, created on its first
        write; another incomplete staging is discarded.  Waits for the merge
        of the previous interval."""
        with self.lock:
            self.check_stage_name(primary_uuid, base, target)
            self._finish_merge()
            st = self.body["staging"]
            key = {"primary_uuid": primary_uuid, "base": base, "target": target}
            if st and all(st[k] == v for k, v in key.items()) and self.stage:
                return self.stage
            if st and st["state"] == "complete":
                raise RefusedError("a complete staging is waiting to be applied")
            # the files of a receiving staging go before the record does: a
            # stop in between leaves a receiving staging without data.bmap,
            # which starts afresh (_open_staging)
            self._discard_staging()
            in_place = self.body["applied"] is None
            try:
                self._open_staging(in_place)
                with self.md.change() as new:
                    new["staging"] = dict(key, state="receiving", started=time.time(),
                                          in_place=in_place)
            except BaseException:
                self._close_staging()
                raise
            log.info("staging interval %s -> %s from primary %s", base, target, primary_uuid)
            return self.stage

    def check_aligned(self, length, offset):
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"request [{offset}, {offset + length}) is outside "
                          f"the replica of {self.size} bytes")
        if offset % self.block or (length % self.block and offset + length != self.size):
            raise OSError(errno.EINVAL, f"staging requests must be aligned to {self.block} "
                          f"bytes (offset {offset}, length {length})")

    @contextlib.contextmanager
    def _staging_request(self, stage):
        """A request on a connection of staging `stage` (what begin_staging
        returned; None: the staging receiving now) runs in this context,
        which yields the staging.  A staging ends when its commit completes
        it or when it is discarded (replaced, or merged): its descriptor
        may then be closed or reused, so a request of a connection from
        an earlier cycle is refused; a staging never ends while one of its
        requests runs (stage_users)."""
        self.stage_users.acquire_read()
        try:
            cur = self.stage
            if cur is None or not cur["receiving"] or (stage is not None and stage is not cur):
                raise OSError(errno.EPERM, "the staging of this connection has ended (its "
                              "interval was committed, or another staging replaced it): "
                              "open the staging export of the current interval")
            yield cur
        finally:
            self.stage_users.release_read()

    @contextlib.contextmanager
    def _staging_held(self):
        """No staging request runs in this context: running ones end first,
        new ones wait (and are refused if their staging ended meanwhile)."""
        self.stage_users.acquire_write()
        try:
            yield
        finally:
            self.stage_users.release_write()

    def stage_write(self, buf, offset, stage=None):
        self.check_aligned(len(buf), offset)
        with self._staging_request(stage) as st:
            self._stage_write(st, buf, offset)

    def _stage_write(self, st, buf, offset):
        with self.hash_locks[(offset // manifest.PIECE) % len(self.hash_locks)]:
            # what is on disk at offset is what was hashed last there; a
            # failed write leaves no hash (the commit then reads it back)
            self.hashes.pop(offset, None)
            self.hashes[offset] = (len(buf), native.stage_write(
                st["fd"], buf, offset, st["data"].bits, st["zero"].bits, self.nblocks,
                self.block))
        self.writeback.staged(st["fd"], len(buf))

    def stage_batch(self, entries, data, stage=None):
        """A decoded batch (replication/pack.py): its data entries staged in
        one C call without the GIL, then its zero entries.  The caller has
        checked every entry's range and alignment."""
        with self._staging_request(stage) as st:
            self._stage_batch(st, entries, data)

    def _stage_batch(self, st, entries, data):
        writes = [(o, n) for o, n, z in entries if not z]
        locks = sorted({(o // manifest.PIECE) % len(self.hash_locks) for o, _ in writes})
        for i in locks:
            self.hash_locks[i].acquire()
        try:
            for o, _ in writes:         # a failed write leaves no hash (see stage_write)
                self.hashes.pop(o, None)
            hashes = native.stage_batch(st["fd"], data, [o for o, _ in writes],
                                        [n for _, n in writes], st["data"].bits,
                                        st["zero"].bits, self.nblocks, self.block)
            for (o, n), h in zip(writes, hashes):
                self.hashes[o] = (n, h)
        finally:
            for i in locks:
                self.hash_locks[i].release()
        self.writeback.staged(st["fd"], len(data))
        for o, n, z in entries:
            if z:
                self._stage_zero(st, n, o)

    def stage_zero(self, length, offset, stage=None):
        self.check_aligned(length, offset)
        with self._staging_request(stage) as st:
            self._stage_zero(st, length, offset)

    def _stage_zero(self, st, length, offset):
        b0, n = offset // self.block, -(-length // self.block)
        native.bm_clear(st["data"].bits, self.nblocks, b0, n)
        native.bm_set(st["zero"].bits, self.nblocks, b0, n)

    def stage_flush(self, stage=None):
        with self._staging_request(stage) as st:
            os.fdatasync(st["fd"])

    def _staged_runs(self):
        st = self.stage
        return manifest.runs(st["data"].bits, st["zero"].bits, self.nblocks, self.block,
                             self.size)

    # ---- commit ------------------------------------------------------------
    def receipt_for(self, target_seq):
        for r in self.body["receipts"]:
            if r["target"]["seq"] == target_seq:
                return r
        return None

    def commit(self, m):
        """Verifies manifest m against the replica and the staging, applies
        the interval atomically, returns the receipt.  Idempotent."""
        t0 = time.monotonic()
        with self.lock, self._staging_held():
            b = self.body
            manifest.check_replica(m, b)
            done = self.receipt_for(m["target"]["seq"])
            if done is not None and done["manifest_digest"] == manifest.fingerprint(m):
                return done
            geometry = {k: b[k] for k in manifest.GEOMETRY}
            self.check_stage_name(m["primary_uuid"], manifest.base_key(m["base"]),
                                  str(m["target"]["seq"]))
            st = b["staging"]
            if not st or st["primary_uuid"] != m["primary_uuid"] or \
                    st["base"] != manifest.base_key(m["base"]) or \
                    st["target"] != str(m["target"]["seq"]) or self.stage is None:
                raise RefusedError("nothing is staged for this interval; stage it first")
            d = self._staged_digest()
            manifest.check_staged(m, d)
            # the staged data durable, then one metadata write records it
            # complete and applied (the switch); the merge comes after
            t1 = time.monotonic()
            self._make_staging_durable()
            t2 = time.monotonic()
            faults.point("secondary.commit.staged_durable")
            new = copy.deepcopy(b)
            st = new["staging"]
            st.update(state="complete", manifest=m, manifest_digest=manifest.fingerprint(m),
                      bytes=d.data_bytes, zero_bytes=d.zero_bytes)
            if new["bound"] is None:
                new["bound"] = {"primary_uuid": m["primary_uuid"], "bound_at": time.time(),
                                **geometry}
            receipt = self._record_applied(new)
            self.md.commit(new)            # durable first, then visible
            self._serve_overlay(st)
            self.stage["receiving"] = False     # its connections' requests are refused now
            log.info("commit of interval %s: verified in %.3f s, staging durable in %.3f s, "
                     "switched in %.3f s", m["target"]["seq"], t1 - t0, t2 - t1,
                     time.monotonic() - t2)
            faults.point("secondary.commit.after_switch")
            self.merger = threading.Thread(target=self._merge_in_background, args=(st,),
                                           name="prepl-merge", daemon=True)
            self.merger.start()
            return receipt

    def _staged_digest(self):
        """The digest of what is staged: from the hashes taken on arrival
        when the staged writes are exactly the transfer's pieces, else by
        reading the staging back."""
        run_list = self._staged_runs()
        pieces = list(manifest.pieces(run_list))
        data = [(o, n) for o, n, z in pieces if not z]
        if len(data) == len(self.hashes) and all(self.hashes.get(o, (None,))[0] == n
                                                 for o, n in data):
            d = manifest.Digest()
            for o, n, z in pieces:
                if z:
                    d.add(o, n, True)
                else:
                    d.add_hashed(o, n, self.hashes[o][1])
            return d
        return manifest.digest_of(run_list, lambda o, n: _pread_full(self.stage["fd"], n, o))

    def _make_staging_durable(self):
        """fdatasync of the staged data and maps.  A failure is never
        retried into a success (after an EIO the kernel may have dropped
        the pages, and a second fdatasync can succeed without them): the
        staging is dropped, and the agent stages the interval again."""
        try:
            faults.io("secondary.staging.fdatasync")
            os.fdatasync(self.stage["fd"])
            self.stage["data"].sync()
            self.stage["zero"].sync()
        except OSError as e:
            log.error("the staged data of interval %s could not be made durable (%s): the "
                      "staging is dropped and must be sent again", self.body["staging"]["target"],
                      e.strerror or e)
            self._discard_staging(held=True)    # commit holds it
            raise

    def _record_applied(self, new):
        """Records, in the metadata body new (not yet written), its complete
        staging as the applied interval with a receipt; returns the receipt."""
        st = new["staging"]
        m = st["manifest"]
        receipt = self.receipt_for(m["target"]["seq"])
        if receipt is None:
            receipt = {"replica_uuid": new["volume_uuid"],
                       "primary_uuid": m["primary_uuid"], "base": m["base"],
                       "target": m["target"], "manifest_digest": st["manifest_digest"],
                       "bytes": st["bytes"], "zero_bytes": st["zero_bytes"],
                       "applied_at": time.time()}
            new["receipts"] = ([receipt] + new["receipts"])[:KEEP_RECEIPTS]
        new["applied"] = {"target": m["target"], "base": m["base"],
                          "applied_at": receipt["applied_at"]}
        return receipt

    def _serve_overlay(self, st):
        """After the record: export "" reads the applied staging (the lock
        is held for a flag, not for an fsync; it waits for running reads)."""
        self.rw.acquire_write()
        try:
            self.overlay = not st.get("in_place")
        finally:
            self.rw.release_write()
        log.info("applied interval %s (%d bytes, %d zeroed)", st["manifest"]["target"],
                 st["bytes"], st["zero_bytes"])

    def _merge(self, st):
        """Copies the applied staging into the replica, makes it durable and
        drops the overlay and the staging."""
        t0 = time.monotonic()
        run_list = self._staged_runs()
        half = len(run_list) // 2
        for i, part in enumerate((run_list[:half], run_list[half:])):
            if i:
                faults.point("secondary.apply.midway")
            if not st.get("in_place"):
                native.copy_ranges(self.stage["fd"], self.fd,
                                   [(o, n) for o, n, z in part if not z])
            native.copy_ranges(-1, self.fd, [(o, n) for o, n, z in part if z], zero=True)
        os.fdatasync(self.fd)
        faults.point("secondary.apply.before_record")
        self.rw.acquire_write()            # reads leave the staging
        try:
            self.overlay = False
        finally:
            self.rw.release_write()
        # the metadata forgets the staging before its files go: a crash in
        # between leaves orphan files (the next staging clears them), never
        # a "complete" staging whose files are gone
        with self.md.change() as new:
            new["staging"] = None
        faults.point("secondary.merge.recorded")
        self._discard_staging()
        log.info("merged interval %s into the replica in %.3f s", st["target"],
                 time.monotonic() - t0)

    def _merge_in_background(self, st):
        _background_priority()
        try:
            self._merge(st)
        except BaseException as e:      # noqa: B036 -- kept for the next staging
            log.error("merging interval %s into the replica failed: %s (the overlay keeps "
                      "serving it; retried before the next staging)", st["target"], e)
            self.merge_error = e

    def _finish_merge(self):
        """Waits for the merge thread; retries a failed merge (raises if it
        fails again)."""
        if self.merger is not None:
            self.merger.join()
            self.merger = None
        if self.merge_error is not None:
            self.merge_error = None
            st = self.body["staging"]
            if st and st["state"] == "complete":
                self._merge(st)

    def wait_merged(self):
        """For tests and shutdown: the last merge is done (its error raised)."""
        if self.merger is not None:
            self.merger.join()
            self.merger = None
        if self.merge_error is not None:
            e, self.merge_error = self.merge_error, None
            raise e

    def control_handlers(self):
        return {"status": lambda r: self.status(), "shutdown": lambda r: self.close()}

    def tick(self):
        pass

    def status(self):
        return dict(self.info(), state_dir=self.sd.path, volume=self.body["volume"],
                    volume_uuid=self.body["volume_uuid"], generation=self.body["generation"],
                    pid=os.getpid(), uri=self.uri)

    def start(self):
        """The background threads (from the server's after_fork)."""
        self.writeback.start()
        self.reaper.start()

    def close(self):
        with self.lock:
            if self.merger is not None:
                self.merger.join()
            self.writeback.close()
            self.reaper.close()
            os.fdatasync(self.fd)


def _bits(words, b0, b1):
    """Bits b0..b1 (inclusive) of a bitmap of uint64 words, as uint8 0/1."""
    w0, w1 = b0 // 64, b1 // 64 + 1
    bits = np.unpackbits(np.ascontiguousarray(words[w0:w1]).view(np.uint8), bitorder="little")
    return bits[b0 - w0 * 64:b1 - w0 * 64 + 1]
