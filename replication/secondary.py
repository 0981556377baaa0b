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
* Failback (replication/roles.py).  A replica made by a failback holds
  its own writes after the divergence point on top of the new primary's
  image at the base interval: the divergence map (export "divergence")
  names their blocks, and the first interval's commit is refused unless
  its staged blocks cover every one of them; its record clears the map.
* Resuming.  Export held/PRIMARY_UUID/BASE/TARGET makes the staging of
  that interval durable and answers which blocks it holds (StagingArea.
  checkpoint); the server does the same every CHECKPOINT_SECONDS while
  writes arrive (the first one CHECKPOINT_SECONDS after the staging
  opened), and at a clean stop.  An interrupted transfer (link cut,
  agent killed, this server restarted) resumes from there: the agent
  sends only the rest, into the same staging.  A commit whose digest does
  not match the staging discards the staging, so a bad resume costs one
  more transfer, never a wrong replica.
* Hashing.  Each staged write is hashed as it arrives (XXH3-128, see
  replication/manifest.py); when the staged writes are exactly the manifest's pieces the commit
  needs no re-read, otherwise (a restart, other request boundaries) the
  staging is read back and hashed.
"""
import errno
import logging
import os
import threading
import time

import numpy as np

from . import faults, manifest, native
from .errors import RefusedError, StateError
from .maps import MapFile, digest_matches
from .meta import Applied, Binding, Metadata, Receipt, ReplicaInfo, Staging
from .staging import StagingArea
from .priority import background_priority
from .workers import RWLock, pread_full
from .state import StateDir, volume_size

log = logging.getLogger(__name__)

COMMIT_EXPORT_SIZE = 1 << 20
CHECKPOINT_SECONDS = 5
KEEP_RECEIPTS = 16


class Replica:
    def __init__(self, path, lockfile=None):
        """lockfile: the state directory's lock, taken already (a failback
        hands over the tracker's); else it is taken here."""
        self.sd = StateDir(path)
        body = self.sd.read_meta()
        if body.role != "secondary":
            raise StateError(f"{self.sd} is a {body.role} state directory, not a secondary")
        self._lockfile = lockfile or self.sd.lock()
        self.md = Metadata(self.sd.path, body)
        self.size = body.size
        self.block = body.block_size
        self.nblocks = -(-self.size // self.block)
        have = volume_size(body.volume)
        if have != self.size:
            raise StateError(f"replica {body.volume} is {have} bytes but {self.sd} records "
                             f"{self.size}; refusing to serve it (nothing was changed)")
        self.fd = os.open(body.volume, os.O_RDWR | os.O_CLOEXEC)
        self.lock = threading.RLock()      # staging and commit state
        self.rw = RWLock()                 # replica reads vs the apply switch
        self.overlay = False               # reads of staged blocks come from the staging
        self.merger = None                 # the merge thread of the last switch
        self.merge_error = None
        self.staging = StagingArea(self.sd, self.size, self.block, self.fd)
        self.uri = None
        self.remove_unnamed_files()
        st = body.staging
        if st and st.complete:
            log.warning("redoing the apply of interval %s from its durable staging", st.target)
            self.staging.open(st.in_place, complete=True)
            if self._applied_seq() != st.target:    # recorded with "complete"
                raise StateError(f"{self.sd}: a complete staging of interval {st.target} "
                                 "that is not recorded as applied: the metadata is damaged")
            self._serve_overlay(st)
            self._merge(st)
        elif st:
            self.staging.open(st.in_place)

    @property
    def body(self):
        """The metadata as last written (read-only: change it through
        self.md.change())."""
        return self.md.body

    # ---- identity ------------------------------------------------------
    def info(self):
        """The replica as the agent reads it (export "info"; status)."""
        b = self.body
        return ReplicaInfo("secondary", b.volume_uuid, b.size, b.region_size, b.block_size,
                           b.tracked_since_empty, b.bound, b.applied, b.staging,
                           b.failback).to_json()

    def divergence_map(self):
        """The bytes of a pending failback's divergence map (export
        "divergence"), checked against its digest; None if none is pending."""
        fb = self.body.failback
        if fb is None:
            return None
        path = self.sd.p("maps", fb.map)
        if not digest_matches(fb.digest, path):
            raise StateError(f"the divergence map {path} does not match its digest: the "
                             "writes this node must give up are unknown; the state "
                             "directory is damaged")
        with open(path, "rb") as f:
            return f.read()

    def _check_failback_covered(self, stage):
        """A pending failback's first interval must overwrite every block
        of the divergence map (staged data or zeroes)."""
        fb = self.body.failback
        if fb is None:
            return
        m = MapFile(self.sd.p("maps", fb.map), self.nblocks, writable=False)
        missing = native.bm_count(m.bits & ~(stage.data.bits | stage.zero.bits), self.nblocks)
        if missing:
            raise RefusedError(f"this interval leaves {missing} blocks of this node's own "
                               "writes after the divergence point (its failback's "
                               "divergence map) as they are: it would be a mix of two "
                               "volumes; the agent must send the union with the divergence "
                               "map (export \"divergence\")")

    def check_stage_name(self, primary_uuid, base, target):
        """Refuses (RefusedError) a staging export this replica will never
        accept; opening changes nothing."""
        bound = self.body.bound
        if bound and bound.primary_uuid != primary_uuid:
            raise RefusedError(f"replica {self.body.volume_uuid} is bound to primary volume "
                               f"{bound.primary_uuid}, not {primary_uuid}")
        applied = self._applied_seq()
        if base != (applied if applied is not None else "none"):
            raise RefusedError(f"stale or out-of-order interval: the replica has applied "
                               f"{applied if applied is not None else 'nothing'}, "
                               f"the staging starts from {base}")

    def _applied_seq(self):
        a = self.body.applied
        return str(a.target.seq) if a else None

    # ---- reads of the replica -------------------------------------------
    def pread(self, buf, offset):
        n = len(buf)
        self.rw.acquire_read()
        try:
            if not self.overlay:
                buf[:] = pread_full(self.fd, n, offset)
                return
            # the overlay: each block from the staging (data), zeroes, or
            # the replica; runs of one kind are read at once
            b0, b1 = offset // self.block, (offset + n - 1) // self.block
            stage = self.staging.current
            kinds = _bits(stage.data.bits, b0, b1) + 2 * _bits(stage.zero.bits, b0, b1)
            cuts = np.flatnonzero(np.diff(kinds)) + 1
            for first, last in zip([0] + cuts.tolist(), cuts.tolist() + [len(kinds)]):
                lo = max(offset, (b0 + first) * self.block)
                hi = min(offset + n, (b0 + last) * self.block)
                kind = kinds[first]
                view = memoryview(buf)[lo - offset:hi - offset]
                if kind >= 2:
                    view[:] = bytes(hi - lo)
                elif kind:
                    view[:] = self.staging.read_data(stage, lo, hi - lo)
                else:
                    view[:] = pread_full(self.fd, hi - lo, lo)
        finally:
            self.rw.release_read()

    # ---- staging -----------------------------------------------------------
    def begin_staging(self, primary_uuid, base, target):
        """The staging area of interval base->target, created on its first
        write; another incomplete staging is discarded.  Waits for the merge
        of the previous interval."""
        with self.lock:
            self.check_stage_name(primary_uuid, base, target)
            self._finish_merge()
            st = self.body.staging
            key = (primary_uuid, base, target)
            if st and st.key() == key and self.staging.current:
                return self.staging.current
            if st and st.complete:
                raise RefusedError("a complete staging is waiting to be applied")
            # the files of a receiving staging go before the record does: a
            # stop in between leaves a receiving staging without data.bmap,
            # which starts afresh (StagingArea.open)
            self.staging.discard()
            in_place = self.body.applied is None
            try:
                self.staging.open(in_place)
                with self.md.change() as new:
                    new.staging = Staging(*key, state="receiving", started=time.time(),
                                          in_place=in_place)
            except BaseException:
                self.staging.close()
                raise
            log.info("staging interval %s -> %s from primary %s", base, target, primary_uuid)
            return self.staging.current

    # ---- commit ------------------------------------------------------------
    def receipt_for(self, target_seq):
        return next((r for r in self.body.receipts if r.target.seq == target_seq), None)

    def commit(self, m):
        """Verifies manifest m against the replica and the staging, applies
        the interval atomically, returns the receipt.  Idempotent."""
        t0 = time.monotonic()
        with self.lock, self.staging.held():
            b = self.body
            manifest.check_replica(m, b)
            done = self.receipt_for(m.target.seq)
            if done is not None and done.manifest_digest == manifest.fingerprint(m):
                return done
            key = (m.primary_uuid, manifest.base_key(m.base), str(m.target.seq))
            self.check_stage_name(*key)
            st = b.staging
            if not st or st.key() != key or self.staging.current is None:
                raise RefusedError("nothing is staged for this interval; stage it first")
            d = self.staging.digest()
            try:
                manifest.check_staged(m, d)
            except RefusedError:
                self._drop_staging()
                raise
            self._check_failback_covered(self.staging.current)
            # the staged data durable, then one metadata write records it
            # complete and applied (the switch); the merge comes after
            t1 = time.monotonic()
            self.staging.make_durable(st.target, held=True)    # commit holds it
            t2 = time.monotonic()
            faults.point("secondary.commit.staged_durable")
            new = self.md.draft()
            st = new.staging
            st.state, st.manifest, st.manifest_digest = "complete", m, manifest.fingerprint(m)
            st.bytes, st.zero_bytes = d.data_bytes, d.zero_bytes
            if new.bound is None:
                new.bound = Binding(m.primary_uuid, time.time(), *b.geometry())
            receipt = self._record_applied(new)
            self.md.commit(new)            # durable first, then visible
            self.staging.complete()        # its connections' requests are refused now
            self._serve_overlay(st)
            log.info("commit of interval %s: verified in %.3f s, staging durable in %.3f s, "
                     "switched in %.3f s", m.target.seq, t1 - t0, t2 - t1,
                     time.monotonic() - t2)
            faults.point("secondary.commit.after_switch")
            self.merger = threading.Thread(target=self._merge_in_background, args=(st,),
                                           name="prepl-merge", daemon=True)
            self.merger.start()
            return receipt

    def _drop_staging(self):
        """A receiving staging that cannot be applied: its files go, then
        its record (see begin_staging); the interval must be sent whole."""
        self.staging.discard(held=True)
        with self.md.change() as new:
            new.staging = None
        log.warning("the staging did not match its manifest and was dropped: the interval "
                    "must be sent again")

    # ---- resuming ----------------------------------------------------------
    def held(self, key):
        """Export held/KEY: the staging of interval key (primary UUID, base,
        target) made durable; the bytes of the blocks it holds (data map
        words, then zero map words).  ENOENT if that staging is not the
        one receiving."""
        with self.lock:
            st = self.body.staging
            if not st or st.key() != tuple(key) or st.complete or self.staging.current is None:
                raise OSError(errno.ENOENT, "no staging of that interval is receiving")
            data, zero = self.staging.checkpoint()
        log.info("staging of interval %s: %d blocks held durably", st.target,
                 self.staging.held_blocks())
        return data.tobytes() + zero.tobytes()

    def _checkpoint_now(self, at_stop=False):
        """The periodic checkpoint of a receiving staging (tick, close)."""
        with self.lock:
            st, area = self.body.staging, self.staging
            if not st or st.complete or area.current is None or area.staged == area.seen:
                return
            # every CHECKPOINT_SECONDS of receiving: not in a staging's first
            # seconds (a cycle's transfer of a fraction of a second would pay
            # an fdatasync midway for a resume that saves nothing)
            since = area.checkpointed[0] if area.checkpointed else area.opened_at
            if not at_stop and time.time() - since < CHECKPOINT_SECONDS:
                return
            area.seen = area.staged
            area.checkpoint()

    def _record_applied(self, new):
        """Records, in the metadata body new (not yet written), its complete
        staging as the applied interval with a receipt; returns the receipt."""
        st = new.staging
        m = st.manifest
        receipt = self.receipt_for(m.target.seq)
        if receipt is None:
            receipt = Receipt(new.volume_uuid, m.primary_uuid, m.base, m.target,
                              st.manifest_digest, st.bytes, st.zero_bytes, time.time())
            new.receipts = ([receipt] + new.receipts)[:KEEP_RECEIPTS]
        new.applied = Applied(m.target, m.base, receipt.applied_at)
        new.failback = None       # its map's file goes with the merge's cleanup
        return receipt

    def _serve_overlay(self, st):
        """After the record: export "" reads the applied staging (the lock
        is held for a flag, not for an fsync; it waits for running reads)."""
        self.rw.acquire_write()
        try:
            self.overlay = not st.in_place
        finally:
            self.rw.release_write()
        log.info("applied interval %s (%d bytes, %d zeroed)", st.target, st.bytes,
                 st.zero_bytes)

    def _merge(self, st):
        """Copies the applied staging into the replica, makes it durable and
        drops the overlay and the staging."""
        t0 = time.monotonic()
        run_list = self.staging.runs()
        half = len(run_list) // 2
        for i, part in enumerate((run_list[:half], run_list[half:])):
            if i:
                faults.point("secondary.apply.midway")
            if not st.in_place:
                self.staging.copy_data(self.staging.current, self.fd,
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
            new.staging = None
        faults.point("secondary.merge.recorded")
        self.staging.discard()
        self.remove_unnamed_files()
        log.info("merged interval %s into the replica in %.3f s", st.target,
                 time.monotonic() - t0)

    def _merge_in_background(self, st):
        background_priority()
        try:
            self._merge(st)
        except BaseException as e:      # noqa: B036 -- kept for the next staging
            log.error("merging interval %s into the replica failed: %s (the overlay keeps "
                      "serving it; retried before the next staging)", st.target, e)
            self.merge_error = e

    def remove_unnamed_files(self):
        """Files in maps/ and snaps/ that the metadata does not name: a
        failback's old chain, an applied failback's divergence map."""
        b = self.body
        named = {f for iv in b.intervals for f in iv.maps.values()}
        if b.failback:
            named.add(b.failback.map)
        for d in ("maps", "snaps"):
            for name in os.listdir(self.sd.p(d)):
                if name not in named:
                    os.unlink(self.sd.p(d, name))

    def _finish_merge(self):
        """Waits for the merge thread; retries a failed merge (raises if it
        fails again)."""
        if self.merger is not None:
            self.merger.join()
            self.merger = None
        if self.merge_error is not None:
            self.merge_error = None
            st = self.body.staging
            if st and st.complete:
                self._merge(st)

    def quiesce(self):
        """Before a role change (the caller holds self.lock): the last merge
        is done and an incomplete staging is discarded (the change's record
        forgets it).  Returns whether a merge was still running."""
        running = self.merger is not None and self.merger.is_alive()
        self._finish_merge()
        self.staging.discard()
        return running

    def hand_over_lock(self):
        """The state directory's lock, for what serves it next (failover)."""
        f, self._lockfile = self._lockfile, None
        return f

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
        self._checkpoint_now()

    def status(self):
        return dict(self.info(), state_dir=self.sd.path, volume=self.body.volume,
                    volume_uuid=self.body.volume_uuid, generation=self.body.generation,
                    pid=os.getpid(), uri=self.uri,
                    staging_held_bytes=self._bytes(self.staging.held_blocks()),
                    staging_received_bytes=self._bytes(self.staging.staged_blocks()),
                    frame_stack_cache=native.frame_stack_cache_stats())

    def _bytes(self, blocks):
        return min(blocks * self.block, self.size)

    def start(self):
        """The background threads (from the server's after_fork)."""
        self.staging.start()

    def close(self):
        try:        # a receiving staging resumes from all it holds
            self._checkpoint_now(at_stop=True)
        except OSError as e:
            log.error("the last checkpoint of the staging failed: %s", e)
        with self.lock:
            if self.merger is not None:
                self.merger.join()
            self.staging.stop()
            os.fdatasync(self.fd)


def _bits(words, b0, b1):
    """Bits b0..b1 (inclusive) of a bitmap of uint64 words, as uint8 0/1."""
    w0, w1 = b0 // 64, b1 // 64 + 1
    bits = np.unpackbits(np.ascontiguousarray(words[w0:w1]).view(np.uint8), bitorder="little")
    return bits[b0 - w0 * 64:b1 - w0 * 64 + 1]
