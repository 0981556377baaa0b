"""Map files made ahead of the snappoints that need them.

What it owns: STATE/maps/n<N>.cmap, .bmap and .zmap of a primary, sets of
an interval's three map files, zero, allocated and durable with their
directory entries, made by a background thread at background priority.
What it promises:

* take() hands over a ready set, mapped writable, or None: the caller then
  creates its files as it did before there were spares, so an empty pool
  (a full filesystem, a burst of snappoints) changes no outcome.  Each
  take wakes the thread to make another set.
* A snappoint that takes a set neither allocates nor syncs new files
  before its switch, and a delete that merges into a set copies into
  files that exist already: the file creation and its journal commit move
  out of the control path, whose thread holds the server's lock and
  competes with the volume's writers for the CPU and the GIL.
* A set is no interval's until the metadata names its files (then they
  are that interval's map files, named n<N>.<kind> for good).  A clean
  stop and a start remove the sets nobody took; after an unclean stop recovery
  treats spare change and block maps as those of a switch whose record
  was never written (replication/actlog.py): OR-ed into the open interval
  (zero if never taken), then removed.
"""
import logging
import os
import re
import threading

from .chain import nbits, sync_created
from .maps import KINDS, IntervalMaps, MapFile
from .priority import background_priority

log = logging.getLogger(__name__)

SPARE_NAME = re.compile(r"n[0-9]+\.(cmap|bmap|zmap)")


def is_spare(name):
    """Whether a file name in maps/ is a spare map's."""
    return SPARE_NAME.fullmatch(name) is not None


def remove_spares(sd, body):
    """Removes the spare map files that no interval of body names (nobody
    took them)."""
    taken = {f for iv in body.intervals for f in iv.maps.values()}
    for name in os.listdir(sd.p("maps")):
        if is_spare(name) and name not in taken:
            os.unlink(sd.p("maps", name))


class SpareMaps:
    """Up to `keep` ready sets of interval map files of the volume body
    describes, in state directory sd."""

    def __init__(self, sd, body, keep=2):
        self.sd = sd
        self.nbits = {k: nbits(body, k) for k in KINDS}
        self.keep = keep
        self._ready = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._next = 0
        self._thread = None
        self._failing = False
        self.made = 0           # sets made (for tests and status)
        self.missed = 0         # takes that found none ready

    def start(self):
        """Starts the thread (in the server's after_fork)."""
        self._thread = threading.Thread(target=self._run, name="spare-maps", daemon=True)
        self._wake.set()
        self._thread.start()

    def take(self):
        """A ready set (IntervalMaps) or None."""
        with self._lock:
            maps = self._ready.pop(0) if self._ready else None
            if maps is None:
                self.missed += 1
        self._wake.set()
        return maps

    def status(self):
        """For `status --json`: sets ready now, made and missed since start."""
        with self._lock:
            return {"ready": len(self._ready), "made": self.made, "missed": self.missed}

    def close(self):
        """Stops the thread and removes the sets nobody took."""
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for maps in ready:
            for m in maps:
                os.unlink(m.path)

    def _run(self):
        background_priority()
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self.keep:
                        break
                try:
                    maps = self._make()
                except OSError as e:       # e.g. ENOSPC: the next take creates its own
                    if not self._failing:  # said once until a set is made again
                        log.warning("could not make spare map files in %s: %s; snappoints "
                                    "create their own meanwhile", self.sd.p("maps"), e)
                    self._failing = True
                    break
                self._failing = False
                with self._lock:
                    if not self._closed:
                        self._ready.append(maps)
                        self.made += 1
                        continue
                for m in maps:
                    os.unlink(m.path)
                return
            with self._lock:
                if self._closed:
                    return

    def _make(self):
        """One new set, durable: n<N>.<kind> for a number N free in maps/."""
        while True:
            n, self._next = self._next, self._next + 1
            paths = [self.sd.p("maps", f"n{n}.{k}") for k in KINDS]
            if not any(os.path.exists(p) for p in paths):
                break
        made = []
        try:
            for p, k in zip(paths, KINDS):
                made.append(MapFile(p, self.nbits[k], create=True, sync=False))
            maps = IntervalMaps(*made)
            sync_created(self.sd, maps)
            return maps
        except BaseException:
            for m in made:
                os.unlink(m.path)
            if len(made) < len(paths) and os.path.exists(paths[len(made)]):
                os.unlink(paths[len(made)])
            raise
