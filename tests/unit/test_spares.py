"""Spare map files (replication/spares.py): made ahead, durable, taken by
snappoints and merges, and never left behind or lost across stops.

The real Tracker runs in-process; the volume is 8 MiB with 64 KiB
activity-log extents, so recovery's log marks only the extents written."""
import os
import threading
import time

import pytest

from replication import native, snappoints, state
from replication.errors import MetadataWriteError
from replication.spares import is_spare
from replication.tracker import Tracker
from tests.harness.servers import wait_for

BLOCK, REGION, SIZE = 4096, 65536, 8 << 20


def make(tmp_path):
    vol = tmp_path / "vol.img"
    vol.write_bytes(bytes(SIZE))
    state.init(tmp_path / "state", vol, region_size=REGION, block_size=BLOCK,
               al_extent=REGION)
    t = Tracker(tmp_path / "state")
    t.start()
    return t


@pytest.fixture
def tracker(tmp_path):
    t = make(tmp_path)
    yield t
    t.close()
    t._lockfile.close()


def wait_ready(t, n):
    """Until n sets of spare maps are ready."""
    wait_for(lambda: t.spares.status()["ready"] >= n, 10, f"{n} sets of spare maps")


def files(t):
    return sorted(os.listdir(t.sd.p("maps")))


def named(t):
    return sorted(f for iv in t.body.intervals for f in iv.maps.values())


def spare_files(t):
    return [f for f in files(t) if is_spare(f) and f not in named(t)]


def test_spares_are_zero_allocated_and_removed_at_a_clean_stop(tmp_path):
    t = make(tmp_path)
    wait_ready(t, t.spares.keep)
    spares = spare_files(t)
    assert len(spares) == 3 * t.spares.keep, spares
    for f in spares:
        with open(t.sd.p("maps", f), "rb") as fh:
            data = fh.read()
        kind = f.rsplit(".", 1)[1]
        nbits = SIZE // REGION if kind == "cmap" else SIZE // BLOCK
        assert data == bytes(native.words_for(nbits) * 8), f
        assert os.stat(t.sd.p("maps", f)).st_blocks > 0, f"{f} is not allocated"
    t.snappoints.create("a", dataless=True)
    assert all(is_spare(f) for f in t.body.open_interval.maps.values())
    wait_ready(t, t.spares.keep)
    t.close()
    t._lockfile.close()
    # only the files the metadata names are left; they serve again
    assert files(t) == named(t)
    t2 = Tracker(tmp_path / "state")
    t2.start()
    try:
        assert [sp.name for sp in t2.body.snappoints] == ["a"]
        assert t2.interval_closed_by("a").maps == t.interval_closed_by("a").maps
        assert set(named(t2)) <= set(files(t2)), files(t2)
    finally:
        t2.close()
        t2._lockfile.close()


def test_an_unrecorded_switch_into_spares_loses_no_change(tmp_path, monkeypatch):
    """A crash between the switch and its record, with the new interval's
    maps taken from the spares: the restart's recovery ORs them into the
    open interval (as it does with new files of a switch never recorded)
    and removes every spare nobody names."""
    t = make(tmp_path)
    wait_ready(t, t.spares.keep)
    t.vol.pwrite(b"a" * BLOCK, 0)
    # the process dies at the record: nothing undone, nothing removed
    monkeypatch.setattr(t.vol, "unswitch", lambda *a: None)
    monkeypatch.setattr(snappoints, "remove_files", lambda paths: None)

    def dies(new):
        raise MetadataWriteError(t.sd.p("meta.json"), OSError(5, "the process dies here"))
    monkeypatch.setattr(t.md, "commit", dies)
    with pytest.raises(MetadataWriteError):
        t.snappoints.create("x", dataless=True)
    block = 5 * REGION // BLOCK + 3                  # after the switch: in the spare maps
    t.vol.pwrite(b"b" * BLOCK, block * BLOCK)
    monkeypatch.undo()
    t._lockfile.close()                              # no close(): an unclean stop
    # the activity log emptied, so that only the merge of the spare maps
    # can bring the second write's bit back
    with open(t.sd.p("al"), "r+b") as f:
        f.seek(4096)
        f.write(bytes(os.path.getsize(t.sd.p("al")) - 4096))
    t2 = Tracker(tmp_path / "state")
    t2.start()
    try:
        assert t2.recovered["al_extents"] == 0
        assert t2.recovered["orphan_maps_merged"] >= 2
        bmap = t2.maps.bmap
        starts, lengths = native.bm_runs(bmap.bits, bmap.nbits)
        assert (starts.tolist(), lengths.tolist()) == ([0, block], [1, 1])
    finally:
        t2.close()
        t2._lockfile.close()
    assert files(t2) == named(t2)


def test_a_full_filesystem_leaves_no_partial_spare_and_snappoints_go_on(tmp_path, monkeypatch,
                                                                         caplog):
    """ENOSPC while making spares: no file of the failed set is left, the
    failure is logged once, and snappoints create their own files."""
    real = os.posix_fallocate
    full = [True]

    def fallocate(fd, off, length):
        if full[0] and threading.current_thread().name == "spare-maps":
            raise OSError(28, "No space left on device")
        return real(fd, off, length)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    t = make(tmp_path)
    try:
        for name in ("a", "b", "c"):
            t.snappoints.create(name, dataless=True)
            time.sleep(0.05)
        assert t.spares.status() == {"ready": 0, "made": 0, "missed": 3}
        assert spare_files(t) == []
        assert all(not is_spare(f) for f in named(t))
        said = [r for r in caplog.records if "spare map files" in r.getMessage()]
        assert len(said) == 1 and "No space left" in said[0].getMessage(), said
        full[0] = False                        # space again: the pool refills
        t.snappoints.create("d", dataless=True)
        wait_ready(t, t.spares.keep)
        t.snappoints.create("e", dataless=True)
        assert all(is_spare(f) for f in t.body.open_interval.maps.values())
    finally:
        t.close()
        t._lockfile.close()
