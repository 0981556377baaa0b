"""The secondary's staging area: where one interval is received before it
is applied.

What it owns: STATE/staging/ -- the staged data (data.log, appended in
arrival order: replication/staginglog.py; the replica itself for the first
interval, staged in place; data.img, at the replica's offsets, for a
staging an earlier version left) and two block maps (data blocks, zero
blocks) -- the hashes of the staged writes, and the writeback and reaper
threads.  What it promises:

* Requests must be block-aligned and inside the replica (check_aligned).
* A request reaches only the staging its connection started (request()):
  once that staging ends -- its commit completes it, or it is discarded --
  a request of an earlier connection is refused (EPERM), and a staging
  never ends while one of its requests runs (held()).
* Staged writes are hashed as they arrive (XXH3-128, one C call per write
  or batch), so a commit whose writes are exactly the manifest's pieces
  needs no re-read (digest()).
* make_durable() never retries an fdatasync into a success: on failure the
  staging is discarded and the interval must be sent again.
* Files go data.bmap first, the data file last: a stop in between leaves a
  receiving staging that starts afresh; a data file of at most KEEP of the
  replica's size is kept for the next interval (its blocks are allocated
  already), a larger one goes to the reaper.
* What a receiving staging durably holds is known (checkpoint()): its
  data made durable, then staging/held.idx records where the writes staged
  so far are in the log, then staging/held.bmap the blocks that were
  staged (the data map's words, then the zero map's).  A resumed transfer
  sends only the rest; after a crash or stop the staging is reopened with
  exactly those blocks (open()), since the maps' own bits may name writes
  whose data never reached the disk.
* A staging made durable for its commit has its log's index in
  staging/data.idx: a complete staging is applied again from the log and
  that index after a crash.
"""
import contextlib
import dataclasses
import errno
import logging
import os
import threading
import time

import numpy as np

from . import faults, manifest, native
from .errors import StateError
from .maps import MapFile
from .meta import fsync_dir
from .staginglog import StagingLog, replace_durably
from .workers import RWLock, Reaper, Writeback, pread_full

log = logging.getLogger(__name__)

KEEP = 0.25     # a staging data file up to this share of the replica is reused
HELD = "held.bmap"
HELD_IDX = "held.idx"       # where held.bmap's data blocks are in the log
DATA_IDX = "data.idx"       # the log's index, once made durable for a commit
LOG = "data.log"
LEGACY = "data.img"         # the data file of a staging an earlier version left
DATA_FILES = (LOG, LEGACY)


@dataclasses.dataclass(eq=False)
class Stage:
    """One staging's open files: requests of its connections are accepted
    while it is receiving (see request())."""
    receiving: bool
    fd: int                           # data.log, a dup of the replica's (in place) or data.img
    data: MapFile                     # blocks staged with data
    zero: MapFile                     # blocks staged as zeroes
    log: StagingLog = None            # data.log's index; None: data at the replica's offsets


class StagingArea:
    def __init__(self, sd, size, block, replica_fd):
        self.sd, self.size, self.block = sd, size, block
        self.nblocks = -(-size // block)
        self.replica_fd = replica_fd
        self.current = None               # the Stage being received or applied, or None
        self.hashes = {}                  # offset -> (length, piece hash) of staged writes
        self.hash_locks = [threading.Lock() for _ in range(64)]
        self.users = RWLock()             # staging requests vs the end of their staging
        self.writeback = Writeback()
        self.reaper = Reaper(sd.p("trash"))
        self.checkpointed = None          # (time, held data bits, held zero bits)
        self.opened_at = 0.0              # time the current staging was opened
        self.staged = self.seen = 0       # requests staged; as of the last periodic checkpoint
        os.makedirs(sd.p("staging"), mode=0o700, exist_ok=True)

    # ---- lifetime ------------------------------------------------------------
    def open(self, in_place, complete=False):
        """in_place: the first interval (nothing applied yet, so the replica
        is no point in time of anything) is staged straight into the replica:
        an initial sync writes its data once, not twice.  A staging still
        receiving without data.bmap starts afresh; the agent sends its
        interval whole again.  Any other missing file, and any missing file
        of a complete staging, is damage: the map's FileNotFoundError ends
        the start."""
        maps = [self.sd.p("staging", n) for n in ("data.bmap", "zero.bmap")]
        logp, legacy = (self.sd.p("staging", n) for n in (LOG, LEGACY))
        create = not complete and not os.path.exists(maps[0])
        for stale in (maps[1], *(self.sd.p("staging", n) for n in (HELD, HELD_IDX, DATA_IDX))) \
                if create else ():
            if os.path.exists(stale):
                os.unlink(stale)
        if create and os.path.exists(legacy):
            self.reaper.discard(legacy)
        log = None
        if in_place:
            fd = os.dup(self.replica_fd)
        elif not create and not os.path.exists(logp) and os.path.exists(legacy):
            fd = os.open(legacy, os.O_RDWR | os.O_CLOEXEC)
        else:
            # a log kept from the last interval is written over from its
            # start: only what this staging's index names is ever read
            fd = os.open(logp, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
            try:
                entries = StagingLog.load(self.sd.p("staging", DATA_IDX), self.size,
                                          os.fstat(fd).st_size) if complete else None
            except BaseException:
                os.close(fd)
                raise
            log = StagingLog(fd, self.block, self.size, entries,
                             tail=0 if create else os.fstat(fd).st_size)
        self.current = Stage(not complete, fd, MapFile(maps[0], self.nblocks, create=create),
                             MapFile(maps[1], self.nblocks, create=create), log)
        self.checkpointed = None
        self.opened_at = time.time()
        if complete and log:
            log.freeze(self.current.data.bits)
        if not complete and not create:
            self._reopen_held()
        return self.current

    def _reopen_held(self):
        """A receiving staging after a stop or crash holds what its last
        checkpoint recorded, nothing more."""
        st, path = self.current, self.sd.p("staging", HELD)
        words = len(st.data.bits)
        held = np.zeros(2 * words, dtype=np.uint64)
        if os.path.exists(path):
            with open(path, "rb") as f:
                doc = f.read()
            if len(doc) == held.nbytes:
                held = np.frombuffer(doc, dtype=np.uint64)
            else:
                log.warning("%s has %d bytes, not %d: the staging starts afresh", path,
                            len(doc), held.nbytes)
        if st.log is not None:
            # held.idx is written before held.bmap: it names at least what
            # held.bmap's data blocks need
            try:
                st.log.chunks = [StagingLog.load(self.sd.p("staging", HELD_IDX), self.size,
                                                 os.fstat(st.fd).st_size)]
            except (OSError, StateError) as e:
                if held.any():
                    log.warning("the staging's held index cannot be read (%s): the staging "
                                "starts afresh", e)
                held = np.zeros(2 * words, dtype=np.uint64)
        st.data.bits[:] = held[:words] & st.data.bits
        st.zero.bits[:] = held[words:] & st.zero.bits
        st.data.sync()
        st.zero.sync()
        self.checkpointed = (time.time(), st.data.bits.copy(), st.zero.bits.copy())
        log.info("staging reopened: %d blocks held", self.held_blocks())

    def close(self, held=False):
        """Closes the staging's descriptor; its running requests end first
        (held: the caller holds held() already)."""
        with contextlib.nullcontext() if held else self.held():
            self.hashes = {}
            if self.current:
                os.close(self.current.fd)
                self.current = None

    def discard(self, held=False):
        """Closes the staging and removes its files (the caller records that
        it is gone, before or after, see open())."""
        self.close(held)
        self.checkpointed = None
        names = sorted(os.listdir(self.sd.p("staging")),
                       key=lambda n: (n in DATA_FILES, n != "data.bmap"))
        for name in names:
            path = self.sd.p("staging", name)
            if name not in DATA_FILES:
                os.unlink(path)
            elif os.stat(path).st_blocks * 512 > self.size * KEEP:
                self.reaper.discard(path)

    def complete(self):
        """The staging is applied: its connections' requests are refused
        (and its log's places are looked up once)."""
        self.current.receiving = False
        if self.current.log is not None:
            self.current.log.freeze(self.current.data.bits)

    @contextlib.contextmanager
    def request(self, stage):
        """A request on a connection of staging `stage` (what open returned;
        None: the staging receiving now) runs in this context, which yields
        the staging; refused (EPERM) once that staging has ended."""
        self.users.acquire_read()
        try:
            cur = self.current
            if cur is None or not cur.receiving or (stage is not None and stage is not cur):
                raise OSError(errno.EPERM, "the staging of this connection has ended (its "
                              "interval was committed, or another staging replaced it): "
                              "open the staging export of the current interval")
            yield cur
        finally:
            self.users.release_read()

    @contextlib.contextmanager
    def held(self):
        """No staging request runs in this context: running ones end first,
        new ones wait (and are refused if their staging ended meanwhile)."""
        self.users.acquire_write()
        try:
            yield
        finally:
            self.users.release_write()

    # ---- requests ------------------------------------------------------------
    def check_aligned(self, length, offset):
        if offset < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"request [{offset}, {offset + length}) is outside "
                          f"the replica of {self.size} bytes")
        if offset % self.block or (length % self.block and offset + length != self.size):
            raise OSError(errno.EINVAL, f"staging requests must be aligned to {self.block} "
                          f"bytes (offset {offset}, length {length})")

    def write(self, buf, offset, stage=None):
        self.check_aligned(len(buf), offset)
        with self.request(stage) as st:
            with self.hash_locks[(offset // manifest.PIECE) % len(self.hash_locks)]:
                # what is staged for offset is what was hashed last there; a
                # failed write leaves no hash (the commit then reads it back)
                self.hashes.pop(offset, None)
                at = st.log.reserve(len(buf)) if st.log else None
                self.hashes[offset] = (len(buf), native.stage_write(
                    st.fd, buf, offset, st.data.bits, st.zero.bits, self.nblocks,
                    self.block, at=at))
                if st.log:
                    st.log.record([offset], [len(buf)], at)
            self.writeback.staged(st.fd, len(buf))
            self.staged += 1

    def batch(self, entries, data, stage=None):
        """A decoded batch (replication/pack.py): its data entries staged in
        one C call without the GIL, then its zero entries.  The caller has
        checked every entry's range and alignment."""
        with self.request(stage) as st:
            writes = [(o, n) for o, n, z in entries if not z]
            locks = sorted({(o // manifest.PIECE) % len(self.hash_locks) for o, _ in writes})
            for i in locks:
                self.hash_locks[i].acquire()
            try:
                for o, _ in writes:         # a failed write leaves no hash (see write)
                    self.hashes.pop(o, None)
                offs, lens = [o for o, _ in writes], [n for _, n in writes]
                at = st.log.reserve(len(data)) if st.log and writes else None
                hashes = native.stage_batch(st.fd, data, offs, lens, st.data.bits,
                                            st.zero.bits, self.nblocks, self.block, at=at)
                if at is not None:
                    st.log.record(offs, lens, at)
                for (o, n), h in zip(writes, hashes):
                    self.hashes[o] = (n, h)
            finally:
                for i in locks:
                    self.hash_locks[i].release()
            self.writeback.staged(st.fd, len(data))
            self.staged += 1
            for o, n, z in entries:
                if z:
                    self._zero(st, n, o)

    def zero(self, length, offset, stage=None):
        self.check_aligned(length, offset)
        with self.request(stage) as st:
            self._zero(st, length, offset)
            self.staged += 1

    def _zero(self, st, length, offset):
        b0, n = offset // self.block, -(-length // self.block)
        native.bm_clear(st.data.bits, self.nblocks, b0, n)
        native.bm_set(st.zero.bits, self.nblocks, b0, n)

    def flush(self, stage=None):
        with self.request(stage) as st:
            os.fdatasync(st.fd)

    # ---- what was staged ------------------------------------------------------
    def run_array(self):
        st = self.current
        return manifest.run_array(st.data.bits, st.zero.bits, self.nblocks, self.block,
                                  self.size)

    def runs(self):
        return manifest.as_run_list(self.run_array())

    def digest(self):
        """The digest of what is staged: from the hashes taken on arrival
        when the staged writes are exactly the transfer's pieces, else by
        reading the staging back.  In numpy and bulk list operations: it
        runs in the commit, and a cycle's pieces are thousands."""
        st = self.current
        a = self.run_array()
        offs, lens = (x.tolist() for x in manifest.data_pieces(a))
        got = [self.hashes.get(o) for o in offs]
        if len(offs) == len(self.hashes) and all(g is not None and g[0] == n
                                                 for g, n in zip(got, lens)):
            d = manifest.Digest()
            for o, n, _ in a[a[:, 2] != 0].tolist():
                d.add(o, n, True)
            d.add_pieces(offs, lens, [g[1] for g in got])
            return d
        with st.log.frozen(st.data.bits) if st.log else contextlib.nullcontext():
            return manifest.digest_of(manifest.as_run_list(a),
                                      lambda o, n: self.read_data(st, o, n))

    def read_data(self, st, offset, n):
        """The bytes staged in st for replica range [offset, offset + n),
        every block of which is staged as data."""
        if st.log is None:
            return pread_full(st.fd, n, offset)
        return st.log.read(st.data.bits, offset, n)

    def copy_data(self, st, dst_fd, runs):
        """Copies st's data runs [(offset, length)] of the replica (every
        block staged as data) to dst_fd at the same offsets."""
        if st.log is None:
            native.copy_ranges(st.fd, dst_fd, runs)
            return
        offs, pos, lens = st.log.moves(st.data.bits, runs)
        native.copy_ranges(st.fd, dst_fd, np.stack([offs, lens], axis=1), src_offsets=pos)

    def checkpoint(self):
        """Makes the staged data durable and records the blocks it holds
        (staging/held.bmap); returns (data bits, zero bits) held.  The
        caller keeps the staging from ending meanwhile (the replica's
        lock); requests go on, except while the maps are copied."""
        with self.held():
            st = self.current
            if st is None or not st.receiving:
                raise OSError(errno.ENOENT, "no staging is receiving")
            data, zero = st.data.bits.copy(), st.zero.bits.copy()
            entries = st.log.entries().copy() if st.log else None
        os.fdatasync(st.fd)
        if entries is not None:      # before held.bmap, which needs it
            st.log.save(self.sd.p("staging", HELD_IDX), entries)
            fsync_dir(self.sd.p("staging"))
        path = self.sd.p("staging", HELD)
        replace_durably(path, data.tobytes() + zero.tobytes())
        fsync_dir(self.sd.p("staging"))
        self.checkpointed = (time.time(), data, zero)
        return data, zero

    def held_blocks(self):
        """Blocks the last checkpoint found staged (0: none yet)."""
        if self.checkpointed is None:
            return 0
        _, data, zero = self.checkpointed
        return native.bm_count(data | zero, self.nblocks)

    def staged_blocks(self):
        """Blocks staged so far, durable or not (0: no staging)."""
        st = self.current
        return native.bm_count(st.data.bits | st.zero.bits, self.nblocks) if st else 0

    def make_durable(self, target, held=False):
        """fdatasync of the staged data and maps.  A failure is never
        retried into a success (after an EIO the kernel may have dropped
        the pages, and a second fdatasync can succeed without them): the
        staging is discarded, and the agent stages the interval again."""
        try:
            faults.io("secondary.staging.fdatasync")
            os.fdatasync(self.current.fd)
            self.current.data.sync()
            self.current.zero.sync()
            if self.current.log is not None:
                self.current.log.save(self.sd.p("staging", DATA_IDX))
                fsync_dir(self.sd.p("staging"))
        except OSError as e:
            log.error("the staged data of interval %s could not be made durable (%s): the "
                      "staging is dropped and must be sent again", target, e.strerror or e)
            self.discard(held)
            raise

    def start(self):
        self.writeback.start()
        self.reaper.start()

    def stop(self):
        self.writeback.close()
        self.reaper.close()
