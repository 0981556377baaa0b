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

The C points (primary.al.*) only crash (no :raise).  Each has a test in
tests/integration/test_crash_sweep.py.
"""
import os

_SPEC = os.environ.get("PREPL_FAULT", "")
_POINTS = dict(p.partition(":")[::2] for p in _SPEC.split(",") if p)


class FaultInjected(Exception):
    pass


def point(name):
    if name in _POINTS:
        if _POINTS[name] == "raise":
            raise FaultInjected(name)
        os._exit(99)


def armed(name):
    """The mode of an armed point ("" = crash, "raise"), or None."""
    return _POINTS.get(name)


def set_for_test(spec):
    """In-process tests: replace the active fault points."""
    _POINTS.clear()
    _POINTS.update(p.partition(":")[::2] for p in spec.split(",") if p)
