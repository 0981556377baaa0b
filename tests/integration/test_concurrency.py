"""Several libnbd clients write in parallel while snappoints are taken:
every snapshot equals the volume at one instant (each write entirely
before or entirely after it), checked against the writers' own logs."""
import random
import struct
import threading
import time

import numpy as np

import pytest

from tests.conftest import prepl

MiB = 1 << 20
AREA = 6 * MiB
WRITERS = 4


def stamp(w, seq, n):
    return (struct.pack("<II", w + 1, seq) * (n // 8 + 1))[:n]


def writer(srv, w, stop, log, seed):
    rnd = random.Random(seed)
    h = srv.connect()
    seq = 0
    base = w * AREA
    while not stop.is_set():
        seq += 1
        n = rnd.choice([8, 4096, 65536, 65536 + 4096, 200 * 1024, 1 * MiB]) // 8 * 8
        off = rnd.randrange(0, AREA - n) // 8 * 8
        t0 = time.monotonic()
        h.pwrite(stamp(w, seq, n), base + off)
        log.append((seq, off, n, t0, time.monotonic()))
    h.shutdown()


def prefix_of(area, w, log):
    """The number k of this writer's writes the area holds, after checking
    that it holds exactly writes 1..k (no torn, no missing write)."""
    words = np.frombuffer(area, dtype="<u4").reshape(-1, 2)
    mine = words[words[:, 0] == w + 1]
    k = int(mine[:, 1].max()) if len(mine) else 0
    expect = bytearray(AREA)
    for seq, off, n, _, _ in log[:k]:
        expect[off:off + n] = stamp(w, seq, n)
    assert bytes(area) == bytes(expect), f"writer {w}: not exactly its first {k} writes"
    return k


@pytest.mark.slow
def test_snapshots_are_instants(tmp_path, make_server):
    st = tmp_path / "st"
    prepl("init", st, "--volume", tmp_path / "v.img", "--size", str(WRITERS * AREA))
    srv = make_server(st).start()
    stop = threading.Event()
    logs = [[] for _ in range(WRITERS)]
    threads = [threading.Thread(target=writer, args=(srv, w, stop, logs[w], w))
               for w in range(WRITERS)]
    for t in threads:
        t.start()
    points = []
    seen = []              # (offset, bytes) read from snap/p0 while writers ran

    def reader():
        h = srv.connect("snap/p0")
        r = random.Random(9)
        while not stop.is_set():
            n = r.choice([512, 4096, 65536, 300000])
            off = r.randrange(WRITERS * AREA - n)
            seen.append((off, h.pread(n, off)))
        h.shutdown()
    readers = []
    try:
        rnd = random.Random(1)
        for i in range(8):
            time.sleep(rnd.uniform(0.05, 0.3))
            t0 = time.monotonic()
            srv.ctl("snappoint_create", name=f"p{i}")
            points.append((f"p{i}", t0, time.monotonic()))
            if i == 0:     # read the first snapshot while copy-on-write runs
                readers = [threading.Thread(target=reader)]
                readers[0].start()
    finally:
        stop.set()
        for t in threads + readers:
            t.join()
    assert all(len(log) > 20 for log in logs)
    assert len(seen) > 20
    for name, before, after in points:
        h = srv.connect(f"snap/{name}")
        image = h.pread(WRITERS * AREA, 0)
        h.shutdown()
        if name == "p0":
            for off, data in seen:
                assert image[off:off + len(data)] == data, \
                    "a read of the snapshot during copy-on-write saw another image"
        latest_start, earliest_end = before, after
        for w in range(WRITERS):
            k = prefix_of(image[w * AREA:(w + 1) * AREA], w, logs[w])
            if k:
                latest_start = max(latest_start, logs[w][k - 1][3])
            if k < len(logs[w]):
                earliest_end = min(earliest_end, logs[w][k][4])
        assert latest_start < earliest_end, \
            f"snapshot {name} mixes writes that cannot coexist at one instant"
    assert srv.ctl("status")["max_concurrent_writers_in_c"] >= 2
