"""native.stage_write (the secondary's staged write in one C call) against
the Python pieces it replaces: manifest.piece_hash, os.pwrite, bm_set/bm_clear."""
import errno
import os
import random

import numpy as np
import pytest

from replication import manifest, native

BLOCK = 4096
NBITS = 256                     # a 1 MiB file of 4 KiB blocks


def bits(m):
    return {i for i in range(NBITS) if native.bm_test(m, NBITS, i)}


@pytest.mark.parametrize("seed", range(8))
def test_matches_the_python_model(tmp_path, seed):
    rnd = random.Random(seed)
    path = tmp_path / "staging.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, NBITS * BLOCK)
        data = np.zeros(native.words_for(NBITS), np.uint64)
        zero = np.zeros_like(data)
        native.bm_set(zero, NBITS, 0, NBITS)
        model = bytearray(NBITS * BLOCK)
        mdata, mzero = set(), set(range(NBITS))
        for _ in range(20):
            b0 = rnd.randrange(NBITS)
            nb = rnd.randint(1, min(40, NBITS - b0))
            length = nb * BLOCK - rnd.choice([0, 0, 1, 100])   # a short tail too
            buf = rnd.randbytes(length)
            got = native.stage_write(fd, memoryview(buf), b0 * BLOCK, data, zero, NBITS, BLOCK)
            assert got == manifest.piece_hash(buf)
            model[b0 * BLOCK:b0 * BLOCK + length] = buf
            mdata |= set(range(b0, b0 + nb))
            mzero -= set(range(b0, b0 + nb))
            assert bits(data) == mdata and bits(zero) == mzero
        assert os.pread(fd, NBITS * BLOCK, 0) == bytes(model)
    finally:
        os.close(fd)


def test_bad_input_changes_nothing(tmp_path):
    data = np.zeros(native.words_for(NBITS), np.uint64)
    zero = np.zeros_like(data)
    buf = bytes(2 * BLOCK)
    with pytest.raises(ValueError):           # past the end of the maps
        native.stage_write(0, buf, (NBITS - 1) * BLOCK, data, zero, NBITS, BLOCK)
    with pytest.raises(ValueError):
        native.stage_write(0, buf, -BLOCK, data, zero, NBITS, BLOCK)
    with pytest.raises(ValueError):           # a read-only map
        ro = data.copy()
        ro.flags.writeable = False
        native.stage_write(0, buf, 0, ro, zero, NBITS, BLOCK)
    rfd = os.open(os.devnull, os.O_RDONLY)    # the write fails: errno, maps untouched
    try:
        with pytest.raises(OSError) as e:
            native.stage_write(rfd, buf, 0, data, zero, NBITS, BLOCK)
        assert e.value.errno == errno.EBADF
    finally:
        os.close(rfd)
    assert not bits(data) and not bits(zero)


@pytest.mark.parametrize("seed", range(4))
def test_batch_matches_single_writes(tmp_path, seed):
    """native.stage_batch == one stage_write per entry: bytes, maps, hashes."""
    rnd = random.Random(100 + seed)
    fds, maps = [], []
    for name in ("batch.img", "single.img"):
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, NBITS * BLOCK)
        fds.append(fd)
        z = np.zeros(native.words_for(NBITS), np.uint64)
        native.bm_set(z, NBITS, 0, NBITS)
        maps.append((np.zeros_like(z), z))
    try:
        for _ in range(5):
            starts = sorted(rnd.sample(range(0, NBITS, 8), rnd.randint(0, 6)))
            entries = [(b * BLOCK, rnd.randint(1, 8) * BLOCK - rnd.choice([0, 7])) for b in starts]
            payload = [rnd.randbytes(n) for _, n in entries]
            got = native.stage_batch(fds[0], memoryview(b"".join(payload)),
                                     [o for o, _ in entries], [n for _, n in entries],
                                     *maps[0], NBITS, BLOCK)
            want = [native.stage_write(fds[1], p, o, *maps[1], NBITS, BLOCK)
                    for (o, _), p in zip(entries, payload)]
            assert got == want == [manifest.piece_hash(p) for p in payload]
            assert bits(maps[0][0]) == bits(maps[1][0]) and bits(maps[0][1]) == bits(maps[1][1])
        assert os.pread(fds[0], NBITS * BLOCK, 0) == os.pread(fds[1], NBITS * BLOCK, 0)
    finally:
        for fd in fds:
            os.close(fd)


def test_batch_bad_input_changes_nothing(tmp_path):
    data = np.zeros(native.words_for(NBITS), np.uint64)
    zero = np.zeros_like(data)
    buf = bytes(2 * BLOCK)
    for offs, lens, msg in (([0], [BLOCK], "add up"),                  # lengths != data
                            ([0, BLOCK], [BLOCK], "differ in number"),
                            ([(NBITS - 1) * BLOCK], [2 * BLOCK], "outside a map"),
                            ([1 << 62], [2 * BLOCK], "outside the maps"),
                            ([0], [3 * BLOCK], "add up")):
        with pytest.raises(ValueError, match=msg):
            native.stage_batch(0, buf, offs, lens, data, zero, NBITS, BLOCK)
    rfd = os.open(os.devnull, os.O_RDONLY)    # the first write fails: nothing done
    try:
        with pytest.raises(OSError) as e:
            native.stage_batch(rfd, buf, [0, BLOCK], [BLOCK, BLOCK], data, zero, NBITS, BLOCK)
        assert e.value.errno == errno.EBADF and e.value.done == 0
    finally:
        os.close(rfd)
    assert not bits(data) and not bits(zero)
