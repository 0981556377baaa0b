"""workers.Reaper: nothing is freed within QUIET seconds of a snappoint;
without one, and at close(), a file is freed at once."""
import os
import time

import pytest

from replication.workers import Reaper

QUIET = 3.0          # long against the test's own steps, on a loaded machine too


@pytest.fixture
def reaper(tmp_path):
    r = Reaper(str(tmp_path / "trash"))
    r.QUIET = QUIET
    r.start()
    yield r
    r.close()


def image(tmp_path, name, size=1 << 20):
    p = tmp_path / name
    with open(p, "wb") as f:
        f.write(os.urandom(size))
    return p


def trash(r):
    return {n: os.stat(os.path.join(r.dir, n)).st_size for n in os.listdir(r.dir)}


def test_a_file_discarded_after_a_snappoint_waits_for_quiet(tmp_path, reaper):
    reaper.snappoint_taken()
    t0 = time.monotonic()
    reaper.discard(str(image(tmp_path, "s1.img")))
    time.sleep(0.2)
    assert list(trash(reaper).values()) == [1 << 20]      # untouched yet
    reaper.wait()
    assert trash(reaper) == {}
    assert time.monotonic() - t0 >= QUIET - 0.05


def test_without_a_snappoint_a_file_is_freed_at_once(tmp_path, reaper):
    t0 = time.monotonic()
    reaper.discard(str(image(tmp_path, "s1.img")))
    reaper.wait()
    assert trash(reaper) == {}
    assert time.monotonic() - t0 < QUIET / 2


def test_close_frees_what_is_queued_without_waiting(tmp_path, reaper):
    reaper.snappoint_taken()
    t0 = time.monotonic()
    for k in range(3):
        reaper.discard(str(image(tmp_path, f"s{k}.img")))
    reaper.close()
    assert trash(reaper) == {}
    assert time.monotonic() - t0 < QUIET / 2
