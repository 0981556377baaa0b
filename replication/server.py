"""What the nbdkit plugin does, without nbdkit: configuration, exports and
per-connection handles.  nbdplugin/plugin.py forwards nbdkit's callbacks
here and turns OSError into nbdkit.set_error(errno).

Exports of a primary (ARCHITECTURE §3):
  ""           the volume, read-write
  snap/NAME    read-only image of snappoint NAME while it has a valid
               snapshot; block status: blocks written in the interval NAME
               closes are data (zeroed/trimmed ones: data + zero flag),
               every other block a hole *without* the zero flag.
  pack/NAME/BASE/FP
               read-only, not listed: the data pieces of the interval union
               (BASE, NAME] one after the other (replication/pack.py); FP
               must be the fingerprint of that union's run list
Exports of a secondary (only "" is listed):
  ""           the replica, read-only
  info         a small JSON document: replica UUID, binding, geometry, last
               applied interval, staging in progress
  stage/PRIMARY_UUID/BASE/TARGET
               writable, block-aligned: the staging of interval BASE->TARGET
               (BASE "none" for an initial sync); refused at open if the
               replica is bound to another primary or BASE is not the last
               applied interval
  batch/PRIMARY_UUID/BASE/TARGET
               the same staging, written in batches (replication/pack.py)
  commit/TARGET
               write a manifest (JSON) at offset 0, then flush: the replica
               verifies and applies it; reading returns the receipt (also
               later, from a new connection: commits are idempotent)
Opening or listing an export never changes state.
"""
import errno
import logging
import os
import re
import uuid

import numpy as np

from . import manifest, pack
from .chain import union_runs
from .errors import EXIT_STATE, PreplError, StateError, UsageError  # noqa: F401
from .tracker import Tracker
from .control import ControlServer
from .secondary import COMMIT_EXPORT_SIZE, Replica
from .state import StateDir
import json

log = logging.getLogger(__name__)

EXTENT_HOLE = 1     # nbdkit.EXTENT_HOLE
EXTENT_ZERO = 2     # nbdkit.EXTENT_ZERO
MAX_EXTENT_BLOCKS = 1 << 20   # blocks described per extents call at most
SNAP_PREFIX = "snap/"
PACK_PREFIX = "pack/"
BATCH_EXPORT_SIZE = 1 << 60   # the batch export's offsets are not used
SEQ = re.compile(r"0|[1-9][0-9]{0,17}")    # an interval number: ASCII decimal, canonical


def parse_seq(text):
    """The interval number spelled canonically by text, else None ("007",
    "-1", "1e3" and non-ASCII digits are not interval numbers)."""
    return int(text) if isinstance(text, str) and SEQ.fullmatch(text) else None


def is_uuid(text):
    try:
        return str(uuid.UUID(text)) == text
    except (TypeError, ValueError, AttributeError):
        return False


def check_stage_export(primary_uuid, base, target):
    """The grammar of stage/PRIMARY_UUID/BASE/TARGET: a canonical UUID,
    BASE "none" or an interval number, TARGET an interval number after
    BASE.  Raises OSError(EINVAL)."""
    b = None if base == "none" else parse_seq(base)
    t = parse_seq(target)
    if not is_uuid(primary_uuid) or (b is None and base != "none") or t is None \
            or (b is not None and t <= b):
        raise OSError(errno.EINVAL, "malformed staging export name: stage/PRIMARY_UUID/BASE/"
                      "TARGET takes a volume UUID, BASE 'none' or an interval number and "
                      "TARGET an interval number after BASE")


class Server:
    def __init__(self):
        self.state = None
        self.tracker = None
        self.replica = None
        self.control = None
        self.uri = None

    def config(self, key, value):
        if key == "state":
            self.state = value
        elif key == "uri":
            self.uri = value          # where this server listens (for status)
        else:
            raise UsageError(f"unknown parameter {key!r}: the prepl plugin takes state=DIR "
                             "[uri=URI]")

    def config_complete(self):
        if not self.state:
            raise UsageError("missing parameter state=DIR (the prepl state directory)")
        try:
            if StateDir(self.state).read_meta()["role"] == "secondary":
                self.replica = Replica(self.state)
            else:
                self.tracker = Tracker(self.state)
        except FileNotFoundError as e:      # a map, snapshot or staging file is gone
            raise StateError(f"{e.filename} is missing: the state directory {self.state} is "
                             "damaged; refusing to serve it")
        self.owner.md.fail_stop = _fail_stop

    @property
    def owner(self):
        return self.tracker or self.replica

    def after_fork(self):
        try:        # nbdkit (umask 022) wrote it 0644 just before calling us
            os.chmod(self.owner.sd.pidfile, 0o600)
        except FileNotFoundError:
            pass
        self.owner.uri = self.uri
        if self.tracker:
            self.tracker.start()
        if self.replica:
            self.replica.start()
        self.control = ControlServer(self.owner.sd.control_socket, self.owner)
        self.control.start()

    def cleanup(self):
        if self.control:
            self.control.stop()
        if self.owner:
            self.owner.close()

    def list_exports(self):
        if self.replica:
            return [("", f"prepl replica {self.replica.body['volume_uuid']}")]
        t = self.tracker
        out = [("", f"prepl volume {t.body['volume']} ({t.body['volume_uuid']})")]
        for sp in t.body["snappoints"]:
            if t.snapshot(sp["name"]) is not None:
                out.append((SNAP_PREFIX + sp["name"], f"snapshot at snappoint {sp['name']}"))
        return out

    def open(self, name, readonly):
        if self.replica:
            return self._open_secondary(name, readonly)
        if name == "":
            return VolumeHandle(self.tracker, readonly)
        if name.startswith(SNAP_PREFIX):
            snap = self.tracker.snapshot(name[len(SNAP_PREFIX):])
            if snap is not None:
                return SnapHandle(self.tracker, name[len(SNAP_PREFIX):], snap)
        if name.startswith(PACK_PREFIX):
            return self._open_pack(name)
        raise OSError(errno.ENOENT, f"unknown export {name[:200]!r}: exports are \"\" (the "
                      "volume) and snap/NAME for snappoints with a valid snapshot")

    def _open_pack(self, name):
        t = self.tracker
        parts = name.split("/")
        base = parse_seq(parts[2]) if len(parts) == 4 else None
        if len(parts) != 4 or (base is None and parts[2] != "none"):
            raise OSError(errno.EINVAL, "malformed pack export name: pack/NAME/BASE/FP takes "
                          "a snappoint, BASE 'none' or an interval number and a fingerprint")
        snap = t.snapshot(parts[1])
        if snap is None:
            raise OSError(errno.ENOENT, f"snappoint {parts[1][:64]!r} has no valid snapshot")
        with t.lock:
            try:
                target = t.interval_closed_by(parts[1])["seq"]
                if base is not None and base >= target:
                    raise StateError(f"interval {base} is not before interval {target}")
                run_list = union_runs(t.sd, t.body, base, target)
            except (StateError, OSError) as e:
                log.error("refused pack export %r: %s", name[:200], e)
                raise OSError(errno.EINVAL, str(e))
        if pack.fingerprint(run_list) != parts[3]:
            log.error("refused pack export %r: the run list of intervals (%s, %d] here has "
                      "fingerprint %s", name[:200], parts[2], target, pack.fingerprint(run_list))
            raise OSError(errno.EINVAL, "the fingerprint does not match this server's run list")
        return PackHandle(t, snap, pack.Stream(run_list))

    def _open_secondary(self, name, readonly):
        r = self.replica
        parts = name.split("/")
        if name == "":
            return ReplicaHandle(r)
        if name == "info":
            return DocHandle(json.dumps(r.info(), sort_keys=True).encode())
        if parts[0] in ("stage", "batch") and len(parts) == 4 and not readonly:
            try:
                check_stage_export(*parts[1:])
                r.check_stage_name(*parts[1:])
            except OSError as e:
                log.error("refused staging export %r: %s", name[:200], e.strerror)
                raise
            except PreplError as e:
                log.error("refused staging export %r: %s", name[:200], e)
                raise OSError(errno.EPERM, str(e))
            return (StageHandle if parts[0] == "stage" else BatchHandle)(r, *parts[1:])
        if parts[0] == "commit" and len(parts) == 2 and parse_seq(parts[1]) is not None:
            return CommitHandle(r, parse_seq(parts[1]))
        raise OSError(errno.ENOENT, f"unknown export {name[:200]!r} on a secondary")


class Handle:
    """What every handle tells nbdkit (plugin.py reads these)."""
    is_snapshot = False
    writable = False
    can_zero = False
    fua_native = False
    block_size = (1, 4096, 32 << 20)

    def flush(self):
        pass

    def _refused(self, *args):
        raise OSError(errno.EROFS, "this export is read-only")

    pwrite = zero = trim = _refused


class VolumeHandle(Handle):
    can_zero = True
    fua_native = True

    def __init__(self, tracker, readonly):
        vol = tracker.vol
        self.writable = not readonly
        self.can_zero = not readonly
        self.size = tracker.size
        # bound straight to the C binding: one Python frame less per request
        self.pread = vol.pread
        self.pwrite = vol.pwrite
        self.zero = vol.zero
        self.trim = vol.trim
        self.flush = vol.flush

    def extents(self, count, offset):
        return [(offset, count, 0)]


class SnapHandle(Handle):
    is_snapshot = True

    def __init__(self, tracker, name, snap):
        self.tracker = tracker
        self.name = name
        self.snap = snap
        self.size = tracker.size

    def pread(self, buf, offset):
        self.tracker.vol.snap_pread(self.snap.c, buf, offset)

    def extents(self, count, offset):
        t = self.tracker
        bs = t.body["block_size"]
        with t.lock:
            maps = t.interval_maps(t.interval_closed_by(self.name))
            b0 = offset // bs
            b1 = min(-(-(offset + count) // bs), t.nblocks, b0 + MAX_EXTENT_BLOCKS)
            w0 = b0 // 64
            w1 = -(-b1 // 64)
            lo, hi = b0 - w0 * 64, b1 - w0 * 64
            b = np.unpackbits(maps["bmap"].bits[w0:w1].view(np.uint8), bitorder="little")[lo:hi]
            z = np.unpackbits(maps["zmap"].bits[w0:w1].view(np.uint8), bitorder="little")[lo:hi]
        kind = np.where(b == 0, EXTENT_HOLE, np.where(z == 1, EXTENT_ZERO, 0))
        edges = np.flatnonzero(np.diff(kind)) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [len(kind)]))
        out = []
        for s, e in zip(starts.tolist(), ends.tolist()):
            start = (b0 + s) * bs
            end = min((b0 + e) * bs, self.size)
            out.append((start, end - start, int(kind[s])))
        return out


class PackHandle(Handle):
    """pack/NAME/BASE/FP: the interval's data pieces, packed."""

    def __init__(self, tracker, snap, stream):
        self.vol = tracker.vol
        self.snap = snap
        self.stream = stream
        self.size = stream.size

    def pread(self, buf, offset):
        mv = memoryview(buf)
        try:
            segments = self.stream.segments(offset, len(mv))
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e))
        self.vol.snap_pread_segments(self.snap.c, mv, segments)


class ReplicaHandle(Handle):
    def __init__(self, replica):
        self.size = replica.size
        self.pread = replica.pread


class DocHandle(Handle):
    """A small read-only document (nbdkit's info plugin pattern)."""

    def __init__(self, doc):
        self.doc = doc
        self.size = -(-max(len(doc), 1) // 4096) * 4096

    def pread(self, buf, offset):
        data = self.doc[offset:offset + len(buf)]
        buf[:] = data + bytes(len(buf) - len(data))


class StageHandle(Handle):
    writable = True
    can_zero = True

    def __init__(self, replica, primary_uuid, base, target):
        self.r = replica
        self.key = (primary_uuid, base, target)
        self.size = replica.size
        self.block_size = (replica.block, replica.block, 32 << 20)
        self.started = False
        self.stage = None         # the staging this connection writes (see _start)

    def _start(self):
        """The first request starts (or joins) the staging of this export;
        every later one must reach that staging, never a later one (the
        replica refuses it once that staging has ended)."""
        if not self.started:
            try:
                self.stage = self.r.begin_staging(*self.key)
            except PreplError as e:      # refused (EPERM), or the metadata write's errno
                raise OSError(getattr(e, "errno", None) or errno.EPERM, str(e))
            self.started = True

    def pread(self, buf, offset):
        raise OSError(errno.EPERM, "the staging export is write-only")

    def pwrite(self, buf, offset, flags=0):
        if not self.started:          # a refused request starts nothing
            self.r._check_aligned(len(buf), offset)
            self._start()
        self.r.stage_write(buf, offset, self.stage)     # checks the request (every time)

    def zero(self, count, offset, flags=0):
        if not self.started:
            self.r._check_aligned(count, offset)
            self._start()
        self.r.stage_zero(count, offset, self.stage)

    trim = zero

    def flush(self):
        self._start()             # an interval may have no changed block at all
        self.r.stage_flush(self.stage)


class BatchHandle(StageHandle):
    """batch/PRIMARY/BASE/TARGET: the staging, a batch per write; a batch
    is checked whole (format, every entry's range and alignment) before
    any of it is staged."""
    can_zero = False

    def __init__(self, replica, primary_uuid, base, target):
        super().__init__(replica, primary_uuid, base, target)
        self.size = BATCH_EXPORT_SIZE
        self.block_size = (1, 4096, pack.MAX_BATCH)

    def pwrite(self, buf, offset, flags=0):
        try:
            entries, data = pack.decode(buf)
        except ValueError as e:
            log.error("refused a batch of %d bytes: %s", len(buf), e)
            raise OSError(errno.EINVAL, str(e))
        for off, n, _ in entries:
            self.r._check_aligned(n, off)
        self._start()
        self.r.stage_batch(entries, data, self.stage)

    zero = trim = Handle._refused


class CommitHandle(Handle):
    """Write a manifest at offset 0 and flush: the commit happens in the
    flush; reads return the receipt (or why there is none)."""
    writable = True

    def __init__(self, replica, target):
        self.r = replica
        self.target = target
        self.size = COMMIT_EXPORT_SIZE
        self.buf = bytearray(COMMIT_EXPORT_SIZE)
        self.result = None

    def pwrite(self, buf, offset, flags=0):
        self.buf[offset:offset + len(buf)] = buf

    def flush(self):
        text = bytes(self.buf).split(b"\0", 1)[0]
        if not text:
            return
        try:
            m = manifest.parse(text, self.target)
            self.result = {"ok": True, "receipt": self.r.commit(m)}
        except PreplError as e:
            log.error("commit of interval %s refused: %s", self.target, e)
            self.result = {"ok": False, "error": str(e)}
        self.buf[:] = bytes(len(self.buf))

    def pread(self, buf, offset):
        res = self.result
        if res is None:
            receipt = self.r.receipt_for(self.target)
            res = {"ok": True, "receipt": receipt} if receipt else \
                {"ok": False, "error": f"interval {self.target} is not applied"}
        doc = json.dumps(res, sort_keys=True).encode()
        data = doc[offset:offset + len(buf)]
        buf[:] = data + bytes(len(buf) - len(data))


def _fail_stop(err):
    """A metadata write whose durability is unknown (replication/meta.py):
    the server stops at once, as in a crash; its next start trusts the
    file it finds and recovers as after any unclean stop."""
    log.critical("stopping the server: %s", err)
    logging.shutdown()
    os._exit(EXIT_STATE)


def default_logging():
    """Logging of the server: stderr (nbdkit's log), no timestamps (journald
    or STATE/server.log's reader adds them); PREPL_LOG_LEVEL sets the level."""
    logging.basicConfig(level=os.environ.get("PREPL_LOG_LEVEL", "INFO"),
                        format="prepl[%(process)d] %(levelname)s %(name)s: %(message)s")
