"""A primary's durability horizon (replication/durability.py): a snappoint
makes its maps durable, not the volume's data; the server makes the volume
durable every `serve --sync-interval` seconds, and until then the activity
log keeps the closed intervals' extents.

* On a real server: a snappoint leaves the volume's dirty pages dirty (the
  page cache's Dirty count in /proc/meminfo stays up), the closed
  interval's extents wait (status volume_durability.pending_extents); the
  next durable point takes them (syncs, pending 0, Dirty falls) and the
  data reads back as written.
* Power loss (tests/harness/powerdisk.py under the primary's node): two
  cycles are applied to the secondary from writes never flushed, in two
  halves of the volume (so two intervals, each in extents of its own), and
  then the power is cut.  The primary comes back having lost some or all
  of them, the secondary holds them: judged by full-image digests and
  block-by-block comparison, every block where the primary's disk and the
  replica differ is marked in the primary's open interval (I2), and the
  next cycle makes the replica equal to the primary (I1 again).  With the
  power cut in "flushed" mode, the primary must really have lost writes the
  replica holds: the case this rule allows, exercised.
* Power loss of an old primary right after its failback (its applied
  writes never flushed): the failback made its volume durable before its
  record, so the failback cycle leaves both nodes equal.
"""
import hashlib
import os
import random

import pytest

from tests.conftest import prepl, read_export, runs_to_set, wait_for
from tests.harness.powerdisk import PowerLossDisk

pytestmark = pytest.mark.slow

MiB = 1 << 20
BLOCK = 4096


def dirty_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Dirty: line in /proc/meminfo")


def test_the_volume_is_made_durable_after_the_snappoint_not_by_it(tmp_path, make_server):
    size, written = 256 * MiB, 96 * MiB
    state = tmp_path / "p"
    prepl("init", state, "--volume", tmp_path / "v.img", "--size", str(size))
    srv = make_server(state)
    srv.extra = ["--sync-interval", "4"]
    srv.start()
    model = bytearray(size)
    h = srv.connect()
    try:
        for i in range(written // MiB):
            data = hashlib.shake_256(f"d{i}".encode()).digest(MiB)
            model[i * MiB:(i + 1) * MiB] = data
            h.pwrite(data, i * MiB)
        d = srv.ctl("status")["volume_durability"]
        assert d == {"interval_s": 4.0, "syncs": 0, "pending_extents": 0}, d
        srv.ctl("snappoint_create", name="a", dataless=True)
        # the snappoint returned without writing the volume back
        d = srv.ctl("status")["volume_durability"]
        assert dirty_bytes() >= written * 3 // 4, dirty_bytes()
        assert d["syncs"] == 0 and d["pending_extents"] == written // (4 * MiB), d
        before = dirty_bytes()
        wait_for(lambda: srv.ctl("status")["volume_durability"]["syncs"] >= 1, 15,
                 "the durable point after the snappoint")
        d = srv.ctl("status")["volume_durability"]
        assert d["pending_extents"] == 0, d
        assert before - dirty_bytes() >= written * 3 // 4, (before, dirty_bytes())
        assert read_export(srv, size) == model
    finally:
        h.shutdown()
        srv.stop()


SIZE = 64 * MiB              # 16 activity-log extents of 4 MiB
HALF = SIZE // 2


def image(srv, size=SIZE):
    return read_export(srv, size)


def cycle(src, dst):
    """One `prepl agent --once` from src's state to dst."""
    prepl("agent", src.state, "--secondary", f"nbd+unix:///?socket={dst.sock}", "--once",
          "--timeout", "60")


def scatter(srv, rnd, lo, hi, n):
    """n random 4 KiB..64 KiB writes in [lo, hi), never flushed."""
    h = srv.connect()
    for _ in range(n):
        length = rnd.choice([BLOCK, 4 * BLOCK, 16 * BLOCK])
        off = lo + rnd.randrange((hi - lo - length) // BLOCK) * BLOCK
        h.pwrite(rnd.randbytes(length), off)
    h.shutdown()


def pair_on(disk, tmp_path, make_server, size, rnd):
    """A primary whose state and volume are on the power-loss disk, with no
    durable point of its own in a test's time, and a secondary beside it;
    the volume filled with random data, flushed (durable) and replicated
    once."""
    pstate = os.path.join(disk.mountpoint, "p")
    prepl("init", pstate, "--volume", pstate + ".img", "--size", str(size))
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(size),
          "--role", "secondary")
    os.sync()
    prim = make_server(pstate, tmp_path / "p.sock")
    prim.extra = ["--sync-interval", "3600"]
    prim.start()
    sec = make_server(tmp_path / "s", tmp_path / "s.sock").start()
    h = prim.connect()
    for off in range(0, size, 8 * MiB):    # Debian 13's libnbd refuses requests over 32 MiB
        h.pwrite(rnd.randbytes(min(8 * MiB, size - off)), off)
    h.flush()
    h.shutdown()
    cycle(prim, sec)
    return prim, sec


@pytest.mark.parametrize("mode,seed", [("flushed", 1), ("random", 2), ("random", 3)])
def test_power_loss_after_cycles_the_next_cycle_resends_what_the_primary_lost(
        tmp_path, make_server, mode, seed):
    rnd = random.Random(seed)
    disk = PowerLossDisk(tmp_path / "disk", 256 * MiB)
    disk.start()
    try:
        prim, sec = pair_on(disk, tmp_path, make_server, SIZE, rnd)    # P0: durable
        p0 = image(prim)
        assert image(sec) == p0

        scatter(prim, rnd, 0, HALF, 60)                 # interval 1: first half only
        cycle(prim, sec)
        scatter(prim, rnd, HALF, SIZE, 60)              # interval 2: second half only
        cycle(prim, sec)
        p2 = image(prim)
        assert image(sec) == p2 != p0
        assert prim.ctl("status")["volume_durability"]["syncs"] == 0

        disk.crash(mode, rnd.randrange(1 << 30))
        prim.kill()
        disk.start()                                    # journal replay
        prim.start()
        assert prim.ctl("status")["recovered"] is not None
        after = image(prim)
        replica = image(sec)
        assert replica == p2                            # the secondary lost nothing
        differ = {b for b in range(SIZE // BLOCK)
                  if after[b * BLOCK:(b + 1) * BLOCK] != replica[b * BLOCK:(b + 1) * BLOCK]}
        if mode == "flushed":
            # nothing made the two intervals durable: the primary lost writes
            # the replica holds, in both halves
            assert differ and min(differ) < HALF // BLOCK <= max(differ), sorted(differ)[:10]
        # I2: every block where the primary and the replica differ is marked
        bmap = runs_to_set(prim.ctl("maps")["intervals"][-1]["bmap"])
        unmarked = sorted(differ - bmap)
        assert not unmarked, f"blocks the replica holds otherwise, unmarked: {unmarked[:10]}"

        cycle(prim, sec)                                # I1 again: the replica is the primary
        assert image(sec) == image(prim) == after
        prim.stop()
        sec.stop()
    finally:
        disk.stop()


def test_power_loss_after_a_failback_keeps_the_image_it_recorded(tmp_path, make_server):
    """A failback records that the old primary holds the divergence point's
    image (plus the blocks the resync will overwrite), so its volume must be
    durable before that record, though no snappoint made it so: the old
    primary's writes applied to the secondary but never flushed survive a
    power cut right after the failback, and the failback cycle leaves both
    nodes equal."""
    rnd = random.Random(7)
    size = 8 * MiB
    disk = PowerLossDisk(tmp_path / "disk", 96 * MiB)
    disk.start()
    try:
        a, b = pair_on(disk, tmp_path, make_server, size, rnd)
        scatter(a, rnd, 0, size, 40)                    # applied, never flushed
        cycle(a, b)
        p = image(a, size)
        assert image(b, size) == p
        prepl("failover", b.state)
        scatter(b, rnd, 0, size, 10)
        q = image(b, size)
        prepl("failback", a.state, "--peer", f"nbd+unix:///?socket={b.sock}")
        disk.crash("flushed", 1)
        a.kill()
        disk.start()
        a.start()
        cycle(b, a)                                     # the failback cycle
        assert image(a, size) == image(b, size) == q, \
            "the old primary lost writes its failback recorded"
        a.stop()
        b.stop()
    finally:
        disk.stop()
