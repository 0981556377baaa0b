"""What one interval's transfer is, identically on both sides of a link.

An interval travels as runs of blocks in offset order, each either data
(read from the primary's snapshot, written to the secondary's staging) or
zero (an NBD zero request).  Both sides derive the runs from block bitmaps
(data bits, zero bits), so they agree run for run.  Data runs are cut into
pieces of at most PIECE bytes from the run's start (the agent's requests);
the digest of a transfer is SHA-256 over, in offset order, each zero run's
header and each data piece's header and hash.  So the agent can hash
pieces as their reads complete, in any order, and the secondary hashes
what it staged; a commit whose digest differs is refused.

A piece's hash is XXH3-128: it catches lost, misplaced and corrupted
pieces, at about 15 GB/s against SHA-256's 1.4 GB/s here (SHA-256 of
every piece on both sides was a fifth of a cycle's CPU).  It is no
defence against a forger, and needs not be: who can stage and commit is
decided by the link's TLS key (prepl keygen), not by the manifest.

The manifest of a commit is built (build), parsed and shape-checked
(parse), checked against a replica (check_replica) and against what was
staged (check_staged) here, and nowhere else.
"""
import hashlib
import itertools
import json

import numpy as np
import xxhash

from . import native
from .errors import PreplError, RefusedError
from .meta import Manifest, RecordError

MANIFEST_VERSION = 2
PIECE = 1 << 20      # the transfer engine is fastest with 1 MiB requests


def runs(data_bits, zero_bits, nblocks, block_size, size):
    """[(offset, length, zero)] in offset order, adjacent blocks of one kind
    coalesced, the last run clipped at the volume's end.  A block set in
    both maps counts as zero."""
    return as_run_list(run_array(data_bits, zero_bits, nblocks, block_size, size))


def as_run_list(a):
    """A run_array as a run list of (offset, length, zero) tuples."""
    return list(zip(a[:, 0].tolist(), a[:, 1].tolist(), (a[:, 2] != 0).tolist()))


def run_array(data_bits, zero_bits, nblocks, block_size, size):
    """runs(...) as an (n, 3) int64 array (zero as 0/1), built in numpy: a
    primary's server computes it for its pack export, and every ms of a
    Python loop there would hold the GIL its writes need."""
    data = np.ascontiguousarray(data_bits & ~zero_bits)
    offs, lens, kinds = [], [], []
    for bits, zero in ((data, False), (np.ascontiguousarray(zero_bits), True)):
        starts, lengths = native.bm_runs(bits, nblocks)
        off = starts.astype(np.int64) * block_size
        offs.append(off)
        lens.append(np.minimum((starts + lengths).astype(np.int64) * block_size, size) - off)
        kinds.append(np.full(len(off), int(zero), np.int64))
    out = np.stack([np.concatenate(x) for x in (offs, lens, kinds)], axis=1)
    return out[np.argsort(out[:, 0], kind="stable")]     # data and zero runs never overlap


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


def as_run_array(run_list):
    """A run list ((offset, length, zero) tuples) as run_array's (n, 3)
    int64 array (zero as 0/1); an array passes through."""
    if isinstance(run_list, np.ndarray):
        return run_list
    return np.fromiter(itertools.chain.from_iterable(run_list), dtype=np.int64,
                       count=3 * len(run_list)).reshape(-1, 3)


def data_pieces(run_list, piece=PIECE):
    """(offsets, lengths) int64 arrays of the data pieces of pieces(run_list),
    in order: the same cut, in numpy (a primary's server builds its pack
    stream from it with the GIL held; pieces() stays lazy, for whole-volume
    run lists)."""
    a = as_run_array(run_list)
    a = a[a[:, 2] == 0]
    count = -(-a[:, 1] // piece)                             # pieces per data run
    first = np.repeat(np.cumsum(count) - count, count)        # each piece's run's first
    k = np.arange(int(count.sum()), dtype=np.int64) - first    # piece number in its run
    run_off, run_len = np.repeat(a[:, 0], count), np.repeat(a[:, 1], count)
    return run_off + k * piece, np.minimum(piece, run_len - k * piece)


def piece_hash(data):
    """The hash of one data piece, as bytes."""
    return xxhash.xxh3_128(data).digest()


def _data_line(offset, length, h):
    """A data piece's line of the transfer digest."""
    return f"D:{offset}:{length}:{h.hex()}\n".encode()


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
            self.add_hashed(offset, length, piece_hash(data))

    def add_hashed(self, offset, length, h):
        """A data piece by its piece_hash, taken when it was written."""
        self.items[offset] = _data_line(offset, length, h)
        self.data_bytes += length

    def add_pieces(self, offsets, lengths, hashes):
        """Data pieces by their piece_hashes, in bulk (equal-length lists)."""
        self.items.update(zip(offsets, map(_data_line, offsets, lengths, hashes)))
        self.data_bytes += sum(lengths)

    @property
    def extents(self):
        return len(self.items)

    def hexdigest(self):
        h = hashlib.sha256(b"prepl-transfer-2\n")
        for off in sorted(self.items):
            h.update(self.items[off])
        return h.hexdigest()


def digest_of(run_list, read, piece=PIECE):
    """Digest of runs whose data comes from read(offset, length)."""
    d = Digest()
    for off, length, zero in pieces(run_list, piece):
        d.add(off, length, zero, None if zero else read(off, length))
    return d


# ---- the manifest of a commit ---------------------------------------------------

def build(primary, replica_uuid, base, target, digest):
    """The Manifest of interval (base, target] (base: an IntervalRef or
    None; target: the closed Interval) of the primary whose metadata is
    primary (a Body), staged with digest (a Digest)."""
    return Manifest(MANIFEST_VERSION, primary.volume_uuid, replica_uuid, primary.size,
                    primary.region_size, primary.block_size, base, target.ref(),
                    digest.extents, digest.data_bytes, digest.hexdigest())


def parse(text, target):
    """The Manifest written to commit/TARGET: JSON whose fields have the
    right types, for that target, after its base; else PreplError, before
    anything looks at its values."""
    try:
        m = Manifest.from_json(json.loads(text))
        ok = m.target.seq == target and 0 <= (m.base.seq if m.base else 0) and (
            m.base is None or m.base.seq < target)
    except (ValueError, RecordError) as e:
        ok, why = False, f" ({e})"
    else:
        why = ""
    if not ok:
        raise PreplError(f"malformed manifest for commit/{target}{why}: it needs integer "
                         "version, size, region_size, block_size, extents, bytes, string "
                         f"primary_uuid, replica_uuid, digest, a target {{\"seq\": {target}}} "
                         "and a base that is null or an earlier {\"seq\": N}")
    return m


def check_replica(m, replica):
    """Refuses (RefusedError) a Manifest not meant for the replica whose
    metadata is replica (a Body): version, replica UUID, geometry."""
    if m.version != MANIFEST_VERSION:
        raise RefusedError(f"manifest version {m.version!r} is not supported")
    if m.replica_uuid != replica.volume_uuid:
        raise RefusedError(f"manifest is for replica {m.replica_uuid}, this is "
                           f"{replica.volume_uuid}")
    if m.geometry() != replica.geometry():
        raise RefusedError(f"geometry mismatch: primary {_geometry(m)}, replica "
                           f"{_geometry(replica)}")


def _geometry(rec):
    return dict(zip(("size", "region_size", "block_size"), rec.geometry()))


def check_staged(m, d):
    """Refuses (RefusedError) a manifest whose extents, bytes or digest
    differ from d, the Digest of what was staged."""
    if (d.extents, d.data_bytes) != (m.extents, m.bytes) or d.hexdigest() != m.digest:
        raise RefusedError(
            f"staged data does not match the manifest: staged {d.extents} extents, "
            f"{d.data_bytes} bytes, digest {d.hexdigest()[:16]}; manifest "
            f"{m.extents} extents, {m.bytes} bytes, digest {m.digest[:16]}")


def base_key(base):
    """A manifest's base (an IntervalRef or None) as a staging export
    spells it ("none" or the seq)."""
    return "none" if base is None else str(base.seq)


def fingerprint(m):
    """SHA-256 of the Manifest's canonical JSON: what a receipt is for."""
    return hashlib.sha256(json.dumps(m.to_json(), sort_keys=True).encode()).hexdigest()
