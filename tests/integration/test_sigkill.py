"""Durable change tracking, part (a): the server is killed with SIGKILL at
random moments during a concurrent write load (snappoints being taken
too).  Right after the kill, before anything recovers, the map files and
the activity log on disk must already cover every acknowledged write;
after the restart every acknowledged write's region and blocks are in the
chain's change and block maps, and the volume holds every acknowledged
write."""
import glob
import os
import random
import threading
import time

import nbd
import numpy as np

import pytest

from replication import native
from replication.state import StateDir
from tests.conftest import prepl, runs_to_set

pytestmark = pytest.mark.slow

MiB = 1 << 20
SIZE = 48 * MiB
REGION, BLOCK, EXTENT = 65536, 4096, 4 * MiB
WRITERS = 3
AREA = SIZE // WRITERS


def bits_of(path, nbits):
    return np.fromfile(path, dtype=np.uint64)[: native.words_for(nbits)]


def union_on_disk(state, kind, nbits):
    out = np.zeros(native.words_for(nbits), np.uint64)
    for p in glob.glob(os.path.join(state, "maps", f"*.{kind}")):
        out |= bits_of(p, nbits)
    return out


def covered(bits, nbits, first, last):
    return all(native.bm_test(bits, nbits, i) for i in range(first, last + 1))


def writer(srv, w, stop, acked, inflight, rnd, killed, errors):
    base = w * AREA
    try:
        h = srv.connect()
        while not stop.is_set():
            n = rnd.choice([512, 4096, 20000, 65536, 300000])
            off = base + rnd.randrange(0, AREA - n)
            data = rnd.randbytes(n)
            inflight[w] = (off, n)
            h.pwrite(data, off)
            acked.append((off, data))
            inflight[w] = None
    except Exception as e:      # noqa: BLE001 -- judged by the test
        # expected only once the server is killed (the write in flight then
        # is not acknowledged); anything else fails the test
        errors.append((killed.is_set(), e))


def test_sigkill_during_writes(tmp_path, make_server):
    st = str(tmp_path / "st")
    vol = tmp_path / "v.img"
    prepl("init", st, "--volume", vol, "--size", str(SIZE))
    nregions, nblocks, nextents = SIZE // REGION, SIZE // BLOCK, SIZE // EXTENT
    model = bytearray(SIZE)
    all_acked = []
    rnd = random.Random(2024)
    for rnd_no in range(6):
        srv = make_server(st).start()
        if rnd_no:
            assert srv.ctl("status")["recovered"] is not None, "an unclean stop must be seen"
        stop, acked, inflight = threading.Event(), [], [None] * WRITERS
        killed, errors = threading.Event(), []
        ts = [threading.Thread(target=writer,
                               args=(srv, w, stop, acked, inflight, random.Random(rnd.random()),
                                     killed, errors))
              for w in range(WRITERS)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + rnd.uniform(0.3, 1.2)
        i = 0
        while time.monotonic() < deadline:
            time.sleep(0.1)
            # every snappoint taken while the server runs must succeed
            srv.ctl("snappoint_create", name=f"r{rnd_no}-{i}", dataless=rnd.random() < 0.5)
            i += 1
        killed.set()
        srv.kill()
        stop.set()
        for t in ts:
            t.join()
        unexpected = [e for after_kill, e in errors
                      if not (after_kill and isinstance(e, nbd.Error))]
        assert not unexpected, f"writers failed while the server was up: {unexpected}"
        assert len(acked) > 10
        # before any recovery: the bits on disk (page cache) cover every ack
        cmap = union_on_disk(st, "cmap", nregions)
        bmap = union_on_disk(st, "bmap", nblocks)
        with open(os.path.join(st, "al"), "rb") as f:
            f.seek(4096)
            al = np.frombuffer(f.read(native.words_for(nextents) * 8), dtype=np.uint64)
        # what survives a power loss too: closed (fsynced, digested) maps of
        # the metadata on disk, plus the activity log's extents
        body = StateDir(st).read_meta()
        closed = np.zeros(native.words_for(nregions), np.uint64)
        for iv in body.closed_intervals:
            closed |= bits_of(os.path.join(st, "maps", iv.maps["cmap"]), nregions)
        for off, data in acked:
            end = off + len(data) - 1
            assert covered(cmap, nregions, off // REGION, end // REGION), "change bit lost"
            assert covered(bmap, nblocks, off // BLOCK, end // BLOCK), "block bit lost"
            for r in range(off // REGION, end // REGION + 1):
                assert native.bm_test(closed, nregions, r) or \
                    native.bm_test(al.copy(), nextents, r * REGION // EXTENT), \
                    "a write is neither in a durable closed map nor in the activity log"
        for off, data in acked:
            model[off:off + len(data)] = data
        all_acked += [(off, len(data)) for off, data in acked]
        unknown = [x for x in inflight if x]
        # the volume holds every acknowledged write (bytes of writes that were
        # in flight at the kill may be old or new)
        with open(vol, "rb") as f:
            disk = bytearray(f.read())
        for off, n in unknown:
            disk[off:off + n] = model[off:off + n]
        assert disk == model, "an acknowledged write is missing from the volume"
        for off, n in unknown:           # whatever landed is the truth now
            with open(vol, "rb") as f:
                f.seek(off)
                model[off:off + n] = f.read(n)

    # after recovery the chain's maps cover every acknowledged write
    srv = make_server(st).start()
    maps = srv.ctl("maps")
    cm = set().union(*(runs_to_set(iv["cmap"]) for iv in maps["intervals"]))
    bm = set().union(*(runs_to_set(iv["bmap"]) for iv in maps["intervals"]))
    for off, n in all_acked:
        assert set(range(off // REGION, (off + n - 1) // REGION + 1)) <= cm
        assert set(range(off // BLOCK, (off + n - 1) // BLOCK + 1)) <= bm
    assert srv.connect().pread(4096, 0) == bytes(model[:4096])
    assert StateDir(st).read_meta().clean is False
