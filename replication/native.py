"""The only module that touches the cffi extension (replication._native).

It checks every length and bit range before calling C, turns negative
returns into OSError(errno), ties C objects to Python lifetimes, and keeps
the memory that C points into (mapped map files, snapshot files) alive for
as long as C may use it.  Maps are numpy uint64 arrays (usually views of a
mapped file); a bit i is word i // 64, bit i % 64.
"""
import errno
import os

import numpy as np

from . import faults
from .priority import full_priority
from ._native import ffi, lib

ABI_VERSION = 15
PAUSES_KEPT = 1024     # the switch pauses the C side keeps (NPAUSES)
if lib.pr_abi_version() != ABI_VERSION:  # pragma: no cover - stale build
    raise ImportError(
        f"replication._native has ABI {lib.pr_abi_version()}, expected {ABI_VERSION}: "
        "rebuild it (scripts/bootstrap)")

# the same values as nbdkit.FLAG_* (defined once, in native/prepl.h)
MAY_TRIM = lib.PR_MAY_TRIM
FUA = lib.PR_FUA
FAST_ZERO = lib.PR_FAST_ZERO
MAX_SNAPSHOTS = lib.PR_MAX_SNAPS


def words_for(nbits):
    return (nbits + 63) // 64


def _check_map(m, nbits, writable=False):
    if not isinstance(m, np.ndarray) or m.dtype != np.uint64 or not m.flags.c_contiguous:
        raise TypeError("a map is a C-contiguous numpy uint64 array")
    if m.size < words_for(nbits):
        raise ValueError(f"map of {m.size} words is too small for {nbits} bits")
    if writable and not m.flags.writeable:
        raise ValueError("map is read-only")


def _ptr(m):
    return ffi.cast("uint64_t *", ffi.from_buffer(m))


def _check_range(nbits, first, count):
    if first < 0 or count < 0 or first + count > nbits:
        raise ValueError(f"bit range [{first}, {first + count}) outside a map of {nbits} bits")


def _raise(r, what):
    if r < 0:
        raise OSError(-r, f"{what}: {os.strerror(-r)}")
    return r


# ---- bitmaps ---------------------------------------------------------------

def bm_set(m, nbits, first, count=1):
    _check_map(m, nbits, True)
    _check_range(nbits, first, count)
    lib.pr_bm_set_range(_ptr(m), first, count)


def bm_clear(m, nbits, first, count=1):
    _check_map(m, nbits, True)
    _check_range(nbits, first, count)
    lib.pr_bm_clear_range(_ptr(m), first, count)


def bm_test(m, nbits, bit):
    _check_map(m, nbits)
    _check_range(nbits, bit, 1)
    return bool(lib.pr_bm_test(_ptr(m), bit))


def bm_count(m, nbits):
    _check_map(m, nbits)
    return lib.pr_bm_count(_ptr(m), nbits)


def bm_next_set(m, nbits, start=0):
    """Index of the first set bit at or after start, or -1."""
    _check_map(m, nbits)
    return lib.pr_bm_next_set(_ptr(m), nbits, max(0, start))


def bm_next_clear(m, nbits, start=0):
    _check_map(m, nbits)
    return lib.pr_bm_next_clear(_ptr(m), nbits, max(0, start))


def bm_runs(m, nbits, start=0, limit=None):
    """Runs of set bits as two numpy arrays (starts, lengths)."""
    _check_map(m, nbits)
    p = _ptr(m)
    chunk = 65536
    out_s, out_l = [], []
    pos = ffi.new("uint64_t *", max(0, start))
    total = 0
    while pos[0] < nbits and (limit is None or total < limit):
        want = chunk if limit is None else min(chunk, limit - total)
        s = np.empty(want, dtype=np.uint64)
        ln = np.empty(want, dtype=np.uint64)
        n = lib.pr_bm_runs(p, nbits, pos, _ptr(s), _ptr(ln), want)
        out_s.append(s[:n])
        out_l.append(ln[:n])
        total += n
        if n < want:
            break
    if not out_s:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    return np.concatenate(out_s), np.concatenate(out_l)


def bm_or(dst, src, nbits):
    _check_map(dst, nbits, True)
    _check_map(src, nbits)
    lib.pr_bm_or(_ptr(dst), _ptr(src), words_for(nbits))


def bm_andnot(dst, src, nbits):
    _check_map(dst, nbits, True)
    _check_map(src, nbits)
    lib.pr_bm_andnot(_ptr(dst), _ptr(src), words_for(nbits))


def merge_interval(dst, src, nregions, nblocks):
    """Folds the maps of interval src (cmap, bmap, zmap) into the interval
    dst that follows it; dst must not be live (see Volume.merge_open)."""
    for d, s, n in zip(dst, src, (nregions, nblocks, nblocks)):
        _check_map(d, n, True)
        _check_map(s, n)
    lib.pr_bm_merge_interval(*(_ptr(x) for x in dst), *(_ptr(x) for x in src),
                             words_for(nregions), words_for(nblocks))


def copy_ranges(src_fd, dst_fd, ranges, zero=False, src_offsets=None):
    """Copies [(offset, length)] from src_fd to dst_fd at the same offsets,
    or from src_offsets[i] of src_fd (zero: writes zeroes), in C: one call
    for any number of ranges."""
    if not len(ranges):
        return
    ranges = np.asarray(ranges, dtype=np.uint64).reshape(-1, 2)
    offs, lens = (np.ascontiguousarray(ranges[:, i]) for i in (0, 1))
    src = None
    if src_offsets is not None:
        src = np.ascontiguousarray(src_offsets, dtype=np.uint64)
        if len(src) != len(offs) or (src + lens < src).any():
            raise ValueError("source offsets differ in number, or a source range overflows")
    if (offs + lens < offs).any():
        raise ValueError("range overflows")
    _raise(lib.pr_copy_ranges(src_fd, dst_fd, ffi.NULL if src is None else _ptr(src),
                              _ptr(offs), _ptr(lens), len(offs), 1 if zero else 0), "copy")


# fault points of the C write path (replication/faults.py names them)
WRITE_PATH_FAULTS = {"primary.al.before_write": lib.PR_FAULT_AL_BEFORE_WRITE,
                     "primary.al.after_sync": lib.PR_FAULT_AL_AFTER_SYNC}


def sync_mapping(array):
    """msync of the shared mapping a numpy array views (from its start,
    which must be a page boundary), without holding the GIL."""
    _raise(lib.pr_sync_mapping(ffi.cast("void *", array.ctypes.data), array.nbytes), "msync")


def start_writeback(fd, offset, length):
    """Starts writing [offset, offset + length) of fd back to disk, without
    waiting (sync_file_range)."""
    if offset < 0 or length < 0:
        raise ValueError("negative offset or length")
    _raise(lib.pr_start_writeback(fd, offset, length), "writeback")


def stage_write(fd, buf, offset, data_map, zero_map, nbits, block, at=None):
    """The secondary's staged write in one C call without the GIL: writes
    buf at offset of fd (or at `at`, a staging log's position), marks the
    blocks of [offset, offset + len(buf)) (of `block` bytes) as data and not
    zero in the two maps, and returns the XXH3-128 hash of buf
    (manifest.piece_hash's bytes).  Raises OSError; the maps are then
    unchanged."""
    n = len(buf)
    if offset < 0 or block <= 0 or (at is not None and at < 0):
        raise ValueError("negative offset, position or block size")
    _check_map(data_map, nbits, True)
    _check_map(zero_map, nbits, True)
    b0, nb = offset // block, -(-(offset % block + n) // block)
    _check_range(nbits, b0, nb)
    out = ffi.new("unsigned char[16]")
    _raise(lib.pr_stage_write(fd, ffi.from_buffer(buf), n, offset if at is None else at,
                              _ptr(data_map), _ptr(zero_map), b0, nb, out), "staged write")
    return bytes(ffi.buffer(out, 16))


def stage_batch(fd, data, offsets, lengths, data_map, zero_map, nbits, block, at=None):
    """stage_write for several entries in one C call: entry i writes
    lengths[i] bytes of data (the entries' bytes back to back) at
    offsets[i], or the whole data at `at` in one write (a staging log).
    Returns the list of their hashes.  Raises OSError (``done``: how many
    entries were written, their maps updated) or ValueError for ranges
    outside the maps or lengths that do not add up."""
    offs = np.asarray(offsets, dtype=np.uint64)
    lens = np.asarray(lengths, dtype=np.uint64)
    n = len(offs)
    if len(lens) != n or block <= 0:
        raise ValueError("offsets and lengths differ in number, or block size <= 0")
    if int(lens.sum(dtype=np.uint64)) != len(data) or np.any(lens > len(data)):
        raise ValueError(f"the entries' lengths do not add up to the {len(data)} bytes given")
    _check_map(data_map, nbits, True)
    _check_map(zero_map, nbits, True)
    if n and np.any(offs > np.uint64(nbits * block)):
        raise ValueError("an entry starts outside the maps")
    b = np.uint64(block)
    ends = (offs + lens + b - np.uint64(1)) // b        # no overflow: all bounded above
    if n and int(ends.max()) > nbits:
        raise ValueError(f"an entry ends outside a map of {nbits} blocks")
    if at is not None and not 0 <= at < 1 << 63:
        raise ValueError("log position out of range")
    hashes = ffi.new("unsigned char[]", 16 * max(n, 1))
    done = ffi.new("size_t *")
    offs, lens = np.ascontiguousarray(offs), np.ascontiguousarray(lens)
    r = lib.pr_stage_batch(fd, ffi.from_buffer(data), _ptr(offs), _ptr(lens), n,
                           lib.PR_IN_PLACE if at is None else at,
                           _ptr(data_map), _ptr(zero_map), block, hashes, done)
    if r < 0:
        e = OSError(-r, f"staged write: {os.strerror(-r)}")
        e.done = done[0]
        raise e
    raw = bytes(ffi.buffer(hashes, 16 * n))
    return [raw[16 * i:16 * i + 16] for i in range(n)]


# ---- the write path --------------------------------------------------------

def _log2(n, what):
    if n <= 0 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, not {n}")
    return n.bit_length() - 1


class Snapshot:
    """C view of one snapshot: its file and its valid map (bit per block)."""

    def __init__(self, fd, vmap, nblocks):
        _check_map(vmap, nblocks, True)
        self.fd = fd
        self.vmap = vmap          # keeps the mapped memory alive
        self.nblocks = nblocks
        self.needs = ()
        self._c = ffi.gc(lib.pr_snap_new(fd, _ptr(vmap)), lib.pr_snap_free)
        if self._c == ffi.NULL:
            raise MemoryError("pr_snap_new")

    def set_need(self, *needs):
        """Before the snapshot starts: it holds only the blocks set in the
        given maps (numpy uint64 arrays of at least nblocks bits, kept alive
        here; at most two; none: the whole image).  The caller may only add
        bits to them from then on."""
        if len(needs) > 2:
            raise ValueError("a snapshot takes at most two need maps")
        for m in needs:
            _check_map(m, self.nblocks)
        self.needs = needs
        ptrs = [_ptr(m) for m in needs] + [ffi.NULL] * (2 - len(needs))
        lib.pr_snap_set_need(self._c, *ptrs)

    @property
    def valid(self):
        return bool(lib.pr_snap_valid(self._c))

    @property
    def error(self):
        return lib.pr_snap_error(self._c)

    def invalidate(self, err=errno.ESTALE):
        lib.pr_snap_invalidate(self._c, err)

    def release(self, volume):
        """Invalidates the snapshot and closes its file (C owns fd now)."""
        lib.pr_snap_release(volume._c, self._c)
        self.fd = -1


class Volume:
    """C state of a tracked volume: open maps, active snapshots, the AL."""

    def __init__(self, fd, size, region_size, block_size, al_fd, al_extent, al_offset):
        self.size = size
        self.region_size = region_size
        self.block_size = block_size
        self.nregions = -(-size // region_size)
        self.nblocks = -(-size // block_size)
        c = lib.pr_volume_new(fd, size, _log2(region_size, "region size"),
                              _log2(block_size, "block size"), al_fd,
                              _log2(al_extent, "activity-log extent"), al_offset)
        if c == ffi.NULL:
            raise OSError(ffi.errno, f"pr_volume_new: {os.strerror(ffi.errno)}")
        self._c = ffi.gc(c, lib.pr_volume_free)
        self._maps = None         # the open maps C writes into
        self._snaps = []          # active snapshots C copies into

    def _check_io(self, length, offset):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL,
                          f"request [{offset}, {offset + length}) is outside the volume "
                          f"of {self.size} bytes")

    def switch(self, maps, snap=None):
        """Installs new open maps (cmap, bmap, zmap) and, optionally, starts
        a snapshot, atomically with respect to in-flight writes."""
        cmap, bmap, zmap = maps
        _check_map(cmap, self.nregions, True)
        _check_map(bmap, self.nblocks, True)
        _check_map(zmap, self.nblocks, True)
        if snap is not None:
            _check_map(snap.vmap, self.nblocks, True)
        with full_priority():       # writers wait for it (priority.py)
            r = lib.pr_volume_switch(self._c, _ptr(cmap), _ptr(bmap), _ptr(zmap),
                                     snap._c if snap is not None else ffi.NULL)
        _raise(r, "snapshot start")
        self._maps = maps
        if snap is not None:
            self._snaps.append(snap)

    def unswitch(self, maps, snap=None):
        """Undoes the last switch (its record could not be written): maps,
        the interval it closed, are open again and hold both intervals'
        changes; snap, the snapshot it started, is no longer copied into."""
        cmap, bmap, zmap = maps
        _check_map(cmap, self.nregions, True)
        _check_map(bmap, self.nblocks, True)
        _check_map(zmap, self.nblocks, True)
        with full_priority():
            lib.pr_volume_unswitch(self._c, _ptr(cmap), _ptr(bmap), _ptr(zmap),
                                   snap._c if snap is not None else ffi.NULL)
        self._maps = maps
        if snap in self._snaps:
            self._snaps.remove(snap)

    def close(self):
        """Drains in-flight writes; later writes fail with ESHUTDOWN."""
        lib.pr_volume_close(self._c)

    def refuse_writes(self, err):
        """Drains in-flight writes; from then on writes fail with OSError
        err (e.g. errno.EROFS), or succeed again (err 0)."""
        if not 0 <= err < 4096:
            raise ValueError(f"not an errno: {err}")
        lib.pr_volume_refuse_writes(self._c, err)

    def merge_open(self, src):
        for s, n in zip(src, (self.nregions, self.nblocks, self.nblocks)):
            _check_map(s, n)
        with full_priority():
            lib.pr_volume_merge_open(self._c, *(_ptr(x) for x in src))

    def drop_snap(self, snap):
        with full_priority():
            lib.pr_volume_drop_snap(self._c, snap._c)
        if snap in self._snaps:
            self._snaps.remove(snap)

    # The I/O methods are the hot path: the C side checks the range (it
    # returns -EINVAL outside the volume) and only the error path explains.
    def _fail(self, r, length, offset):
        if r == -errno.EINVAL:
            self._check_io(length, offset)
        raise OSError(-r, os.strerror(-r))

    def pwrite(self, buf, offset, flags=0):
        r = lib.pr_write(self._c, ffi.from_buffer(buf), len(buf), offset, flags)
        if r:
            self._fail(r, len(buf), offset)

    def zero(self, length, offset, flags=0):
        r = lib.pr_zero(self._c, length, offset, flags)
        if r:
            self._fail(r, length, offset)

    def trim(self, length, offset, flags=0):
        r = lib.pr_trim(self._c, length, offset, flags)
        if r:
            self._fail(r, length, offset)

    def pread(self, buf, offset):
        r = lib.pr_read(self._c, ffi.from_buffer(buf, require_writable=True), len(buf), offset)
        if r:
            self._fail(r, len(buf), offset)

    def snap_pread(self, snap, buf, offset):
        r = lib.pr_snap_read(self._c, snap._c, ffi.from_buffer(buf, require_writable=True),
                             len(buf), offset)
        if r:
            self._fail(r, len(buf), offset)

    def snap_pread_segments(self, snap, buf, segments):
        """snap_pread of several (position in buf, volume offset, length)
        segments (rows of an array, or tuples) in one C call."""
        a = np.asarray(segments, dtype=np.int64).reshape(-1, 3)
        if len(a) and int(a.min()) < 0:
            raise ValueError("a segment has a negative position, offset or length")
        a = a.astype(np.uint64)
        if len(a) and (int((a[:, 0] + a[:, 2]).max()) > len(buf)
                       or int(a[:, 2].max()) > len(buf)):
            raise ValueError("a segment does not fit the buffer")
        pos, offs, lens = (np.ascontiguousarray(a[:, i]) for i in range(3))
        r = lib.pr_snap_read_segments(self._c, snap._c,
                                      ffi.from_buffer(buf, require_writable=True),
                                      _ptr(pos), _ptr(offs), _ptr(lens), len(a))
        if r:
            self._fail(r, len(buf), 0)

    def _sync(self, point, call, what):
        """An fdatasync of the volume by call; fault point `point` makes it
        fail as the kernel's would (sticky)."""
        try:
            faults.io(point)
        except OSError as e:
            lib.pr_volume_sync_failed(self._c, e.errno)
        _raise(call(self._c), what)

    def flush(self):
        self._sync("primary.volume.flush", lib.pr_flush, "flush")

    @property
    def sync_error(self):
        """errno of the first failed fdatasync of the volume (sticky), or 0."""
        return lib.pr_volume_sync_error(self._c)

    def al_trim(self):
        _raise(lib.pr_al_trim(self._c), "activity log write")

    def durable(self):
        """fdatasync of the volume that makes every interval closed before
        the call durable: their extents leave the activity log at the next
        al_trim (replication/durability.py).  A failure is sticky (as in
        flush) and keeps them."""
        self._sync("primary.volume.durable", lib.pr_volume_durable, "fdatasync")

    @property
    def al_pending(self):
        """Extents of closed intervals whose data may not be durable yet."""
        return lib.pr_volume_al_pending(self._c)

    def set_fault(self, point):
        """Tests only: arms a C fault point (WRITE_PATH_FAULTS), 0 disarms."""
        lib.pr_volume_set_fault(self._c, point)

    def al_bits(self, nwords):
        out = np.zeros(nwords, dtype=np.uint64)
        lib.pr_al_get(self._c, _ptr(out), nwords)
        return out

    @property
    def max_writers(self):
        return lib.pr_volume_max_writers(self._c)

    @property
    def writers(self):
        return lib.pr_volume_writers(self._c)

    @property
    def writes_total(self):
        return lib.pr_volume_writes_total(self._c)

    @property
    def al_syncs(self):
        return lib.pr_volume_al_syncs(self._c)

    def switch_pauses(self):
        """(switches so far, the ns writers waited at each of the last
        PAUSES_KEPT, the most recent first)."""
        out = np.zeros(PAUSES_KEPT, dtype=np.uint64)
        n = lib.pr_volume_pauses(self._c, _ptr(out), PAUSES_KEPT)
        return n, out[:min(n, PAUSES_KEPT)]


def cache_frame_stacks():
    """Puts native/pyarena.c's cache in front of CPython's arena allocator,
    once per process: an nbdkit callback then no longer maps and unmaps a
    frame stack (see pyarena.c).  Returns True if it was installed now."""
    import ctypes
    api = ctypes.pythonapi
    a = ffi.new("pr_arena_allocator *")
    addr = ctypes.c_void_p(int(ffi.cast("uintptr_t", a)))
    api.PyObject_GetArenaAllocator.argtypes = [ctypes.c_void_p]
    api.PyObject_SetArenaAllocator.argtypes = [ctypes.c_void_p]
    api.PyObject_GetArenaAllocator(addr)
    r = lib.pr_arena_hook(a)
    if r == -errno.EALREADY:
        return False
    _raise(r, "arena allocator")
    api.PyObject_SetArenaAllocator(addr)
    return True


def frame_stack_cache_stats():
    """{hits, misses, held} of the cache cache_frame_stacks() installs."""
    out = ffi.new("uint64_t[3]")
    lib.pr_arena_stats(out)
    return {"hits": out[0], "misses": out[1], "held": out[2]}
