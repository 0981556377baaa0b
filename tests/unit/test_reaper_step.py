"""workers.Reaper frees a file a few blocks per step (pure arithmetic), and
empties the trash with a file of scattered blocks (a real file)."""
import os
import random

from replication import workers

GiB, MiB = 1 << 30, 1 << 20


def test_step_frees_a_few_blocks_of_a_sparse_file():
    # a 1 GiB snapshot image holding 8000 scattered 4 KiB blocks
    step = workers.Reaper.step(GiB, 8000 * 4096)
    assert step % 4096 == 0
    assert MiB <= step < MiB + 64 * 1024
    blocks_per_step = 8000 * step / GiB
    assert 7.5 <= blocks_per_step <= 8.5


def test_step_of_a_dense_file_is_the_minimum():
    assert workers.Reaper.step(GiB, GiB) == workers.Reaper.MIN_STEP


def test_step_of_an_empty_file_cuts_it_at_once():
    assert workers.Reaper.step(GiB, 0) >= GiB


def test_reaper_removes_a_sparse_file(tmp_path):
    r = workers.Reaper(str(tmp_path / "trash"))
    r.start()
    try:
        path = tmp_path / "img"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, 256 * MiB)
            for b in random.Random(1).sample(range(65536), 500):
                os.pwrite(fd, b"x" * 4096, b * 4096)
        finally:
            os.close(fd)
        r.discard(str(path))
        assert not path.exists()
        r.wait()
        assert os.listdir(tmp_path / "trash") == []
    finally:
        r.close()
