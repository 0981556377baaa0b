"""Named fault points, enabled only by the environment (tests set it).

    PREPL_FAULT="secondary.apply.midway"          -> the process exits (crash)
    PREPL_FAULT="secondary.apply.midway:raise"    -> FaultInjected is raised

A point costs one dictionary lookup when no fault is set.
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


def set_for_test(spec):
    """In-process tests: replace the active fault points."""
    _POINTS.clear()
    _POINTS.update(p.partition(":")[::2] for p in spec.split(",") if p)
