"""The maps a snappoint just wrote stay mapped and verified.

A snappoint closes the open interval's maps (made durable, digested) and a
delete whose next interval is closed merges into new map files (made
durable, digested).  The server keeps both mapped, read-only, and counts
them as verified, so the next snappoint and delete neither map them again
nor read and hash their files: that work holds the GIL, which every writer
of the volume waits for.  A file changed afterwards is still caught: its
stat changes, and it is verified again.  These tests run the real Tracker
in-process and trace what it opens and hashes."""
import os
import threading
import time

import numpy as np
import pytest

from replication import chain, maps, state
from replication.tracker import Tracker

BLOCK, REGION, SIZE = 4096, 65536, 4 << 20


@pytest.fixture
def tracker(tmp_path):
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(SIZE))
    state.init(tmp_path / "state", vol, region_size=REGION, block_size=BLOCK)
    t = Tracker(tmp_path / "state")
    t.start()
    try:
        yield t
    finally:
        t.close()
        t._lockfile.close()


@pytest.fixture
def traced(monkeypatch):
    """[(what, path)] of every map file mapped or hashed from now on by the
    test's thread (the snappoint operations; not the spare maps' thread)."""
    trace = []
    real_init, real_digest = maps.MapFile.__init__, maps.file_digest

    def mapped(self, path, *args, **kw):
        if threading.current_thread() is threading.main_thread():
            trace.append(("map", os.path.basename(path)))
        real_init(self, path, *args, **kw)

    def hashed(path, *args, **kw):
        if threading.current_thread() is threading.main_thread():
            trace.append(("hash", os.path.basename(path)))
        return real_digest(path, *args, **kw)
    monkeypatch.setattr(maps.MapFile, "__init__", mapped)
    monkeypatch.setattr(maps, "file_digest", hashed)     # digest_matches calls it
    monkeypatch.setattr(chain, "file_digest", hashed)
    return trace


def write(t, block, count=1):
    """A write of count blocks at block, through the C write path."""
    data = os.urandom(count * BLOCK)
    t.vol.pwrite(data, block * BLOCK)


def closed_files(t, name):
    return sorted(t.interval_closed_by(name).maps.values())


@pytest.mark.parametrize("spares", [True, False], ids=["spare-maps", "new-files"])
def test_a_snappoint_then_a_delete_maps_and_hashes_only_new_files(tracker, traced, spares):
    t = tracker
    if not spares:
        t.spares.close()              # every new map file is created in the operation
    t.snappoints.create("a")
    write(t, 3)
    t.snappoints.create("b", dataless=True)
    write(t, 5)

    def only_new(op, *names):
        """op maps no file of the intervals that names closed (files
        written by earlier operations) and hashes nothing."""
        before = {f for n in names for f in closed_files(t, n)}
        traced.clear()
        op()
        assert {what for what, _ in traced} <= {"map"}, traced
        assert not {p for _, p in traced} & before, traced
    # the agent's cycle: a new snappoint, then the old base deleted (its
    # interval merges into b's, which is closed: new files)
    only_new(lambda: t.snappoints.create("c", dataless=True), "a", "b")
    only_new(lambda: t.snappoints.delete("a"), "b", "c")
    only_new(lambda: t.snappoints.delete("b"), "b", "c")   # merged files into c's
    # the chain still holds exactly what was written: blocks 3 and 5 in c's
    # interval (the union of the three), nothing in the open one
    ivs = {iv["closed_by"]: iv for iv in t.dump_maps()["intervals"]}
    assert ivs["c"]["bmap"] == [[3, 1], [5, 1]] and ivs[None]["bmap"] == [], ivs
    assert t.damaged() == []


def test_kept_maps_are_read_only(tracker):
    t = tracker
    write(t, 1)
    t.snappoints.create("a", dataless=True)
    kept = t.interval_maps(t.interval_closed_by("a"))
    assert kept.bmap.bits[0] == 1 << 1
    with pytest.raises(ValueError):
        kept.bmap.bits[0] = 0
    assert np.array_equal(kept.bmap.bits, np.fromfile(kept.bmap.path, np.uint64))


def test_a_kept_map_changed_on_disk_is_caught(tracker, traced):
    t = tracker
    t.snappoints.create("a", dataless=True)
    write(t, 7)
    t.snappoints.create("b", dataless=True)
    iv = t.interval_closed_by("b")
    path = t.sd.p("maps", iv.maps["bmap"])
    # later than the filesystem's timestamp granularity (a jiffy on ext4)
    time.sleep(0.05)
    with open(path, "r+b") as f:      # block 7's bit lost
        f.write(bytes(8))
    traced.clear()
    damaged = t.damaged()
    assert [(d["interval"], d["file"]) for d in damaged] == [(iv.seq, path)], damaged
    assert ("hash", os.path.basename(path)) in traced
