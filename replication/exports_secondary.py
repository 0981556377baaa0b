"""The exports of a secondary (ARCHITECTURE §3), as nbdkit handles; only
"" is listed:
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
  divergence   read-only, while a failback is pending: its divergence map,
               a bit per block (little-endian uint64 words), the blocks
               the new primary's first interval must overwrite
  held/PRIMARY_UUID/BASE/TARGET
               read-only, while that interval's staging is receiving: the
               staging made durable, then the blocks it holds (its data map's
               words, then its zero map's): a resumed transfer sends the rest
  commit/TARGET
               write a manifest (JSON) at offset 0, then flush: the replica
               verifies and applies it; reading returns the receipt (also
               later, from a new connection: commits are idempotent)
Opening or listing an export never changes state.  A connection to stage/,
batch/ or commit/ (the agent's) is served at background CPU priority
(priority.background_priority): on a host shared with other work, readers
of the replica and that work go first.
"""
import errno
import json
import logging

from . import manifest, pack
from .errors import PreplError
from .exports import DocHandle, Handle, RequestHandle, is_uuid, parse_seq
from .secondary import COMMIT_EXPORT_SIZE
from .priority import background_priority

log = logging.getLogger(__name__)

BATCH_EXPORT_SIZE = 1 << 60   # the batch export's offsets are not used


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


def list_exports(r):
    """(name, description) of the listed exports of replica r."""
    return [("", f"prepl replica {r.body.volume_uuid}")]


def open_export(r, name, readonly):
    """The handle of export name of replica r (OSError ENOENT/EINVAL/EPERM)."""
    parts = name.split("/")
    if name == "":
        return ReplicaHandle(r)
    if name == "info":
        return DocHandle(json.dumps(r.info(), sort_keys=True).encode())
    if name == "divergence":
        doc = r.divergence_map()
        if doc is None:
            raise OSError(errno.ENOENT, "no failback is pending: no divergence map")
        return DocHandle(doc)
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
        background_priority()     # the agent's writes: background work of this host
        return (StageHandle if parts[0] == "stage" else BatchHandle)(r, *parts[1:])
    if parts[0] == "held" and len(parts) == 4:
        check_stage_export(*parts[1:])
        return DocHandle(r.held(parts[1:]))
    if parts[0] == "commit" and len(parts) == 2 and parse_seq(parts[1]) is not None:
        background_priority()
        return CommitHandle(r, parse_seq(parts[1]))
    raise OSError(errno.ENOENT, f"unknown export {name[:200]!r} on a secondary")


class ReplicaHandle(Handle):
    def __init__(self, replica):
        self.size = replica.size
        self.pread = replica.pread


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
            self.r.staging.check_aligned(len(buf), offset)
            self._start()
        self.r.staging.write(buf, offset, self.stage)     # checks the request (every time)

    def zero(self, count, offset, flags=0):
        if not self.started:
            self.r.staging.check_aligned(count, offset)
            self._start()
        self.r.staging.zero(count, offset, self.stage)

    trim = zero

    def flush(self):
        self._start()             # an interval may have no changed block at all
        self.r.staging.flush(self.stage)


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
            self.r.staging.check_aligned(n, off)
        self._start()
        self.r.staging.batch(entries, data, self.stage)

    zero = trim = Handle.refuse_write


class CommitHandle(RequestHandle):
    """Write a manifest at offset 0 and flush: the commit happens in the
    flush; reads return the receipt (or why there is none)."""
    size = COMMIT_EXPORT_SIZE

    def __init__(self, replica, target):
        super().__init__()
        self.r = replica
        self.target = target

    def answer(self, text):
        return {"receipt": self.r.commit(manifest.parse(text, self.target)).to_json()}

    def default(self):
        receipt = self.r.receipt_for(self.target)
        return {"ok": True, "receipt": receipt.to_json()} if receipt else \
            {"ok": False, "error": f"interval {self.target} is not applied"}
