"""No write waits for a sync it does not need (issue 14): the primary runs
with tests/harness/slowsync.c preloaded, so every fsync, fdatasync, msync
and syncfs of the server takes 200 ms, as on a disk slow to flush.  A
snappoint then takes seconds (the volume's flush, the maps' msync, the
metadata, the activity log's trim), and writes arriving meanwhile must
still complete in under 10 ms each: the switch holds the writers only for
its pointer swaps, and nothing a write needs is held across a sync.  The
volume's activity-log extents are all hot (written in the interval the
snappoint closes), so none of these writes needs a log write of its own;
the writer visits the extents in turn, slowly (a round takes longer than
the snappoint after its switch), so every write after the switch is the
first of its extent in the new interval, those inside the log's trim
included (the server takes no durable point of the volume meanwhile,
which would take the extents out of the log).  Another client writes with FUA all the while: the switch must
not wait for the sync of a FUA write in flight."""
import json
import os
import random
import subprocess
import threading
import time

import nbd
import pytest

from tests.conftest import prepl

pytestmark = pytest.mark.slow

MiB = 1 << 20
SIZE = 64 * MiB
EXTENT = 4 * MiB            # state.DEFAULT_AL_EXTENT
SLOW_MS = 200
LIMIT = 0.010               # seconds a write may take during the snappoint
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def slow_primary(tmp_path, make_server):
    shim = tmp_path / "slowsync.so"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(shim),
                    os.path.join(HERE, "..", "harness", "slowsync.c"), "-ldl"], check=True)
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img", "--size", str(SIZE))
    srv = make_server(tmp_path / "p", tmp_path / "p.sock")
    srv.env = {"LD_PRELOAD": str(shim), "PREPL_SLOW_SYNC_MS": str(SLOW_MS)}
    # no durable point of the volume during the test: one would take the
    # closed interval's extents out of the log at the trim (durability.py),
    # and the next write to each would rightly pay a log write (200 ms here)
    srv.extra = ["--sync-interval", "3600"]
    return srv.start()


class Writer(threading.Thread):
    """4 KiB writes to the extents in turn (a random block of each), one
    about every `gap` seconds; records (start, seconds) of each.  fua: FUA
    writes (each one's sync takes SLOW_MS), one after another."""

    def __init__(self, srv, gap, fua=False):
        super().__init__(daemon=True)
        self.h = srv.connect()
        self.gap = gap
        self.flags = nbd.CMD_FLAG_FUA if fua else 0
        self.rnd = random.Random(5)
        self.done = []
        self.halt = threading.Event()
        self.error = None

    def run(self):
        try:
            n = 0
            while not self.halt.is_set():
                off = (n % (SIZE // EXTENT)) * EXTENT + self.rnd.randrange(EXTENT // 4096) * 4096
                n += 1
                t = time.monotonic()
                self.h.pwrite(b"x" * 4096, off, self.flags)
                self.done.append((t, time.monotonic() - t))
                time.sleep(self.gap)
        except Exception as e:      # noqa: BLE001 -- re-raised by stop()
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(30)
        self.h.shutdown()
        if self.error:
            raise self.error


def test_writes_never_wait_for_a_sync_during_a_snappoint(slow_primary):
    srv = slow_primary
    h = srv.connect()
    for e in range(SIZE // EXTENT):          # every extent hot: in the log
        h.pwrite(b"w" * 4096, e * EXTENT)
    h.shutdown()
    before = srv.ctl("status")
    syncs, switches = before["activity_log_syncs"], before["snappoint_pause"]["count"]
    w = Writer(srv, 0.15)
    fua = Writer(srv, 0, fua=True)      # a switch must not wait for a FUA's sync
    w.start()
    fua.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        srv.ctl("snappoint_create", name="s1")
        t1 = time.monotonic()
        time.sleep(0.3)
    finally:
        w.stop()
        fua.stop()
    assert min(s for _, s in fua.done) >= SLOW_MS / 1000 * 0.9     # FUA syncs are slow
    st = srv.ctl("status")
    assert t1 - t0 >= 3 * SLOW_MS / 1000, "the shim did not slow the snappoint's syncs"
    during = [(t, s) for t, s in w.done if t + s >= t0 and t <= t1]
    assert len(during) >= 10, f"only {len(during)} writes during the snappoint"
    slowest = max(s for _, s in during)
    assert slowest < LIMIT, (f"a write took {slowest * 1000:.1f} ms during a snappoint of "
                             f"{t1 - t0:.2f} s; writes: {sorted(s for _, s in during)[-5:]}")
    assert st["activity_log_syncs"] == syncs + 1       # the trim's, none for a write
    pause = st["snappoint_pause"]
    assert pause["count"] == switches + 1 and pause["max_ms"] < LIMIT * 1000
    assert sum(c for _, c in pause["histogram"]) == pause["count"]
    print(json.dumps({"snappoint_seconds": round(t1 - t0, 3), "writes": len(during),
                      "slowest_ms": round(slowest * 1000, 3), "pause": pause}))
