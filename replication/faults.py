"""Named fault points, enabled only by the environment (tests set it).

    PREPL_FAULT="secondary.apply.midway"          -> the process exits (crash)
    PREPL_FAULT="secondary.apply.midway:raise"    -> FaultInjected is raised

A point costs one dictionary lookup when no fault is set.  The points:

  primary.al.before_write          a write's new AL extent, before the log write (C)
  primary.al.after_sync            after the log write and its fdatasync (C)
  primary.snappoint.after_switch   snappoint: writes go to the new interval,
                                   nothing of it is durable yet
  primary.snappoint.after_save     snappoint: metadata durable, log not trimmed
  secondary.commit.staged_durable  staged data durable, nothing recorded yet
  secondary.commit.after_switch    interval recorded as applied, receipt not sent
  secondary.apply.midway           half of the staging merged into the replica
  secondary.apply.before_record    merge durable, staging not yet dropped
  secondary.merge.recorded         staging dropped from the metadata, its files not
                                   yet removed
  agent.after_receipt              receipt in hand, the link's cursor not moved
  secondary.failover.before_record failover: merge done, staging discarded, new
                                   interval files created, nothing recorded
  secondary.failover.recorded      failover recorded, the primary not yet serving

The C points (primary.al.*) only crash (no :raise).  Each has a test in
tests/integration/test_crash_sweep.py.

I/O error points (io(name)) make a system call fail with an errno instead.
They are armed at run time through a file named by PREPL_FAULT_FILE (tests
set it), one line per point: "NAME ERRNO [COUNT [AFTER]]": after AFTER calls
that pass (default 0), COUNT calls fail (default 1); the file is rewritten
as they are used up.  E.g.

  meta.write ENOSPC      the metadata's temp file write
  meta.fsync EIO         its fsync
  meta.dirsync EIO       the directory's fsync after the rename (fail-stop)
  primary.volume.flush EIO    a client's flush (fdatasync of the volume)
  primary.volume.durable EIO  a durable point of the volume (replication/durability.py)
  secondary.staging.fdatasync EIO    the commit's fdatasync of the staging

Without PREPL_FAULT_FILE an io point costs one attribute lookup.
"""
import errno as _errno
import os
import threading

_SPEC = os.environ.get("PREPL_FAULT", "")
_POINTS = dict(p.partition(":")[::2] for p in _SPEC.split(",") if p)


class FaultInjected(Exception):
    pass


def point(name):
    if name in _POINTS:
        if _POINTS[name] == "raise":
            raise FaultInjected(name)
        os._exit(99)


_FILE = os.environ.get("PREPL_FAULT_FILE") or None
_FILE_LOCK = threading.Lock()


def io(name):
    """Raises OSError(ERRNO) if the fault file arms point name (see above)."""
    if _FILE is None:
        return
    with _FILE_LOCK:
        try:
            with open(_FILE) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        for i, line in enumerate(lines):
            parts = line.split()
            if len(parts) < 2 or parts[0] != name:
                continue
            count = int(parts[2]) if len(parts) > 2 else 1
            after = int(parts[3]) if len(parts) > 3 else 0
            if count <= 0:
                continue
            lines[i] = f"{name} {parts[1]} {count if after else count - 1} {max(0, after - 1)}"
            tmp = _FILE + ".tmp"
            with open(tmp, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.rename(tmp, _FILE)
            if after:
                return
            code = getattr(_errno, parts[1])
            raise OSError(code, f"{os.strerror(code)} (injected at {name})")


def set_file_for_test(path):
    """In-process tests: the fault file io() reads (None: none)."""
    global _FILE
    _FILE = str(path) if path else None


def armed(name):
    """The mode of an armed point ("" = crash, "raise"), or None."""
    return _POINTS.get(name)


def set_for_test(spec):
    """In-process tests: replace the active fault points."""
    _POINTS.clear()
    _POINTS.update(p.partition(":")[::2] for p in spec.split(",") if p)
