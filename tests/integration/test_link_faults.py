"""Faults of the link and of space, with the fault proxy
(tests/harness/proxy.py) between the agent and the secondary:

  * the link stalls mid-transfer, then flows again;
  * the link is throttled to 2 MiB/s;
  * the link closes in the middle of a reply, at several points of a cycle;
  * the secondary's staging fills its filesystem mid-cycle;
  * the primary's snapshot fills its filesystem mid-cycle (copy-on-write
    of the writes made while the cycle reads it).

Each time: the primary's writes keep succeeding, no cycle applies anything
wrong, and once the fault ends the agent finishes by itself and the
replica equals the primary's image (full-image digests over NBD)."""
import hashlib
import json
import os
import random
import subprocess
import threading
import time

import pytest

from tests.conftest import ENV, PREPL, REPO, prepl, stop_process, wait_for
from tests.harness.proxy import CutProxy

pytestmark = pytest.mark.slow


MiB = 1 << 20
SIZE = 32 * MiB


def digest(srv, export=""):
    h = srv.connect(export)
    try:
        return hashlib.sha256(h.pread(SIZE, 0)).hexdigest()
    finally:
        h.shutdown()


def scribble(srv, seed, nbytes, sizes=(4096, 65536, 262144)):
    rnd = random.Random(seed)
    h = srv.connect()
    done = 0
    while done < nbytes:
        n = rnd.choice(sizes)
        h.pwrite(rnd.randbytes(n), rnd.randrange((SIZE - n) // 4096) * 4096)
        done += n
    h.flush()
    h.shutdown()


def agent(prim, sock, *args):
    return subprocess.Popen(PREPL + ["agent", prim.state, "--secondary",
                                     f"nbd+unix:///?socket={sock}", "--once", *args],
                            env=ENV, cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(a, timeout=120):
    try:
        out, err = a.communicate(timeout=timeout)
    finally:
        stop_process(a)
    assert a.returncode == 0, err[-3000:]
    return err


def mount_tmpfs(d, size):
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", d],
                   check=True)


def grow_tmpfs(d, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", d], check=True)


@pytest.fixture
def link(tmp_path, make_server):
    """(primary, secondary, proxy): both created empty, proxy in front of
    the secondary; the secondary's state may be asked for on a small tmpfs."""
    made = []

    def make(secondary_fs=None, primary_fs=None):
        pdir = tmp_path
        if primary_fs:
            pdir = tmp_path / "pfs"
            mount_tmpfs(pdir, primary_fs)
            made.append(pdir)
        sdir = tmp_path
        if secondary_fs:
            sdir = tmp_path / "sfs"
            mount_tmpfs(sdir, secondary_fs)
            made.append(sdir)
        prepl("init", pdir / "p", "--volume", tmp_path / "p.img", "--size", str(SIZE))
        prepl("init", sdir / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
              "--role", "secondary")
        prim = make_server(pdir / "p", tmp_path / "p.sock").start()
        sec = make_server(sdir / "s", tmp_path / "s.sock").start()
        proxy = CutProxy(tmp_path / "proxy.sock", tmp_path / "s.sock").start()
        made.append(proxy)
        return prim, sec, proxy
    yield make
    for m in reversed(made):
        if isinstance(m, CutProxy):
            m.stop()
        else:
            subprocess.run(["umount", "-l", m], check=False)


def assert_caught_up(prim, sec):
    """I1 for the last cycle and I2: replica == snap/LINK.N == the primary."""
    names = [s["name"] for s in prim.ctl("status")["snappoints"]]
    assert digest(sec) == digest(prim, f"snap/{names[-1]}") == digest(prim)


def test_stall_mid_transfer(link):
    prim, sec, proxy = link()
    scribble(prim, 1, 12 * MiB)
    a = agent(prim, proxy.listen)
    try:
        wait_for(lambda: proxy.bytes_up > 2 * MiB, 30, "the transfer to start")
        proxy.stall()
        time.sleep(3)
        up = proxy.bytes_up
        assert a.poll() is None and proxy.bytes_up == up, "a stalled link moved data"
        proxy.resume()
    finally:
        proxy.resume()
    finish(a)
    assert_caught_up(prim, sec)


def test_throttled_link(link):
    prim, sec, proxy = link()
    scribble(prim, 2, 4 * MiB)
    proxy.throttle(2 * MiB)
    t = time.monotonic()
    finish(agent(prim, proxy.listen))
    took = time.monotonic() - t
    assert proxy.bytes_up > 2 * MiB              # overlapping writes: a bit under 4 MiB
    assert took >= 0.8 * proxy.bytes_up / (2 * MiB), f"{proxy.bytes_up} bytes in {took:.1f} s"
    proxy.throttle(None)
    assert_caught_up(prim, sec)


def test_progress_in_status_during_a_slow_transfer(link):
    """prepl status shows a long transfer's progress: percent, bytes, rate, ETA."""
    prim, sec, proxy = link()
    finish(agent(prim, proxy.listen))
    scribble(prim, 8, 6 * MiB, sizes=(4096,))
    proxy.throttle(1 * MiB)
    a = agent(prim, proxy.listen)
    seen = []
    try:
        def progress():
            ln = json.loads(prepl("status", prim.state, "--json").stdout)["links"]["default"]
            if ln.get("progress") and ln["state"] == "transferring":
                seen.append(ln["progress"])
            return len(seen) >= 2
        wait_for(progress, 60, "two progress reports in prepl status")
        proxy.throttle(None)
        err = finish(a)
    finally:
        proxy.throttle(None)
        stop_process(a)
    p = seen[-1]
    assert 0 < p["percent"] < 100 and 0 < p["bytes_done"] < p["bytes_total"]
    assert p["rate_MBps"] > 0 and p["eta_seconds"] > 0 and p["snappoint"].startswith("default.")
    assert seen[0]["bytes_done"] <= seen[-1]["bytes_done"]
    assert "% " in err and "MB/s, ETA" in err          # and the same on stderr
    ln = json.loads(prepl("status", prim.state, "--json").stdout)["links"]["default"]
    assert ln["state"] == "idle" and ln["progress"] is None
    assert_caught_up(prim, sec)


@pytest.mark.parametrize("after", [200, 3000, 70000])
def test_link_closes_mid_reply(link, after):
    """Server -> agent bytes are handshakes and replies (info, write
    replies, the commit's receipt); cut in the middle of one of them."""
    prim, sec, proxy = link()
    scribble(prim, 3, 6 * MiB)
    proxy.close_after(after)
    finish(agent(prim, proxy.listen))
    assert proxy.cuts >= 1
    assert_caught_up(prim, sec)


def test_staging_fills_the_secondary_fs(link, tmp_path):
    prim, sec, proxy = link(secondary_fs="4m")
    scribble(prim, 4, MiB)
    finish(agent(prim, proxy.listen))       # (the first interval is staged in place)
    scribble(prim, 4, 12 * MiB)
    a = agent(prim, proxy.listen)
    try:
        wait_for(lambda: "No space left on device" in sec.output(), 60,
                 "the staging to run out of space")
        scribble(prim, 5, MiB)                      # the primary's writes go on
        assert a.poll() is None, "the agent gave up instead of retrying"
        grow_tmpfs(tmp_path / "sfs", "64m")        # space is freed
        finish(a)
    finally:
        stop_process(a)
    assert_caught_up(prim, sec)


def test_snapshot_fills_the_primary_fs(link, tmp_path):
    prim, sec, proxy = link(primary_fs="6m")
    finish(agent(prim, proxy.listen))
    # with 64 KiB in flight, the agent's reads of the snapshot go on for as
    # long as the throttled writes do
    scribble(prim, 6, 6 * MiB, sizes=(4096,))
    proxy.throttle(512 * 1024)                      # about 10 s of transfer
    a = agent(prim, proxy.listen, "--max-in-flight", "64K")
    stop = threading.Event()
    writes, errors = [], []

    def writer():                     # copy-on-write into the cycle's snapshot
        rnd = random.Random(7)
        h = prim.connect()
        try:
            while not stop.is_set():
                h.pwrite(rnd.randbytes(65536), rnd.randrange(SIZE // 65536) * 65536)
                writes.append(1)
        except Exception as e:        # noqa: BLE001 -- asserted below
            errors.append(e)
        finally:
            h.shutdown()
    t = threading.Thread(target=writer)
    try:
        wait_for(lambda: proxy.bytes_up > 256 * 1024, 30, "the transfer to start")
        t.start()
        wait_for(lambda: any(s["snapshot"] == "invalid"
                             for s in prim.ctl("status")["snappoints"]), 60,
                 "the snapshot to run out of space")
        time.sleep(1)
        stop.set()
        t.join(30)
        assert not t.is_alive() and not errors and writes, errors   # every write succeeded
        assert a.poll() is None, "the cycle ended although its snapshot broke"
        grow_tmpfs(tmp_path / "pfs", "128m")
        proxy.throttle(None)
        err = finish(a)
    finally:
        stop.set()
        proxy.throttle(None)
        stop_process(a)
    assert "failed" in err or "retry" in err, err[-2000:]
    assert_caught_up(prim, sec)
