"""workers.VolumeWriteback: active only within ACTIVE seconds of the last
snappoint; its own descriptor, closed once."""
import os

import pytest

from replication.workers import VolumeWriteback


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_active_only_after_a_recent_snappoint(tmp_path):
    p = tmp_path / "v"
    p.write_bytes(bytes(4096))
    fd = os.open(p, os.O_RDWR)
    clock = Clock()
    wb = VolumeWriteback(fd, clock=clock)
    try:
        assert wb.fd != fd
        assert not wb.active
        wb.snappoint_taken()
        clock.t += wb.ACTIVE - 0.01
        assert wb.active
        clock.t += 0.02
        assert not wb.active
        wb.snappoint_taken()
        assert wb.status() == {"period_s": wb.PERIOD, "active": True, "kicks": 0}
    finally:
        dup = wb.fd
        wb.close()
        wb.close()                      # twice: nothing more to close
    os.fstat(fd)                        # the volume's own descriptor stays open
    with pytest.raises(OSError):
        os.fstat(dup)                   # the duplicate is closed
    os.close(fd)
