"""A block device as the volume (a loop device over a file): writes, zeroes,
trims and a snapshot behave as on a file."""
import random
import subprocess

import nbd
import pytest

from tests.conftest import prepl

MiB = 1 << 20


@pytest.fixture
def loopdev(tmp_path):
    img = tmp_path / "backing.img"
    img.write_bytes(random.Random(4).randbytes(32 * MiB))
    dev = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_block_device_volume(tmp_path, loopdev, make_server):
    with open(loopdev, "rb") as f:
        original = f.read()
    prepl("init", tmp_path / "st", "--volume", loopdev)
    srv = make_server(tmp_path / "st").start()
    try:
        srv.ctl("snappoint_create", name="s")
        h = srv.connect()
        assert h.get_size() == 32 * MiB
        h.pwrite(b"w" * 100000, 12345)
        h.zero(MiB, 4 * MiB)
        h.zero(65536, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        h.trim(65536, 9 * MiB)
        h.flush()
        model = bytearray(original)
        model[12345:112345] = b"w" * 100000
        model[4 * MiB:5 * MiB] = bytes(MiB)
        model[8 * MiB:8 * MiB + 65536] = bytes(65536)
        model[9 * MiB:9 * MiB + 65536] = bytes(65536)
        assert h.pread(32 * MiB, 0) == bytes(model)
        assert srv.connect("snap/s").pread(32 * MiB, 0) == original
        h.shutdown()
    finally:
        srv.stop()
    with open(loopdev, "rb") as f:
        assert f.read() == bytes(model)
