"""What the nbdkit plugin does, without nbdkit: configuration, exports and
per-connection handles.  nbdplugin/plugin.py forwards nbdkit's callbacks
here and turns OSError into nbdkit.set_error(errno).

Exports of a primary (ARCHITECTURE §3):
  ""           the volume, read-write
  snap/NAME    read-only image of snappoint NAME while it has a valid
               snapshot; block status: blocks written in the interval NAME
               closes are data (zeroed/trimmed ones: data + zero flag),
               every other block a hole *without* the zero flag.
Opening or listing an export never changes state.
"""
import errno
import logging
import os

import numpy as np

from .errors import PreplError, UsageError  # noqa: F401 (PreplError: plugin)
from .tracker import Tracker
from .control import ControlServer

log = logging.getLogger(__name__)

EXTENT_HOLE = 1     # nbdkit.EXTENT_HOLE
EXTENT_ZERO = 2     # nbdkit.EXTENT_ZERO
MAX_EXTENT_BLOCKS = 1 << 20   # blocks described per extents call at most
SNAP_PREFIX = "snap/"


class Server:
    def __init__(self):
        self.state = None
        self.tracker = None
        self.control = None

    def config(self, key, value):
        if key == "state":
            self.state = value
        else:
            raise UsageError(f"unknown parameter {key!r}: the prepl plugin takes state=DIR")

    def config_complete(self):
        if not self.state:
            raise UsageError("missing parameter state=DIR (the prepl state directory)")
        self.tracker = Tracker(self.state)

    def after_fork(self):
        self.tracker.start()
        self.control = ControlServer(self.tracker.sd.control_socket, self.tracker)
        self.control.start()

    def cleanup(self):
        if self.control:
            self.control.stop()
        if self.tracker:
            self.tracker.close()

    def list_exports(self):
        t = self.tracker
        out = [("", f"prepl volume {t.body['volume']} ({t.body['volume_uuid']})")]
        for sp in t.body["snappoints"]:
            if t.snapshot(sp["name"]) is not None:
                out.append((SNAP_PREFIX + sp["name"], f"snapshot at snappoint {sp['name']}"))
        return out

    def open(self, name, readonly):
        if name == "":
            return VolumeHandle(self.tracker, readonly)
        if name.startswith(SNAP_PREFIX):
            snap = self.tracker.snapshot(name[len(SNAP_PREFIX):])
            if snap is not None:
                return SnapHandle(self.tracker, name[len(SNAP_PREFIX):], snap)
        raise OSError(errno.ENOENT, f"unknown export {name!r}: exports are \"\" (the volume) "
                      "and snap/NAME for snappoints with a valid snapshot")


class VolumeHandle:
    is_snapshot = False

    def __init__(self, tracker, readonly):
        vol = tracker.vol
        self.writable = not readonly
        self.size = tracker.size
        # bound straight to the C binding: one Python frame less per request
        self.pread = vol.pread
        self.pwrite = vol.pwrite
        self.zero = vol.zero
        self.trim = vol.trim
        self.flush = vol.flush

    def extents(self, count, offset):
        return [(offset, count, 0)]


class SnapHandle:
    is_snapshot = True
    writable = False

    def __init__(self, tracker, name, snap):
        self.tracker = tracker
        self.name = name
        self.snap = snap
        self.size = tracker.size

    def pread(self, buf, offset):
        self.tracker.vol.snap_pread(self.snap.c, buf, offset)

    def _refused(self, *args):
        raise OSError(errno.EROFS, f"export snap/{self.name} is read-only")

    pwrite = zero = trim = _refused

    def flush(self):
        pass

    def extents(self, count, offset):
        t = self.tracker
        bs = t.body["block_size"]
        with t.lock:
            iv = t.body["intervals"][t._interval_closed_by(self.name)]
            maps = t.closed_interval_maps(iv)
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


def default_logging():
    """Logging of the server: stderr (nbdkit's log), no timestamps (journald
    or STATE/server.log's reader adds them); PREPL_LOG_LEVEL sets the level."""
    logging.basicConfig(level=os.environ.get("PREPL_LOG_LEVEL", "INFO"),
                        format="prepl[%(process)d] %(levelname)s %(name)s: %(message)s")
