"""What one interval's transfer is, identically on both sides of a link.

An interval travels as runs of blocks in offset order, each either data
(read from the primary's snapshot, written to the secondary's staging) or
zero (an NBD zero request).  Both sides derive the runs from block bitmaps
(data bits, zero bits), so they agree run for run.  Data runs are cut into
pieces of at most PIECE bytes from the run's start (the agent's requests);
the digest of a transfer is SHA-256 over, in offset order, each zero run's
header and each data piece's header and SHA-256.  So the agent can hash
pieces as their reads complete, in any order, and the secondary hashes
what it staged; a commit whose digest differs is refused.
"""
import hashlib

import numpy as np

from . import native

MANIFEST_VERSION = 1
PIECE = 1 << 20      # the transfer engine is fastest with 1 MiB requests


def runs(data_bits, zero_bits, nblocks, block_size, size):
    """[(offset, length, zero)] in offset order, adjacent blocks of one kind
    coalesced, the last run clipped at the volume's end.  A block set in
    both maps counts as zero."""
    data = np.ascontiguousarray(data_bits & ~zero_bits)
    out = []
    for bits, zero in ((data, False), (np.ascontiguousarray(zero_bits), True)):
        starts, lengths = native.bm_runs(bits, nblocks)
        for s, n in zip(starts.tolist(), lengths.tolist()):
            off = s * block_size
            out.append((off, min((s + n) * block_size, size) - off, zero))
    out.sort()
    return out


def pieces(run_list, piece=PIECE):
    """The runs cut into transfer pieces: data runs into pieces of at most
    `piece` bytes from the run's start, zero runs whole."""
    for off, length, zero in run_list:
        if zero:
            yield off, length, True
            continue
        end = off + length
        while off < end:
            n = min(piece, end - off)
            yield off, n, False
            off += n


class Digest:
    """Digest of a transfer: add pieces in any order, then hexdigest()."""

    def __init__(self):
        self.items = {}
        self.data_bytes = 0
        self.zero_bytes = 0

    def add(self, offset, length, zero, data=None):
        if zero:
            self.items[offset] = f"Z:{offset}:{length}\n".encode()
            self.zero_bytes += length
        else:
            self.add_hashed(offset, length, hashlib.sha256(data).hexdigest())

    def add_hashed(self, offset, length, sha256_hex):
        """A data piece by its SHA-256 (hex), taken when it was written."""
        self.items[offset] = f"D:{offset}:{length}:{sha256_hex}\n".encode()
        self.data_bytes += length

    @property
    def extents(self):
        return len(self.items)

    def hexdigest(self):
        h = hashlib.sha256(b"prepl-transfer-1\n")
        for off in sorted(self.items):
            h.update(self.items[off])
        return h.hexdigest()


def digest_of(run_list, read, piece=PIECE):
    """Digest of runs whose data comes from read(offset, length)."""
    d = Digest()
    for off, length, zero in pieces(run_list, piece):
        d.add(off, length, zero, None if zero else read(off, length))
    return d
