"""Tests for the power-loss test disk (tests/harness/cachedisk.py and
tests/harness/powerdisk.py).  Real processes, needs root: nbdkit, nbdfuse,
losetup, mkfs.ext4, mount."""

import ctypes
import hashlib
import os
import subprocess
import sys
import threading
import time

import nbd
import pytest

pytestmark = pytest.mark.slow


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.conftest import NBDKIT  # noqa: E402
from tests.harness.powerdisk import (  # noqa: E402
    PLUGIN, CacheDisk, DiskError, PowerLossDisk)

BS = 4096
MiB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def start_writeback(fd):
    """sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER): push the file's dirty
    pages to the block device *without* fsync (no journal commit, no
    flush), so its data sits in the disk's volatile cache."""
    if _libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0),
                             7) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def leftovers(disk):
    """Everything of `disk` still alive: processes, mounts, loop devices."""
    found = []
    for name, proc in (("nbdkit", disk.disk.proc), ("nbdfuse", disk.fuse_proc)):
        if proc is not None and proc.poll() is None:
            found.append("%s pid %d" % (name, proc.pid))
    with open("/proc/mounts") as f:
        found += [line.strip() for line in f if disk.workdir in line]
    loops = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE,
                           text=True, check=True).stdout
    found += [line for line in loops.splitlines() if disk.workdir in line]
    return found


def assert_no_leftovers(disk, timeout=10):
    # After a crash the lazily unmounted ext4 and its auto-clearing loop
    # device go away asynchronously: allow a little time.
    deadline = time.monotonic() + timeout
    while leftovers(disk) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(disk) == []


@pytest.fixture
def make_pdisk(tmp_path):
    disks = []

    def make(name="pd", **kw):
        kw.setdefault("size", 128 * MiB)
        d = PowerLossDisk(str(tmp_path / name), **kw)
        disks.append(d)
        return d

    yield make
    for d in disks:
        d.stop()


@pytest.fixture
def cachedisk(tmp_path):
    """Factory: a fresh CacheDisk on a new image (raw NBD tests)."""
    disks = []

    def make(name, size=64 * BS, blocksize=None):
        img = str(tmp_path / (name + ".img"))
        with open(img, "wb") as f:
            f.truncate(size)
        d = CacheDisk(img, str(tmp_path / (name + ".sock")),
                      str(tmp_path / (name + ".ctl")),
                      str(tmp_path / (name + ".log")), blocksize)
        disks.append(d)
        d.start()
        return d

    yield make
    for d in disks:
        d.stop()


def connect(disk):
    h = nbd.NBD()
    h.connect_unix(disk.sock)
    return h


def image_blocks(path):
    with open(path, "rb") as f:
        data = f.read()
    return [data[i:i + BS] for i in range(0, len(data), BS)]


# ------------------------------------------------------------ ext4 level ---

def test_ext4_fsync_issues_nbd_flush(make_pdisk):
    d = make_pdisk().start()
    before = d.stats()
    path = os.path.join(d.mountpoint, "f")
    with open(path, "wb") as f:
        f.write(os.urandom(MiB))
        mid = d.stats()
        os.fsync(f.fileno())
        after = d.stats()
    assert mid["flushes"] == before["flushes"]          # write alone: none
    assert after["flushes"] > mid["flushes"]            # fsync: NBD flush
    assert after["writes"] > mid["writes"]
    assert after["cached"] == 0                         # all durable


def test_ext4_crash_flushed_loses_unsynced_data(make_pdisk):
    # commit=300: no periodic jbd2 commit can make file 2 durable by
    # accident between its write and the crash.
    d = make_pdisk(mount_options="commit=300").start()
    synced, unsynced = os.urandom(2 * MiB), os.urandom(2 * MiB)
    p1 = os.path.join(d.mountpoint, "synced")
    p2 = os.path.join(d.mountpoint, "unsynced")
    with open(p1, "wb") as f:
        f.write(synced)
        os.fsync(f.fileno())
    flushes = d.stats()["flushes"]
    with open(p2, "wb") as f:
        f.write(unsynced)
        start_writeback(f.fileno())       # data in the disk cache, no flush
    st = d.stats()
    assert st["flushes"] == flushes
    assert st["cached"] >= len(unsynced) // BS

    rep = d.crash("flushed", seed=1)
    assert rep["ok"] and rep["kept"] == 0
    assert rep["dropped"] >= len(unsynced) // BS
    assert_no_leftovers(d)

    d.start()                              # journal replay
    assert sha256(p1) == hashlib.sha256(synced).hexdigest()
    if os.path.exists(p2):
        with open(p2, "rb") as f:
            assert f.read() != unsynced
    d.stop()
    assert d.last_stats["cached"] == 0     # clean stop left nothing cached
    assert_no_leftovers(d)

    d.start()                              # clean restart keeps everything
    assert sha256(p1) == hashlib.sha256(synced).hexdigest()


def test_ext4_crash_with_busy_writer(make_pdisk):
    """Power cut while a thread keeps writing + fsyncing: teardown must not
    hang, the writer gets I/O errors, the fs comes back."""
    d = make_pdisk(size=64 * MiB).start()
    stop, errors, done = threading.Event(), [], []

    def writer():
        try:
            with open(os.path.join(d.mountpoint, "busy"), "wb") as f:
                while not stop.is_set():
                    f.write(os.urandom(64 * 1024))
                    os.fsync(f.fileno())
                    done.append(1)
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while len(done) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(done) >= 5
        d.crash("random", seed=7)
        t.join(30)
        assert not t.is_alive()
    finally:
        stop.set()
        t.join(30)
    assert errors, "writer did not notice the power cut"
    assert_no_leftovers(d)
    d.start()
    assert os.path.exists(os.path.join(d.mountpoint, "busy"))


def test_stop_leaves_nothing_behind(make_pdisk):
    d = make_pdisk(size=64 * MiB)
    d.stop()                               # never started: no-op
    d.start()
    with open(os.path.join(d.mountpoint, "x"), "wb") as f:
        f.write(b"x" * 10000)
    pids = [d.disk.proc.pid, d.fuse_proc.pid]
    d.stop()
    d.stop()                               # idempotent
    assert_no_leftovers(d)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert d.last_stats["cached"] == 0
    with d:                                # context manager, data survived
        with open(os.path.join(d.mountpoint, "x"), "rb") as f:
            assert f.read() == b"x" * 10000
    assert_no_leftovers(d)


def test_failed_start_cleans_up(make_pdisk):
    d = make_pdisk(size=64 * MiB, mount_options="no_such_option_xyz")
    with pytest.raises(DiskError):
        d.start()
    assert_no_leftovers(d)


# ------------------------------------------------------------- NBD level ---

A_BLOCKS = range(0, 16)
B_BLOCKS = range(8, 24)       # overlaps A (old = 'A') and fresh (old = 0)


def old_block(i):
    return b"A" * BS if i in A_BLOCKS else bytes(BS)


def new_block(i):
    b = bytearray(old_block(i))
    if i == 23:                       # partial write: read-modify-write
        b[100:200] = b"b" * 100
    else:
        b[:] = bytes([0x40 + i]) * BS
    return bytes(b)


def write_a_flush_b(disk):
    h = connect(disk)
    h.pwrite(b"A" * BS * len(A_BLOCKS), A_BLOCKS[0] * BS)
    h.flush()
    for i in B_BLOCKS:
        if i == 23:
            h.pwrite(b"b" * 100, i * BS + 100)
        else:
            h.pwrite(bytes([0x40 + i]) * BS, i * BS)
    for i in B_BLOCKS:                # reads see the cache
        assert h.pread(BS, i * BS) == new_block(i)
    st = disk.stats()
    assert st["cached"] == len(B_BLOCKS) and st["flushes"] == 1
    return h


def test_nbd_crash_flushed(cachedisk):
    disk = cachedisk("f")
    h = write_a_flush_b(disk)
    with open(disk.image, "rb") as f:      # nothing unflushed reached it
        assert f.read(24 * BS) == b"".join(old_block(i) for i in range(24))
    rep = disk.crash("flushed", seed=3)
    assert rep == {"ok": True, "kept": 0, "dropped": len(B_BLOCKS)}
    with pytest.raises(nbd.Error):         # the disk stopped answering
        h.pread(BS, 0)
    disk.wait_exit()
    assert not disk.running
    blocks = image_blocks(disk.image)
    for i in range(24):
        assert blocks[i] == old_block(i), i


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_nbd_crash_random_never_torn(cachedisk, seed):
    disk = cachedisk("r%d" % seed)
    write_a_flush_b(disk)
    rep = disk.crash("random", seed=seed)
    disk.wait_exit()
    blocks = image_blocks(disk.image)
    kept = dropped = 0
    for i in range(24):
        if i not in B_BLOCKS:
            assert blocks[i] == old_block(i)
        elif blocks[i] == new_block(i):
            kept += 1
        else:
            assert blocks[i] == old_block(i), "torn block %d" % i
            dropped += 1
    assert (kept, dropped) == (rep["kept"], rep["dropped"])
    assert kept > 0 and dropped > 0        # these seeds keep some, drop some


def test_nbd_crash_random_is_deterministic(cachedisk):
    images = []
    for n in range(2):
        disk = cachedisk("det%d" % n)
        write_a_flush_b(disk)
        disk.crash("random", seed=42)
        disk.wait_exit()
        with open(disk.image, "rb") as f:
            images.append(f.read())
    assert images[0] == images[1]


def test_nbd_fua_write_is_durable(cachedisk):
    disk = cachedisk("fua")
    h = connect(disk)
    h.pwrite(b"u" * BS, 0)
    h.pwrite(b"v" * BS, BS, nbd.CMD_FLAG_FUA)
    assert disk.stats()["cached"] == 0
    h.pwrite(b"w" * BS, 2 * BS)
    h.zero(BS, 0)                          # zero is cached too
    h.shutdown()                           # else nbdkit waits for us
    disk.crash("flushed")
    disk.wait_exit()
    blocks = image_blocks(disk.image)
    assert blocks[:3] == [b"u" * BS, b"v" * BS, bytes(BS)]


def test_nbd_writeback_then_crash(cachedisk):
    # flushed: blocks written back early are restored to flushed content
    disk = cachedisk("wb1")
    write_a_flush_b(disk)
    assert disk.writeback(1.0, seed=0)["written"] == len(B_BLOCKS)
    with open(disk.image, "rb") as f:      # early data hit the file...
        assert f.read(BS * 24)[8 * BS:] == b"".join(
            new_block(i) for i in B_BLOCKS)
    disk.crash("flushed")
    disk.wait_exit()
    blocks = image_blocks(disk.image)      # ...but is gone after the crash
    assert [blocks[i] for i in range(24)] == [old_block(i) for i in range(24)]

    # random: blocks written back early count as kept
    disk = cachedisk("wb2")
    write_a_flush_b(disk)
    early = disk.writeback(0.5, seed=5)["written"]
    assert disk.stats()["early"] == early > 0
    rep = disk.crash("random", seed=6, fraction=0.0)
    disk.wait_exit()
    assert (rep["kept"], rep["dropped"]) == (early, len(B_BLOCKS) - early)
    blocks = image_blocks(disk.image)
    assert sum(blocks[i] == new_block(i) for i in B_BLOCKS) == early


def test_plugin_rejects_bad_config(tmp_path):
    img = tmp_path / "img"
    img.write_bytes(bytes(BS))
    base = [NBDKIT, "-f", "-U", str(tmp_path / "s"), "python", PLUGIN]
    ctl = "control=%s" % (tmp_path / "c")
    for extra in (["file=%s" % img, ctl, "bogus=1"],
                  ["file=%s" % (tmp_path / "missing"), ctl],
                  ["file=%s" % img]):
        p = subprocess.run(base + extra, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        assert p.returncode != 0, extra


def test_control_errors_are_replies(cachedisk):
    disk = cachedisk("ctl")
    assert disk.request({"op": "nope"})["ok"] is False
    assert disk.request({"op": "crash", "mode": "weird"})["ok"] is False
    assert disk.stats()["crashed"] is False


def test_nbd_crash_without_shutdown_answers_eio(cachedisk):
    disk = cachedisk("eio")
    h = connect(disk)
    h.pwrite(b"z" * BS, 0)
    assert disk.crash("flushed", shutdown=False)["dropped"] == 1
    for op in (lambda: h.pread(BS, 0), lambda: h.pwrite(b"y" * BS, BS),
               lambda: h.flush(), lambda: h.zero(BS, 0)):
        with pytest.raises(nbd.Error) as e:
            op()
        assert e.value.errno == "EIO"
    assert disk.stats()["crashed"] is True
    assert disk.request({"op": "writeback", "fraction": 1})["ok"] is False
    assert image_blocks(disk.image)[0] == bytes(BS)
    h.shutdown()
