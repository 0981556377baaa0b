"""A staging that is not in place keeps its data in a log (staging.py,
staginglog.py): whatever the order and overlap of the staged writes and
zeroes, what it serves, digests and applies is exactly what a model of the
replica holds; a checkpoint reopened after a crash holds the data of the
checkpoint's moment; a complete staging is applied again from its durable
index; a damaged index is refused or dropped, never guessed at."""
import errno
import os
import random

import numpy as np
import pytest

from replication import manifest, native, staging
from replication.staginglog import DamagedStagingError

BLOCK = 4096
NBLOCKS = 300
SIZE = NBLOCKS * BLOCK - 1000          # a short last block


class Dir:
    def __init__(self, path):
        self.path = str(path)

    def p(self, *parts):
        return os.path.join(self.path, *parts)


class Model:
    """The replica as the staging should make it: data and zero blocks."""

    def __init__(self, old):
        self.img, self.data, self.zero = bytearray(old), set(), set()

    def write(self, off, buf):
        self.img[off:off + len(buf)] = buf
        blocks = set(range(off // BLOCK, -(-(off + len(buf)) // BLOCK)))
        self.data |= blocks
        self.zero -= blocks

    def zeroes(self, off, n):
        self.img[off:off + n] = bytes(n)
        blocks = set(range(off // BLOCK, -(-(off + n) // BLOCK)))
        self.zero |= blocks
        self.data -= blocks

    def copy(self):
        m = Model(self.img)
        m.data, m.zero = set(self.data), set(self.zero)
        return m


def ranged(rnd):
    b0 = rnd.randrange(NBLOCKS)
    nb = rnd.randint(1, min(12, NBLOCKS - b0))
    off = b0 * BLOCK
    return off, min(nb * BLOCK, SIZE - off)


def staged_ops(area, model, rnd, n):
    """n random requests: single writes, batches (rewrites among them) and zeroes."""
    for _ in range(n):
        kind = rnd.random()
        if kind < 0.4:
            off, length = ranged(rnd)
            buf = rnd.randbytes(length)
            area.write(buf, off)
            model.write(off, buf)
        elif kind < 0.8:
            entries, data = [], b""
            for _ in range(rnd.randint(1, 6)):
                off, length = ranged(rnd)
                if any(o < off + length and off < o + n for o, n, _ in entries):
                    continue                  # a batch's entries do not overlap
                buf = rnd.randbytes(length)
                entries.append((off, length, False))
                data += buf
            area.batch(entries, data)
            pos = 0
            for off, length, _ in entries:
                model.write(off, data[pos:pos + length])
                pos += length
        else:
            off, length = ranged(rnd)
            area.zero(length, off)
            model.zeroes(off, length)


def check(area, model, replica_fd, old):
    st = area.current
    assert st.log is not None
    data = {b for b in range(NBLOCKS) if native.bm_test(st.data.bits, NBLOCKS, b)}
    zero = {b for b in range(NBLOCKS) if native.bm_test(st.zero.bits, NBLOCKS, b)}
    assert (data, zero) == (model.data, model.zero)
    for b in sorted(data):
        n = min(BLOCK, SIZE - b * BLOCK)
        assert area.read_data(st, b * BLOCK, n) == bytes(model.img[b * BLOCK:b * BLOCK + n]), b
    # the digest: from the hashes taken on arrival, or by reading back
    want = manifest.digest_of(area.runs(), lambda o, n: bytes(model.img[o:o + n]))
    want = (want.hexdigest(), want.data_bytes, want.zero_bytes)
    got = area.digest()
    assert (got.hexdigest(), got.data_bytes, got.zero_bytes) == want
    area.hashes = {}
    got = area.digest()
    assert (got.hexdigest(), got.data_bytes, got.zero_bytes) == want
    # the apply: the staged data and zeroes over the old image
    os.pwrite(replica_fd, old, 0)
    runs = area.runs()
    area.copy_data(st, replica_fd, [(o, n) for o, n, z in runs if not z])
    native.copy_ranges(-1, replica_fd, [(o, n) for o, n, z in runs if z], zero=True)
    assert os.pread(replica_fd, SIZE, 0) == bytes(model.img)


@pytest.fixture
def area(tmp_path):
    os.makedirs(tmp_path / "staging")
    old = random.Random(1).randbytes(SIZE)
    replica = tmp_path / "replica.img"
    replica.write_bytes(old)
    fd = os.open(replica, os.O_RDWR)
    areas = []

    def make():
        a = staging.StagingArea(Dir(tmp_path), SIZE, BLOCK, fd)
        areas.append(a)
        return a
    yield make, fd, old
    for a in areas:
        if a.current is not None:
            a.close()
    os.close(fd)


@pytest.mark.parametrize("seed", range(6))
def test_log_serves_digests_and_applies_what_the_model_holds(area, seed):
    make, fd, old = area
    rnd = random.Random(seed)
    a = make()
    a.open(in_place=False)
    model = Model(old)
    staged_ops(a, model, rnd, 60)
    check(a, model, fd, old)
    # written in arrival order: the log is no larger than what was staged
    assert a.current.log.tail <= sum(-(-int(n) // BLOCK) * BLOCK
                                     for n in a.current.log.entries()[:, 1])


@pytest.mark.parametrize("seed", range(4))
def test_a_checkpoint_reopened_holds_the_data_of_its_moment(area, seed):
    make, fd, old = area
    rnd = random.Random(100 + seed)
    a = make()
    a.open(in_place=False)
    model = Model(old)
    staged_ops(a, model, rnd, 40)
    at_checkpoint = model.copy()
    a.checkpoint()
    staged_ops(a, model, rnd, 40)        # rewrites of held blocks among them
    a.close()                            # a crash: nothing more is written
    b = make()
    st = b.open(in_place=False)
    # held: what the checkpoint held and the maps still say, with the
    # checkpoint's data (a later rewrite's data may never have reached the disk)
    held = Model(old)
    held.data = at_checkpoint.data & model.data
    held.zero = at_checkpoint.zero & model.zero
    for blk in held.data:
        held.img[blk * BLOCK:(blk + 1) * BLOCK] = at_checkpoint.img[blk * BLOCK:(blk + 1) * BLOCK]
    for blk in held.zero:
        n = len(held.img[blk * BLOCK:(blk + 1) * BLOCK])
        held.img[blk * BLOCK:blk * BLOCK + n] = bytes(n)
    assert b.held_blocks() == len(held.data | held.zero) > 0
    assert held.data != model.data or held.img != model.img   # the test has teeth
    check(b, held, fd, old)
    # and it goes on receiving: later writes land after the held ones
    assert st.log.tail >= os.fstat(st.fd).st_size > 0
    staged_ops(b, held, rnd, 20)
    check(b, held, fd, old)


def test_a_complete_staging_is_applied_again_from_its_index(area):
    make, fd, old = area
    a = make()
    a.open(in_place=False)
    model = Model(old)
    staged_ops(a, model, random.Random(9), 60)
    a.make_durable("t")
    a.complete()
    a.close()
    b = make()
    b.open(in_place=False, complete=True)
    check(b, model, fd, old)


def test_a_damaged_index_is_refused_or_dropped(area, tmp_path):
    make, fd, old = area
    a = make()
    a.open(in_place=False)
    staged_ops(a, Model(old), random.Random(3), 30)
    a.checkpoint()
    a.make_durable("t")
    a.close()
    idx = tmp_path / "staging" / staging.DATA_IDX
    good = idx.read_bytes()
    idx.write_bytes(good[:-5])
    with pytest.raises(DamagedStagingError, match="not a whole number"):
        make().open(in_place=False, complete=True)
    e = np.frombuffer(good, dtype="<u8").reshape(-1, 3).copy()
    e[0, 2] = 1 << 40                       # past the log's end
    idx.write_bytes(e.tobytes())
    with pytest.raises(DamagedStagingError, match="outside"):
        make().open(in_place=False, complete=True)
    # a receiving staging whose held index is damaged starts afresh
    (tmp_path / "staging" / staging.HELD_IDX).write_bytes(b"\0" * 7)
    b = make()
    st = b.open(in_place=False)
    assert b.held_blocks() == 0
    assert not st.data.bits.any() and not st.zero.bits.any()


def test_a_failed_write_leaves_nothing_named(area, monkeypatch):
    make, fd, old = area
    a = make()
    a.open(in_place=False)
    model = Model(old)
    staged_ops(a, model, random.Random(5), 20)
    real = native.stage_batch

    def fail(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(native, "stage_batch", fail)
    with pytest.raises(OSError):
        a.batch([(0, BLOCK, False)], b"x" * BLOCK)
    monkeypatch.setattr(native, "stage_batch", real)
    staged_ops(a, model, random.Random(6), 20)
    check(a, model, fd, old)


def test_a_staging_an_earlier_version_left_is_still_applied(area, tmp_path):
    """Before the log, staged data sat at the replica's offsets in data.img:
    a complete staging of that kind (a crash before its merge, then an
    upgrade) is applied from it, and a new staging replaces it with a log."""
    make, fd, old = area
    rnd = random.Random(11)
    model = Model(old)
    d = tmp_path / "staging"
    img = os.open(d / staging.LEGACY, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(img, SIZE)
    maps = [staging.MapFile(str(d / n), NBLOCKS, create=True) for n in ("data.bmap", "zero.bmap")]
    for _ in range(30):
        off, length = ranged(rnd)
        if rnd.random() < 0.8:
            buf = rnd.randbytes(length)
            os.pwrite(img, buf, off)
            model.write(off, buf)
        else:
            model.zeroes(off, length)
    os.close(img)
    for m, blocks in zip(maps, (model.data, model.zero)):
        for b in blocks:
            native.bm_set(m.bits, NBLOCKS, b, 1)
        m.sync()
    a = make()
    st = a.open(in_place=False, complete=True)
    assert st.log is None
    runs = a.runs()
    a.copy_data(st, fd, [(o, n) for o, n, z in runs if not z])
    native.copy_ranges(-1, fd, [(o, n) for o, n, z in runs if z], zero=True)
    assert os.pread(fd, SIZE, 0) == bytes(model.img)
    a.discard()
    b = make()
    assert b.open(in_place=False).log is not None
    b.reaper.start()
    b.reaper.wait()
    b.reaper.close()
    assert sorted(os.listdir(d)) == ["data.bmap", "data.log", "zero.bmap"]
