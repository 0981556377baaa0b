"""A staging's log: where the data of a staging that is not in place lives.

What it owns: STATE/staging/data.log (the staged writes' bytes, appended in
the order they arrive, each at a block-aligned position) and the index of
where each staged write went (in memory; on disk as data.idx when its
staging is made durable for a commit, and as held.idx at a checkpoint).
What it promises:

* Staged writes reach the disk as one sequential stream, whatever their
  offsets in the replica: a staging's writeback and fdatasync write one
  extent, not a block per random write (a secondary on a disk of its own
  writes each block once in order here and once in place at the merge).
* A write's place is reserved before it is written and recorded only once
  it was written (record()): a failed write leaves an unused stretch of the
  log that nothing names.
* locate() answers, for the blocks a staging holds as data, where their
  latest staged write put them: a block written twice is read from its
  later write.  "Later" is the order of record(), which the staging keeps
  per offset (its hash locks).
* An index file is written whole and made durable before it is renamed
  into place (save()); load() refuses one whose size or entries do not fit
  the replica and the log (DamagedStagingError), never guessing.
"""
import contextlib
import errno
import os
import threading

import numpy as np

from .errors import StateError

ENTRY = 3                      # uint64s per index entry: replica offset, length, log position


class DamagedStagingError(StateError):
    pass


class StagingLog:
    def __init__(self, fd, block, size, entries=None, tail=0):
        self.fd, self.block, self.size = fd, block, size
        self.lock = threading.Lock()
        self.tail = _align(tail, block)
        self.chunks = [] if entries is None or not len(entries) else [entries]
        self.located = None            # (blocks, positions) once the staging is complete

    def reserve(self, n):
        """The log position for n bytes about to be written."""
        with self.lock:
            at = self.tail
            self.tail = _align(at + n, self.block)
            return at

    def record(self, offsets, lengths, at):
        """Writes (offsets[i], lengths[i]) of the replica were written back to
        back from log position at."""
        lens = np.asarray(lengths, dtype=np.uint64)
        pos = np.uint64(at) + np.concatenate((np.zeros(1, dtype=np.uint64),
                                              np.cumsum(lens, dtype=np.uint64)[:-1]))
        self.chunks.append(np.stack([np.asarray(offsets, dtype=np.uint64), lens, pos], axis=1))

    def entries(self):
        """Every recorded write, (offset, length, position) rows in record order."""
        if len(self.chunks) > 1:
            self.chunks = [np.concatenate(self.chunks)]
        return self.chunks[0] if self.chunks else np.zeros((0, ENTRY), dtype=np.uint64)

    # ---- where the data is ------------------------------------------------
    def locate(self, data_bits):
        """(blocks, positions): the blocks data_bits marks, ascending, and the
        log position of each one's latest write.  Cached once the staging is
        complete (freeze())."""
        if self.located is not None:
            return self.located
        e = self.entries()
        b = np.uint64(self.block)
        nb = ((e[:, 0] % b + e[:, 1] + b - np.uint64(1)) // b).astype(np.int64)
        first = np.repeat(e[:, 0] // b, nb)
        start = np.repeat(np.cumsum(nb) - nb, nb)
        within = (np.arange(int(nb.sum()), dtype=np.int64) - start).astype(np.uint64)
        blocks = first + within
        pos = np.repeat(e[:, 2], nb) + within * b
        # the latest write of each block: the first one seen from the end
        uniq, idx = np.unique(blocks[::-1], return_index=True)
        pos = pos[::-1][idx]
        held = (data_bits[(uniq >> np.uint64(6)).astype(np.int64)]
                >> (uniq & np.uint64(63))) & np.uint64(1)
        keep = held.astype(bool)
        return uniq[keep], pos[keep]

    def freeze(self, data_bits):
        """The staging is complete: its writes no longer change."""
        self.located = None
        self.located = self.locate(data_bits)

    @contextlib.contextmanager
    def frozen(self, data_bits):
        """Lookups in this context reuse one locate(): the caller keeps
        writes out meanwhile."""
        if self.located is not None:
            yield
            return
        self.freeze(data_bits)
        try:
            yield
        finally:
            self.located = None

    def runs(self, data_bits, b0=None, b1=None):
        """(replica offsets, log positions, lengths), arrays: the data blocks
        (all of them, or those in [b0, b1)), contiguous in both merged into
        one run, ascending by offset."""
        blocks, pos = self.locate(data_bits)
        if b0 is not None:
            i0, i1 = np.searchsorted(blocks, [b0, b1])
            blocks, pos = blocks[i0:i1], pos[i0:i1]
        if not len(blocks):
            return (np.zeros(0, dtype=np.uint64),) * 3
        b = np.uint64(self.block)
        cut = np.flatnonzero((np.diff(blocks) != 1) | (np.diff(pos) != b)) + 1
        firsts = np.concatenate(([0], cut))
        lasts = np.concatenate((cut, [len(blocks)])) - 1
        offs = blocks[firsts] * b
        ends = np.minimum((blocks[lasts] + np.uint64(1)) * b, np.uint64(self.size))
        return offs, pos[firsts], ends - offs

    def moves(self, data_bits, runs):
        """(replica offsets, log positions, lengths) of the data blocks in
        runs ([(offset, length)] of blocks all staged as data), in log
        order: what copies them from the log, reading it in order."""
        offs, pos, lens = self.runs(data_bits)
        r = np.asarray(runs, dtype=np.uint64).reshape(-1, 2)
        r = r[np.argsort(r[:, 0], kind="stable")]
        i = np.searchsorted(r[:, 0], offs, side="right").astype(np.int64) - 1
        inside = (i >= 0) & (offs < (r[:, 0] + r[:, 1])[np.maximum(i, 0)]) if len(r) else i < -1
        order = np.argsort(pos[inside], kind="stable")
        return offs[inside][order], pos[inside][order], lens[inside][order]

    def read(self, data_bits, offset, n):
        """The staged bytes of replica range [offset, offset + n), whose
        blocks are all staged as data."""
        b = self.block
        out = bytearray(n)
        for off, at, length in zip(*(a.tolist() for a in self.runs(
                data_bits, offset // b, (offset + n - 1) // b + 1))):
            lo, hi = max(off, offset), min(off + length, offset + n)
            got = os.pread(self.fd, hi - lo, at + lo - off)
            if len(got) != hi - lo:
                raise OSError(errno.EIO, f"the staging log ends before position "
                              f"{at + lo - off + (hi - lo)}, which its index names")
            out[lo - offset:hi - offset] = got
        return bytes(out)

    # ---- on disk ----------------------------------------------------------
    def save(self, path, entries=None):
        """Writes the index (entries, default all recorded) durably to path
        (the caller makes the directory entry durable)."""
        e = self.entries() if entries is None else entries
        replace_durably(path, np.ascontiguousarray(e, dtype="<u8").tobytes())

    @staticmethod
    def load(path, size, log_size):
        """The index at path, checked against the replica's size and the
        log's: every entry inside both."""
        with open(path, "rb") as f:
            doc = f.read()
        if len(doc) % (8 * ENTRY):
            raise DamagedStagingError(f"{path} has {len(doc)} bytes, not a whole number of "
                                      "entries: the staging's index is damaged")
        e = np.frombuffer(doc, dtype="<u8").astype(np.uint64).reshape(-1, ENTRY)
        if len(e) and (np.any(e[:, 0] + e[:, 1] > np.uint64(size))
                       or np.any(e[:, 0] + e[:, 1] < e[:, 0])
                       or np.any(e[:, 2] + e[:, 1] > np.uint64(log_size))
                       or np.any(e[:, 2] + e[:, 1] < e[:, 2])):
            raise DamagedStagingError(f"{path} names data outside the replica or the log: "
                                      "the staging's index is damaged")
        return e


def replace_durably(path, doc):
    """path holds doc (bytes), durably, or is as it was: written whole into
    path.tmp (mode 0600), made durable, then renamed over path (the caller
    makes the directory entry durable)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(doc)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _align(n, block):
    return -(-n // block) * block
