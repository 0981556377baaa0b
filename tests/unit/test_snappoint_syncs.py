"""A snappoint's new map files share one journal commit.

On ext4 every fsync of a file whose allocation is not committed yet is a
journal commit, and the writers of the volume wait for each one they meet
(their timestamp updates join the running transaction).  So creating a
snappoint, and deleting one whose next interval is closed (a merge into new
files), allocate every new file first and only then sync them: the first
sync commits them all and the others find nothing left to commit.  These
tests trace the allocations and syncs of the real Tracker in-process.

With spare maps ready (replication/spares.py) neither operation allocates
an interval's map file: the spares are durable already.  Without them
(the pool closed here, as a full filesystem leaves it) the files are
created as above."""
import os
import threading

import pytest

from replication import native, state
from replication.tracker import Tracker
from tests.unit.test_spares import wait_ready

BLOCK, REGION, SIZE = 4096, 65536, 4 << 20


@pytest.fixture
def traced(tmp_path, monkeypatch):
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(SIZE))
    state.init(tmp_path / "state", vol, region_size=REGION, block_size=BLOCK)
    t = Tracker(tmp_path / "state")
    t.start()
    trace = []

    def wrap(obj, name, kind):
        real = getattr(obj, name)

        def traced_call(*args):
            if threading.current_thread() is threading.main_thread():
                trace.append(kind)
            return real(*args)
        monkeypatch.setattr(obj, name, traced_call)
    wrap(os, "posix_fallocate", "allocate")
    wrap(os, "fsync", "sync")
    wrap(native, "sync_mapping", "sync")
    try:
        yield t, trace
    finally:
        monkeypatch.undo()
        t.close()
        t._lockfile.close()


def check_allocations_first(trace, allocations):
    assert trace.count("allocate") == allocations, trace
    first_sync = trace.index("sync")
    assert "allocate" not in trace[first_sync:], f"a sync between the allocations: {trace}"


def test_create_allocates_every_new_file_before_the_first_sync(traced):
    t, trace = traced
    t.spares.close()
    t.snappoints.create("a")
    # the open interval's three maps and the snapshot's valid map
    check_allocations_first(trace, 4)
    trace.clear()
    t.snappoints.create("b", dataless=True)
    check_allocations_first(trace, 3)


def test_delete_merges_into_new_files_allocated_before_the_first_sync(traced):
    t, trace = traced
    t.spares.close()
    t.snappoints.create("a")
    t.snappoints.create("b")
    trace.clear()
    t.snappoints.delete("a")         # its interval merges into b's (closed): new files
    check_allocations_first(trace, 3)
    assert [sp["name"] for sp in t.snappoints.list_all()] == ["b"]



def test_with_spare_maps_nothing_is_allocated_but_the_snapshot(traced):
    t, trace = traced
    wait_ready(t, 2)
    t.snappoints.create("a")
    check_allocations_first(trace, 1)         # the snapshot's valid map only
    opened = set(t.body.open_interval.maps.values())
    assert all(name.startswith("n") for name in opened), opened
    wait_ready(t, 2)
    trace.clear()
    t.snappoints.create("b", dataless=True)
    # no new file: the closed maps' msyncs and the metadata's syncs only
    assert "allocate" not in trace and trace.count("sync") == 3 + 2, trace
    wait_ready(t, 2)
    trace.clear()
    t.snappoints.delete("a")                  # merged into spare maps
    assert "allocate" not in trace, trace
    merged = set(t.interval_closed_by("b").maps.values())
    assert all(name.startswith("n") for name in merged), merged
    assert [sp["name"] for sp in t.snappoints.list_all()] == ["b"]
