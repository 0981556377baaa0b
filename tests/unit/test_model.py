"""Model-based test of the tracked volume, in process (no nbdkit): random
writes, zeros and trims of random sizes and alignments, interleaved with
snappoint create/convert/delete; after every step the volume, every
snapshot image and every map equal the independent model (tests/model.py).
The same engine runs through NBD in tests/integration/test_model_nbd.py."""
import random

import pytest

from replication import state
from replication.tracker import Tracker
from tests.model import Model

SIZE = 200 * 1024 + 512          # not a multiple of region or block size
REGION, BLOCK = 16384, 1024


def runs_set(runs):
    return {i for s, n in runs for i in range(s, s + n)}


class InProcess:
    """Drives the real Tracker directly."""

    def __init__(self, tracker):
        self.t = tracker

    def write(self, off, data):
        self.t.vol.pwrite(data, off)

    def zero(self, off, n, trim=False):
        (self.t.vol.trim if trim else self.t.vol.zero)(n, off)

    def create(self, name, dataless):
        self.t.snappoints.create(name, dataless)

    def convert(self, name):
        self.t.snappoints.convert(name)

    def delete(self, name):
        self.t.snappoints.delete(name)

    def maps(self):
        return self.t.dump_maps()

    def volume(self):
        buf = bytearray(self.t.size)
        self.t.vol.pread(buf, 0)
        return bytes(buf)

    def snapshot(self, name):
        buf = bytearray(self.t.size)
        self.t.vol.snap_pread(self.t.snapshot(name).c, buf, 0)
        return bytes(buf)


def check(sut, model):
    assert sut.volume() == bytes(model.vol), "volume differs from the model"
    maps = sut.maps()
    assert [iv["closed_by"] for iv in maps["intervals"]] == \
        [iv.closed_by for iv in model.intervals]
    for got, want in zip(maps["intervals"], model.intervals):
        assert runs_set(got["cmap"]) == want.cmap, f"change map of interval {got['seq']}"
        assert runs_set(got["bmap"]) == want.bmap, f"block map of interval {got['seq']}"
        assert runs_set(got["zmap"]) == want.zmap, f"zero map of interval {got['seq']}"
    assert set(maps["snapshots"]) == set(model.snaps)
    for name, (image, vmap) in model.snaps.items():
        assert runs_set(maps["snapshots"][name]["vmap"]) == vmap, f"valid map of {name}"
        assert sut.snapshot(name) == image, f"snapshot {name} differs from the model"


def random_step(rnd, sut, model, counter):
    op = rnd.random()
    size = model.size
    if op < 0.55:
        off = rnd.randrange(size)
        n = min(rnd.choice([1, 511, 512, 1024, 4096, 16384, 20000, 50000]), size - off)
        data = rnd.randbytes(n)
        sut.write(off, data)
        model.write(off, data)
    elif op < 0.75:
        off = rnd.choice([rnd.randrange(size), rnd.randrange(size // BLOCK) * BLOCK])
        n = min(rnd.choice([1, 1024, 3000, 16384, 40000]), size - off)
        trim = rnd.random() < 0.5
        sut.zero(off, n, trim)
        model.zero(off, n)
    elif op < 0.87 or not model.names:
        name = f"p{counter[0]}"
        counter[0] += 1
        dataless = rnd.random() < 0.3
        sut.create(name, dataless)
        model.create(name, dataless)
    elif op < 0.93:
        name = rnd.choice(model.names)
        sut.convert(name)
        model.convert(name)
    else:
        name = rnd.choice(model.names)
        sut.delete(name)
        model.delete(name)


def new_tracker(tmp_path, data):
    vol = tmp_path / "vol.img"
    vol.write_bytes(data)
    st = tmp_path / "state"
    state.init(st, vol, region_size=REGION, block_size=BLOCK)
    t = Tracker(st)
    t.start()
    return t


@pytest.mark.slow
def test_model_in_process(tmp_path):
    cases = 0
    for seed in range(150):
        d = tmp_path / str(seed)
        d.mkdir()
        rnd = random.Random(seed)
        data = rnd.randbytes(SIZE)
        t = new_tracker(d, data)
        try:
            sut, model = InProcess(t), Model(data, REGION, BLOCK)
            counter = [0]
            for _ in range(rnd.randint(5, 25)):
                random_step(rnd, sut, model, counter)
                check(sut, model)
                cases += 1
        finally:
            t.close()
            t._lockfile.close()
    assert cases > 1000


def test_clean_restart_keeps_everything(tmp_path):
    rnd = random.Random(99)
    data = rnd.randbytes(SIZE)
    t = new_tracker(tmp_path, data)
    model = Model(data, REGION, BLOCK)
    counter = [0]
    for _ in range(30):
        random_step(rnd, InProcess(t), model, counter)
    t.close()
    t._lockfile.close()
    t2 = Tracker(tmp_path / "state")
    t2.start()
    try:
        check(InProcess(t2), model)
    finally:
        t2.close()
        t2._lockfile.close()


def test_unclean_restart_drops_snapshots_keeps_changes(tmp_path):
    rnd = random.Random(5)
    data = rnd.randbytes(SIZE)
    t = new_tracker(tmp_path, data)
    sut, model = InProcess(t), Model(data, REGION, BLOCK)
    sut.create("a", False)
    model.create("a", False)
    for _ in range(10):
        off = rnd.randrange(SIZE - 5000)
        d = rnd.randbytes(5000)
        sut.write(off, d)
        model.write(off, d)
    t._lockfile.close()            # the process "dies": no close()
    t2 = Tracker(tmp_path / "state")
    t2.start()
    try:
        assert t2.recovered["snapshots_dropped"] == ["a"]
        maps = t2.dump_maps()
        assert maps["snapshots"] == {}
        open_iv = maps["intervals"][-1]
        assert runs_set(open_iv["cmap"]) >= model.intervals[-1].cmap
        assert runs_set(open_iv["bmap"]) >= model.intervals[-1].bmap
        assert InProcess(t2).volume() == bytes(model.vol)
    finally:
        t2.close()
        t2._lockfile.close()
