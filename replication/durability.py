"""When a primary's volume is made durable: its durability horizon.

What it owns: the background fdatasync of the volume of a primary
(VolumeDurability), every `serve --sync-interval` seconds while closed
intervals wait for it.  What it promises (ARCHITECTURE §4 step 1 as this
version keeps it, invariants I1 and I2):

* A snappoint makes the closed interval's *maps* durable before its record,
  not the volume's data: the switch, the maps' msync and the metadata are
  all a cycle waits for before it reads the snapshot.  A cycle may so send
  the secondary data the primary's disk does not hold yet.
* The activity log keeps every extent written in an interval whose data may
  not be durable yet (native/writepath.c: pr_al_trim keeps the closed
  intervals' extents until a pr_volume_durable that began after their
  switch has succeeded).  After a power loss, recovery (replication/actlog.py)
  counts those extents as changed, so the next cycle sends the secondary
  what the primary's disk holds there now, whatever of it the power loss
  kept: the replica never keeps a block the primary lost, past the next
  applied cycle, and no changed block goes unsent (I2).  Until that cycle
  the replica is the primary's image at its last snappoint, which the
  primary's own disk may have lost part of: a point-in-time image of the
  primary as the NBD client saw it (I1), like any crash-consistent image
  of a disk whose writes were acknowledged but not flushed.
* Flushes and FUA writes of NBD clients are fdatasyncs as before (every
  write acknowledged before a completed flush survives a power loss); a
  failed fdatasync is sticky in the volume (every later flush fails) and
  keeps the extents in the log.
* Where a record claims what the volume holds, the volume is made durable
  first: a clean stop (replication/tracker.py) and a failback, whose record
  says the old primary holds the divergence point's image
  (replication/roles.py).

Why: the volume's fdatasync at every snappoint made a second's random
writes reach the disk at once, and the writers meeting it were the largest
part of what a snappoint every second cost them (measured, README).  Made
durable every few seconds in the background instead, the writes coalesce in
the page cache as they do without replication; the price is that a power
loss makes the next cycle resend the extents written since the last
durable point (bounded by the activity log's extents, like DRBD's).
"""
import logging
import threading

from .errors import UsageError
from .priority import background_priority

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 5.0


def sync_interval(text):
    """`--sync-interval` / `sync_interval=`: seconds, 0.05 to 3600."""
    try:
        v = float(text)
    except ValueError:
        v = None
    if v is None or not 0.05 <= v <= 3600:
        raise UsageError(f"sync interval {text!r}: give seconds from 0.05 to 3600")
    return v


class VolumeDurability:
    """fdatasync of volume vol (native.Volume) every interval seconds in a
    thread of its own at background priority, whenever closed intervals
    wait for it (a volume nobody takes snappoints of is left to its NBD
    clients' flushes and the kernel)."""
    name = "prepl-volume-durability"

    def __init__(self, vol, interval=DEFAULT_INTERVAL):
        if not interval > 0:
            raise ValueError(f"sync interval must be positive, not {interval!r}")
        self.vol = vol
        self.interval = interval
        self.syncs = 0
        self.failed = False       # said in the log (the error itself: volume_sync_error)
        self.stop = threading.Event()
        self.thread = None

    def start(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def _run(self):
        background_priority()
        while not self.stop.wait(self.interval):
            self.sync_now()

    def sync_now(self):
        """One durable point now, if any closed interval waits for one;
        returns whether it was taken and succeeded."""
        if not self.vol.al_pending:
            return False
        try:
            self.vol.durable()
        except OSError as e:
            if not self.failed:           # sticky in the volume: said once
                log.error("%s: the volume could not be made durable: %s; every "
                          "flush fails from now on and the activity log keeps the "
                          "closed intervals' extents (restart the server to recover)",
                          self.name, e)
            self.failed = True
            return False
        self.syncs += 1
        return True

    def close(self):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def status(self):
        return {"interval_s": self.interval, "syncs": self.syncs,
                "pending_extents": self.vol.al_pending}
