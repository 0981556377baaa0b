"""When a primary last accepted a write, durably: the evidence a failback
needs to tell an old primary's writes made before its replica was promoted
(lost by definition of failover) from writes made after (split brain,
replication/roles.py).

What it owns: STATE/written, one line "TIME\\n" padded to 64 bytes (one
sector, written in place: a crash leaves the old line or the new one).
What it promises: while the volume accepts writes, a thread writes the
time every PERIOD seconds and makes it durable (fdatasync of a 64-byte
file, never in the write path): a lease, "writes may have been accepted
until now".  It stamps whether or not writes came: a server that crashed
after a quiet minute may have accepted a write a moment before the crash,
and only the lease bounds that moment.  So every write this node accepted
was accepted before the last stamp + PERIOD (plus the time a stalled stamp
takes, which roles.CLOCK_MARGIN covers).  Stopping it (a clean stop, a
fence) stamps once more, after the last write.

A file that cannot be read as a time is no evidence: last() is None and
the caller must assume the worst (a write at any time).
"""
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

NAME = "written"
PERIOD = 1.0
RECORD = 64


def read(state_dir):
    """The last stamped time (seconds since the epoch) in state directory
    state_dir (a StateDir), or None: never stamped, or unreadable."""
    try:
        with open(state_dir.p(NAME), "rb") as f:
            raw = f.read(RECORD)
        return float(raw.split(b"\n", 1)[0])
    except (OSError, ValueError):
        return None


class WriteClock:
    def __init__(self, state_dir):
        self.sd = state_dir
        self._stop = threading.Event()
        self._thread = None
        self.error = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="prepl-writeclock", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(PERIOD):
            try:
                self.stamp()
                self.error = None
            except OSError as e:       # kept for status; the next period tries again
                if self.error is None:
                    log.error("cannot record when the volume was last written (%s): a "
                              "failback will treat every write as made at any time", e)
                self.error = e

    def stamp(self):
        """Records now, durably (after every write accepted so far)."""
        now = time.time()
        line = f"{now:.6f}\n".encode().ljust(RECORD, b" ")
        fd = os.open(self.sd.p(NAME), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, line, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def stop(self):
        """Stops the thread (the caller has stopped the writes), then the
        last stamp.  Nothing if it was not running.  A failed last stamp is
        logged: the one before it, plus PERIOD, still bounds the writes."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.stamp()
        except OSError as e:
            log.error("the last stamp of the write clock failed (%s)", e)
