"""Map files: fixed-size bitmap files mapped into memory as numpy arrays.

A map file holds ceil(nbits / 64) little-endian uint64 words and nothing
else; its identity, size and (once its interval is closed) its digest live
in the metadata file.  The server maps open maps read-write and hands their
memory to C; anyone else maps closed maps read-only.

Digests are "xxh3-128:HEX" (XXH3-128 of the file's bytes: the closed maps of
one interval of a 1 TiB volume, 66 MiB, in a few milliseconds, so they are
verified whenever they are used); metadata of format 1 holds bare SHA-256
hex digests, which digest_matches still checks (the server converts them
at its first start, replication/tracker.py).
"""
import hashlib
import mmap
import os
from typing import NamedTuple

import numpy as np
import xxhash

from . import native
from .errors import StateError

KINDS = ("cmap", "bmap", "zmap")     # an interval's change, block and zero maps


class MapFile:
    """One map file mapped into memory; .bits is the numpy uint64 view."""

    def __init__(self, path, nbits, writable=True, create=False, sync=True):
        """create: a new file of zeros, allocated, and durable on return
        unless sync is False (then the caller syncs it: several files
        created first and synced after share one journal commit)."""
        self.path = path
        self.nbits = nbits
        nbytes = native.words_for(nbits) * 8
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            if create:
                # allocated, not sparse: a store into a hole of a mapped file
                # on a full filesystem would kill the server with SIGBUS
                os.posix_fallocate(fd, 0, nbytes)
                if sync:
                    os.fsync(fd)
            have = os.fstat(fd).st_size
            if have != nbytes:
                raise StateError(f"map file {path} has {have} bytes, expected {nbytes}: "
                                 "the state directory is damaged")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self.bits = np.frombuffer(self._mm, dtype=np.uint64)

    def sync(self):
        """msync: the map's current bits are durable when this returns (the
        other threads of the process run meanwhile)."""
        native.sync_mapping(self.bits)

    def digest(self):
        return bytes_digest(self._mm)

    def count(self):
        return native.bm_count(self.bits, self.nbits)

    def runs(self, limit=None):
        return native.bm_runs(self.bits, self.nbits, 0, limit)


class IntervalMaps(NamedTuple):
    """The three maps of one interval, in KINDS order."""
    cmap: MapFile
    bmap: MapFile
    zmap: MapFile

    def bits(self):
        """(cmap, bmap, zmap) bit arrays, as the C calls take them."""
        return tuple(m.bits for m in self)

    def sync(self):
        for m in self:
            m.sync()

    def names(self):
        """{kind: file name} (what an interval records as its maps)."""
        return {k: os.path.basename(m.path) for k, m in zip(KINDS, self)}

    def digests(self):
        """{kind: digest} (what a closed interval records)."""
        return {k: m.digest() for k, m in zip(KINDS, self)}


assert IntervalMaps._fields == KINDS


DIGEST_PREFIX = "xxh3-128:"


def bytes_digest(data):
    """The digest of a map's bytes (what a map file's digest is of)."""
    return DIGEST_PREFIX + xxhash.xxh3_128(data).hexdigest()


def file_digest(path, legacy=False):
    """The digest of a map file's bytes (legacy: format 1's bare SHA-256)."""
    with open(path, "rb") as f:
        if legacy:
            return hashlib.file_digest(f, "sha256").hexdigest()
        if os.fstat(f.fileno()).st_size == 0:
            return DIGEST_PREFIX + xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            return DIGEST_PREFIX + xxhash.xxh3_128(mm).hexdigest()      # no copy


def digest_matches(recorded, path):
    return file_digest(path, legacy=not recorded.startswith(DIGEST_PREFIX)) == recorded
