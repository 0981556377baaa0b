"""Offline seeding: a replica's first image carried as a file (tape, a
disk in the mail) instead of through the link.

What it owns: the seed file's format, `prepl seed export` and `prepl seed
import`.  A seed file is a HEADER-byte header -- MAGIC, then a JSON object:
the primary's volume UUID and geometry, the snappoint (name and the
interval it closed, as the link names intervals), when, and the digest of
the image -- NUL-padded, then the image of the snappoint's snapshot, the
volume's size in bytes, sparse where the image is zero.  The digest is a
full transfer's (replication/manifest.py: SHA-256 over the XXH3-128 of each
PIECE), so both sides compute it piece by piece.

What it promises:
* Export reads the snapshot of a dataful snappoint over NBD from the
  running primary (a new snappoint seed.TIME, or --snappoint NAME), streams
  it in PIECE-sized reads (memory does not grow with the volume), writes
  FILE.part and renames it to FILE once it is complete and durable: a FILE
  is always a whole seed.
* Import runs with the secondary's server stopped (it takes the state
  directory's lock as a server does).  It checks the header (geometry, the
  volume the replica is bound to) and the digest over the whole file
  before a byte of the replica changes: a seed of another volume or
  geometry, a truncated or corrupted seed is refused with the replica
  byte-identical.  Then one metadata write says the replica holds no image
  (so a failure from here on never leaves a half-written image looking
  applied), the image is copied (zero pieces as zeroes) and made durable,
  the file is checked to be the one verified, and one metadata write
  records the seed's interval as applied and binds the replica to the
  primary.  The link's first cycle then sends the changes since the seed;
  the agent refuses a seed whose snappoint the primary no longer holds
  (replication/agent.py) and makes a seed.* snappoint dataless once a
  cycle applied after it (it pins no snapshot).
"""
import json
import logging
import os
import time

from . import control, manifest, native
from .errors import RefusedError, StateError, UsageError
from .meta import Applied, Binding, IntervalRef, RecordError
from .state import StateDir, volume_size
from .transport import close_nbd, open_nbd, pread
from .units import fmt_size

log = logging.getLogger(__name__)

MAGIC = b"PREPL-SEED 1\n"
HEADER = 4096
PREFIX = "seed."          # the snappoints `seed export` makes
PROGRESS_SECONDS = 2.0
CHUNK = 8                 # pieces read at once


class _Progress:
    """Logs how far a long pass got, every PROGRESS_SECONDS."""

    def __init__(self, what, total):
        self.what, self.total = what, total
        self.t0 = self.last = time.monotonic()

    def __call__(self, done, final=False):
        now = time.monotonic()
        if final or now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = done / max(now - self.t0, 1e-6)
            log.info("%s: %.1f%% %d/%d bytes, %.1f MB/s", self.what,
                     100 * done / max(self.total, 1), done, self.total, rate / 1e6)


_ZERO = bytes(manifest.PIECE)


def _zero_piece(buf):
    return buf == _ZERO[:len(buf)]


# ---- export ----------------------------------------------------------------

def export(state, path, snappoint=None, tls_psk=None):
    """Writes the seed of a dataful snappoint of the primary at state (its
    server running) to path; returns the header (a dict)."""
    sd = StateDir(state)
    body = sd.read_meta()
    if body.role != "primary":
        raise UsageError(f"{sd} is a {body.role}: seeds are exported from a primary")
    status = control.request(sd.control_socket, "status")
    if not snappoint:
        snappoint = PREFIX + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        control.request(sd.control_socket, "snappoint_create", name=snappoint)
        body = sd.read_meta()
    sp = next((s for s in body.snappoints if s.name == snappoint), None)
    if sp is None or sp.snapshot is None:
        raise UsageError(f"snappoint {snappoint!r} " + ("does not exist" if sp is None else
                         "is dataless (it keeps no snapshot)") + ": a seed is the image of "
                         "a dataful snappoint (omit --snappoint to make one)")
    info = next(i for i in control.request(sd.control_socket, "snappoint_list")
                if i["name"] == snappoint)
    if info.get("snapshot_changes_after") is not None:
        raise UsageError(f"snappoint {snappoint!r} keeps a snapshot of changes only (the "
                         "blocks its link's cycle sends), not a whole image: a seed needs a "
                         "whole image (omit --snappoint to make one)")
    iv = next(i for i in body.intervals if i.seq == sp.seq)
    h = open_nbd(status["uri"], export=f"snap/{snappoint}", tls_psk_file=tls_psk,
                 tls_username="prepl" if tls_psk else None)
    try:
        digest = _write_image(h, path + ".part", body.size)
    finally:
        close_nbd(h)
    header = {"volume_uuid": body.volume_uuid, "size": body.size,
              "region_size": body.region_size, "block_size": body.block_size,
              "snappoint": snappoint, "interval": iv.ref().to_json(), "created": time.time(),
              "image_digest": digest}
    _finish(path, header)
    log.info("seed of snappoint %s (interval %d) written to %s", snappoint, iv.seq, path)
    return header


def _write_image(h, part, size):
    """Streams the snapshot through h into part (sparse); returns the
    image's digest."""
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, HEADER + size)
        d = manifest.Digest()
        progress = _Progress("seed export", size)
        for off, n, _ in manifest.pieces([(0, size, False)]):
            buf = pread(h, n, off)
            d.add(off, n, False, buf)
            if not _zero_piece(buf):
                os.pwrite(fd, buf, HEADER + off)
            progress(off + n, final=off + n == size)
        os.fdatasync(fd)
        return d.hexdigest()
    finally:
        os.close(fd)


def _finish(path, header):
    """Writes the header into path.part, makes it durable, renames it."""
    doc = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
    if len(doc) > HEADER:
        raise ValueError("seed header too large")
    fd = os.open(path + ".part", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, doc.ljust(HEADER, b"\0"), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(path + ".part", path)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


# ---- import ----------------------------------------------------------------

def read_header(fd, path):
    """The header of the open seed file fd (RefusedError if it is none)."""
    raw = os.pread(fd, HEADER, 0)
    if not raw.startswith(MAGIC):
        raise RefusedError(f"{path} is not a prepl seed file (no {MAGIC.strip().decode()!r} "
                           "header)")
    try:
        h = json.loads(raw[len(MAGIC):].split(b"\0", 1)[0])
        IntervalRef.from_json(h["interval"])
        ok = all(isinstance(h.get(k), int) and h[k] > 0
                 for k in ("size", "region_size", "block_size")) and all(
            isinstance(h.get(k), str) for k in ("volume_uuid", "snappoint", "image_digest"))
    except (ValueError, KeyError, TypeError, RecordError):
        ok = False
    if not ok:
        raise RefusedError(f"{path}: the seed's header is damaged (it needs volume_uuid, "
                           "size, region_size, block_size, snappoint, interval, image_digest)")
    return h


def _check_fits(h, body, path):
    """The seed is for this replica: its geometry, and the volume the
    replica is bound to (if it is)."""
    mine = body.geometry()
    theirs = (h["size"], h["region_size"], h["block_size"])
    if theirs != mine:
        names = ("size", "region_size", "block_size")
        raise RefusedError(f"{path} is a seed of geometry {dict(zip(names, theirs))}, the "
                           f"replica has {dict(zip(names, mine))}: export the seed from "
                           "this replica's primary")
    if body.bound and body.bound.primary_uuid != h["volume_uuid"]:
        raise RefusedError(f"{path} is a seed of volume {h['volume_uuid']}; this replica is "
                           f"bound to volume {body.bound.primary_uuid}")
    if body.staging and body.staging.complete:
        raise RefusedError(f"{body.volume} has an applied interval still to merge: start "
                           "its server once (it finishes the apply), stop it, then import")
    if body.failback:
        raise RefusedError("a failback is pending on this node: finish it before seeding")


def _verify(fd, h, path):
    """Pass 1: the file is whole and its image matches the digest; returns
    each piece's hash (None: a zero piece), in offset order."""
    size = h["size"]
    have = os.fstat(fd).st_size
    if have != HEADER + size:
        raise RefusedError(f"{path} has {have} bytes, a seed of this volume "
                           f"{HEADER + size}: it is truncated or not this seed")
    d, hashes = manifest.Digest(), []
    progress = _Progress("seed import: verifying", size)
    for off, buf in _read_pieces(fd, size):
        ph = manifest.piece_hash(buf)
        d.add_hashed(off, len(buf), ph)
        hashes.append(None if _zero_piece(buf) else ph)
        progress(off + len(buf), final=off + len(buf) == size)
    if d.hexdigest() != h["image_digest"]:
        raise RefusedError(f"{path} is corrupted: its image does not match the digest in "
                           "its header")
    return hashes


def _read_pieces(fd, size):
    """(offset, piece) of the image in fd, read CHUNK pieces at a time into
    one buffer (the pieces are views of it, valid until the next)."""
    buf = bytearray(CHUNK * manifest.PIECE)
    for start in range(0, size, len(buf)):
        n = min(len(buf), size - start)
        view = memoryview(buf)[:n]
        got = os.preadv(fd, [view], HEADER + start)
        if got != n:
            raise RefusedError(f"the seed file ended early (at {HEADER + start + got})")
        for off, k, _ in manifest.pieces([(start, n, False)]):
            yield off, view[off - start:off - start + k]


def import_(state, path):
    """Verifies the seed at path and makes it the replica's applied image;
    returns the header.  The secondary's server must be stopped."""
    sd = StateDir(state)
    body = sd.read_meta()
    if body.role != "secondary":
        raise UsageError(f"{sd} is a {body.role}: a seed is imported into a secondary")
    lockfile = sd.lock()       # as a server: InUseError while one runs
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            h = read_header(fd, path)
            body = sd.read_meta()
            _check_fits(h, body, path)
            if volume_size(body.volume) != body.size:
                raise StateError(f"replica {body.volume} is not {body.size} bytes")
            _apply(sd, body, fd, h, _verify(fd, h, path))
        finally:
            os.close(fd)
    finally:
        lockfile.close()
    log.info("seed of snappoint %s (interval %d) of volume %s imported into %s",
             h["snappoint"], h["interval"]["seq"], h["volume_uuid"], sd)
    return h


def _apply(sd, body, fd, h, hashes):
    """Pass 2: no image while the replica is written -- each piece only
    if it still has the hash pass 1 verified --, then the seed's."""
    from .meta import Metadata
    md = Metadata(sd.path, body)
    with md.change() as new:
        new.applied, new.staging = None, None
    for name in os.listdir(sd.p("staging")) if os.path.isdir(sd.p("staging")) else ():
        os.unlink(sd.p("staging", name))
    size = h["size"]
    out = os.open(body.volume, os.O_RDWR | os.O_CLOEXEC)
    try:
        progress = _Progress("seed import: writing", size)
        zeros = []
        for i, (off, buf) in enumerate(_read_pieces(fd, size)):
            if hashes[i] is None:
                zeros.append((off, len(buf)))
            elif manifest.piece_hash(buf) != hashes[i]:
                raise RefusedError("the seed file changed while it was imported: the "
                                   "replica holds no image now; import it again")
            else:
                os.pwrite(out, buf, off)
            progress(off + len(buf), final=off + len(buf) == size)
        native.copy_ranges(-1, out, zeros, zero=True)
        os.fdatasync(out)
    finally:
        os.close(out)
    now = time.time()
    with md.change() as new:
        new.applied = Applied(IntervalRef.from_json(h["interval"]), None, now,
                              seed=h["snappoint"])
        if new.bound is None:
            new.bound = Binding(h["volume_uuid"], now, *body.geometry())


def release(agent, base):
    """After a cycle of agent's link from base applied: a seed's snappoint
    (seed.*) keeps no snapshot any more (its interval stays, for other
    replicas of the same seed)."""
    if base is None:
        return
    sp = next((s for s in agent.sd.read_meta().snappoints if s.seq == base.seq), None)
    if sp and sp.name.startswith(PREFIX) and sp.snapshot is not None:
        agent.ctl("snappoint_convert", name=sp.name)
        log.info("seed snappoint %s is dataless now", sp.name)


def describe(h):
    return (f"seed of volume {h['volume_uuid']}, snappoint {h['snappoint']} (interval "
            f"{h['interval']['seq']}), {fmt_size(h['size'])}")
