"""When a primary last accepted a write, durably: the evidence a failback
needs to tell an old primary's writes made before its replica was promoted
(lost by definition of failover) from writes made after (split brain,
replication/roles.py).

What it owns: STATE/written, one line "WRITTEN LEASE\\n" padded to 64 bytes
(one sector, written in place: a crash leaves the old line or the new one).
What it promises, while the volume accepts writes:

* LEASE: every PERIOD seconds a thread writes the time and makes it
  durable (fdatasync of a 64-byte file, never in the write path), whether
  or not writes came: a server that crashes may have accepted a write a
  moment before, and only the lease bounds that moment (lease + PERIOD).
* WRITTEN: no write was accepted after it.  A look that finds the write
  count changed sets it to the look's time; stopping (a clean stop, a
  fence) looks once more after the writes have drained; a start after an
  unclean stop first raises it to the crashed run's lease + PERIOD.

So WRITTEN + the time a stalled stamp takes (divergence.CLOCK_MARGIN covers it,
with the two clocks' skew) bounds every write this node ever accepted.  A
file that cannot be read is no evidence: written() is None and the caller
assumes the worst (a write at any time).
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
    """(written, lease) of state directory state_dir (a StateDir): None,
    None if never stamped; raises ValueError if unreadable."""
    try:
        with open(state_dir.p(NAME), "rb") as f:
            raw = f.read(RECORD)
    except FileNotFoundError:
        return None, None
    written, lease = raw.split(b"\n", 1)[0].split()
    return float(written), float(lease)


class WriteClock:
    def __init__(self, state_dir, writes_total, unclean):
        """writes_total: a function, the count of writes accepted so far;
        unclean: the last run stopped uncleanly (its lease bounds it)."""
        self.sd = state_dir
        self.writes_total = writes_total
        try:
            w, lease = read(state_dir)
        except (OSError, ValueError) as e:
            log.error("the write clock %s is unreadable (%s): every earlier write is taken "
                      "as made now", state_dir.p(NAME), e)
            w = lease = time.time()
        w = w or 0.0
        if unclean and lease is not None:
            w = max(w, lease + PERIOD)
        self.written = w        # no write was accepted after this time
        self.lease = lease
        self._seen = writes_total()
        self._stop = threading.Event()
        self._thread = None
        self.error = None

    def settle(self):
        """For a server that accepts no writes (fenced): records WRITTEN as
        found (with the unclean run's lease folded in), durably."""
        self._write(self.written, self.lease or self.written)

    def start(self):
        self.stamp()
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
                              "failback will take every write as made now", e)
                self.error = e

    def stamp(self):
        """Records now as the lease, and as WRITTEN if writes came since the
        last look; durable on return."""
        now = time.time()
        n = self.writes_total()
        written = now if n != self._seen else self.written
        self._write(written, now)
        self.written, self.lease, self._seen = written, now, n

    def _write(self, written, lease):
        line = f"{written:.6f} {lease:.6f}\n".encode().ljust(RECORD, b" ")
        fd = os.open(self.sd.p(NAME), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, line, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def stop(self):
        """Stops the thread (the caller has stopped the writes), then the
        last stamp.  Nothing if it was not running.  A failed last stamp is
        logged: the lease before it still bounds the writes."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.stamp()
        except OSError as e:
            log.error("the last stamp of the write clock failed (%s)", e)
