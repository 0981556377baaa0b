"""While snappoints are being taken, a primary starts the writeback of its
volume's dirty pages every fraction of a second (workers.VolumeWriteback),
so that a snappoint's fdatasync finds little left to write; a volume
nobody takes snappoints of is left to the kernel.  On a real server: no
kicks before the first snappoint, however many writes; after one, 128 MiB
written through NBD leave the page cache's dirty count (/proc/meminfo)
within seconds (the kernel alone would keep them dirty for 30 s:
dirty_expire_centisecs, far below dirty_background_ratio here); the data
is what was written."""
import hashlib
import os
import time

import pytest

from tests.conftest import prepl, wait_for

MiB = 1 << 20
SIZE = 256 * MiB
WRITTEN = 128 * MiB


def dirty_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Dirty: line in /proc/meminfo")


def write_chunks(h, model, first, n, seed):
    for i in range(n):
        off = (first + i) * MiB
        data = hashlib.shake_256(f"{seed}.{i}".encode()).digest(MiB)
        model[off:off + MiB] = data
        h.pwrite(data, off)


@pytest.mark.slow
def test_volume_written_back_between_snappoints_only(tmp_path, make_server):
    state = tmp_path / "p"
    prepl("init", state, "--volume", tmp_path / "v.img", "--size", str(SIZE))
    srv = make_server(state).start()
    model = bytearray(SIZE)
    h = srv.connect()
    try:
        write_chunks(h, model, 0, 16, "before")
        time.sleep(1.0)                     # five periods: no snappoint, no kick
        wb = srv.ctl("status")["volume_writeback"]
        assert wb["active"] is False and wb["kicks"] == 0, wb

        srv.ctl("snappoint_create", name="one", dataless=True)
        os.sync()
        base = dirty_bytes()
        write_chunks(h, model, 64, WRITTEN // MiB, "after")
        # the kicks write back what the writes dirtied (the kernel alone
        # would leave it dirty for 30 s)
        wait_for(lambda: dirty_bytes() < base + WRITTEN // 4, 10,
                 "the volume's dirty pages written back")
        wb = srv.ctl("status")["volume_writeback"]
        assert wb["active"] is True and wb["kicks"] > 0, wb
        got = b"".join(h.pread(16 * MiB, o) for o in range(0, SIZE, 16 * MiB))
    finally:
        h.shutdown()
    assert hashlib.sha256(got).digest() == hashlib.sha256(model).digest()
    with open(tmp_path / "v.img", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(model).digest()
