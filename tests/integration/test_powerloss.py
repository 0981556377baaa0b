"""Durable change tracking, part (b): power loss.

The state directory and the volume live on ext4, on a loop device, over
nbdfuse, over a disk with a volatile write cache (tests/harness/cachedisk.py):
writes stay in the cache until a flush or FUA.  A stamped write load runs
through prepl while the test forces early writeback (fadvise DONTNEED on the
volume file, and the disk writing random cached blocks early).  Then the
power is cut (the disk keeps flushed data plus, in "random" mode, an
arbitrary subset of the unflushed blocks), the filesystem comes back by
journal replay, prepl restarts, and:

  * every write acknowledged before a completed NBD flush is in the volume
    (each block holds that write or a later one of the same writer);
  * every block whose content differs from the volume at the last snappoint
    is marked in the block map (and its region in the change map) of the
    open interval.
"""
import os
import random
import struct
import threading
import time

import nbd
import pytest

from tests.conftest import prepl, runs_to_set
from tests.harness.powerdisk import PowerLossDisk

pytestmark = pytest.mark.slow


BLOCK = 4096
REGION = 65536
VOLUME = 16 << 20
NBLOCKS = VOLUME // BLOCK
WRITERS = 2
AREA = NBLOCKS // WRITERS


def block_data(write_id, b):
    return struct.pack("<QQ", write_id, b) * (BLOCK // 16)


def decode(data, b):
    """Write id stamped in a block (0 for a never-written zero block)."""
    if data == bytes(BLOCK):
        return 0
    wid, bb = struct.unpack_from("<QQ", data)
    assert bb == b and data == block_data(wid, b), f"block {b} is torn or foreign"
    return wid


class Writer:
    """Sequential stamped writes to its own area; a flush every few writes."""

    def __init__(self, w, srv, ids, seed, crashed):
        self.w, self.srv, self.ids = w, srv, ids
        self.crashed = crashed     # set just before the power is cut
        self.errors = []           # (after the cut?, exception)
        self.rnd = random.Random(seed)
        self.history = {}          # block -> [write ids, in order]
        self.acked = []            # write ids acknowledged, in order
        self.flushed = 0           # count of acked writes covered by a completed flush
        self.pause = threading.Event()
        self.paused = threading.Event()
        self.stop = threading.Event()

    def run(self):
        lo = self.w * AREA
        try:
            h = self.srv.connect()
            while not self.stop.is_set():
                if self.pause.is_set():
                    self.paused.set()
                    time.sleep(0.005)
                    continue
                self.paused.clear()
                n = self.rnd.choice([1, 1, 1, 2, 5, 16])
                b0 = lo + self.rnd.randrange(AREA - n)
                wid = next(self.ids)
                for b in range(b0, b0 + n):
                    self.history.setdefault(b, []).append(wid)
                h.pwrite(b"".join(block_data(wid, b) for b in range(b0, b0 + n)), b0 * BLOCK)
                self.acked.append(wid)
                if len(self.acked) % 7 == 0:
                    covered = len(self.acked)
                    h.flush()
                    self.flushed = covered
        except Exception as e:      # noqa: BLE001 -- judged by the test
            # expected only once the power went out under us
            self.errors.append((self.crashed.is_set(), e))
        finally:
            self.paused.set()


def volume_blocks(srv):
    h = srv.connect()
    data = h.pread(VOLUME, 0)
    h.shutdown()
    return [decode(data[b * BLOCK:(b + 1) * BLOCK], b) for b in range(NBLOCKS)]


@pytest.mark.parametrize("mode,seed", [("random", 1), ("flushed", 2), ("random", 3)])
def test_power_loss(tmp_path, make_server, mode, seed):
    rnd = random.Random(seed)
    disk = PowerLossDisk(tmp_path / "disk", 256 << 20)
    disk.start()
    try:
        st = os.path.join(disk.mountpoint, "st")
        vol = os.path.join(disk.mountpoint, "vol.img")
        prepl("init", st, "--volume", vol, "--size", str(VOLUME))
        os.sync()
        srv = make_server(st, tmp_path / "nbd.sock").start()
        ids = iter(range(1, 1 << 60))
        crashed = threading.Event()
        writers = [Writer(w, srv, ids, rnd.random(), crashed) for w in range(WRITERS)]
        threads = [threading.Thread(target=w.run) for w in writers]
        for t in threads:
            t.start()
        fd = os.open(vol, os.O_RDONLY)
        at_snappoint = None
        try:
            t_end = time.monotonic() + rnd.uniform(1.5, 3.0)
            snap_at = time.monotonic() + rnd.uniform(0.3, 1.0)
            while time.monotonic() < t_end:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # early writeback
                disk.writeback(0.3, rnd.randrange(1 << 30))
                if at_snappoint is None and time.monotonic() > snap_at:
                    for w in writers:           # quiesce, so the snappoint's
                        w.pause.set()           # image is known exactly
                    for w in writers:
                        w.paused.wait(10)
                    srv.ctl("snappoint_create", name="last", dataless=rnd.random() < 0.5)
                    at_snappoint = {b: hist[-1] for w in writers
                                    for b, hist in w.history.items()}
                    for w in writers:
                        w.pause.clear()
                time.sleep(0.05)
            assert at_snappoint is not None
            crashed.set()
            disk.crash(mode, seed)          # power cut while the writers run
        finally:
            os.close(fd)
            srv.kill()
            for w in writers:
                w.stop.set()
            for t in threads:
                t.join(30)
        unexpected = [e for w in writers for after_cut, e in w.errors
                      if not (after_cut and isinstance(e, nbd.Error))]
        assert not unexpected, f"writers failed before the power cut: {unexpected}"
        assert all(len(w.acked) > 20 for w in writers)

        disk.start()                         # journal replay
        srv2 = make_server(st, tmp_path / "nbd2.sock").start()
        status = srv2.ctl("status")
        assert status["recovered"] is not None
        assert [s["snapshot"] for s in status["snappoints"]] in (["none"], ["invalid"])
        blocks = volume_blocks(srv2)
        maps = srv2.ctl("maps")
        assert maps["intervals"][-2]["closed_by"] == "last"
        bmap = runs_to_set(maps["intervals"][-1]["bmap"])
        cmap = runs_to_set(maps["intervals"][-1]["cmap"])

        lost = []
        for w in writers:
            must = set(w.acked[:w.flushed])
            for b, hist in w.history.items():
                have = blocks[b]
                flushed_idx = max((i for i, wid in enumerate(hist) if wid in must), default=-1)
                allowed = set(hist[flushed_idx:]) if flushed_idx >= 0 else set(hist) | {0}
                if have not in allowed:
                    lost.append((b, have, hist, flushed_idx))
        assert not lost, f"flushed writes lost: {lost[:5]}"

        unmarked = [b for b in range(NBLOCKS)
                    if blocks[b] != at_snappoint.get(b, 0) and b not in bmap]
        assert not unmarked, f"changed blocks not in the block map: {unmarked[:10]}"
        assert {b * BLOCK // REGION for b in range(NBLOCKS)
                if blocks[b] != at_snappoint.get(b, 0)} <= cmap
        srv2.stop()
    finally:
        disk.stop()
