"""Faults of the link and of space, with the fault proxy
(tests/harness/proxy.py) between the agent and the secondary:

  * the link stalls mid-transfer, then flows again;
  * the link goes silent (a partition: everything swallowed, nothing
    closed) mid-transfer, in the info read and in the commit: the agent
    declares the connection dead after --peer-timeout, `--once --timeout`
    holds, and a running agent replicates again soon after the link heals;
  * the link is throttled to 2 MiB/s; a link so slow that single requests
    take longer than --peer-timeout is not declared dead;
  * the link closes in the middle of a reply, at several points of a cycle;
  * the secondary's staging fills its filesystem mid-cycle;
  * the primary's snapshot fills its filesystem mid-cycle (copy-on-write
    of the writes made while the cycle reads it).

Each time: the primary's writes keep succeeding, no cycle applies anything
wrong, and once the fault ends the agent finishes by itself and the
replica equals the primary's image (full-image digests over NBD)."""
import json
import os
import random
import subprocess
import threading
import time

import pytest

from tests.conftest import ENV, PREPL, REPO, export_sha, prepl, stop_process, wait_for
from tests.harness.proxy import CutProxy

pytestmark = pytest.mark.slow


MiB = 1 << 20
SIZE = 32 * MiB


def digest(srv, export=""):
    return export_sha(srv, SIZE, export)


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

    def make(secondary_fs=None, primary_fs=None, full=False):
        """full: the primary is made from an existing image (random data),
        so that its first cycle is a full initial sync."""
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
        if full:
            (tmp_path / "p.img").write_bytes(random.Random(99).randbytes(SIZE))
            prepl("init", pdir / "p", "--volume", tmp_path / "p.img")
        else:
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
    """I1 for the last cycle and I2: replica == the primary, nothing being
    written since the last cycle's snappoint (whose snapshot holds only
    what the cycle sent: tests/integration/test_cycle_snapshot.py)."""
    assert digest(sec) == digest(prim)


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
    # a whole snapshot: every write copies (one of changes copies only
    # the blocks the cycle sends)
    a = agent(prim, proxy.listen, "--max-in-flight", "64K", "--whole-snapshot")
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


# ---- silent links ------------------------------------------------------------
# The proxy's silence() is a partition: bytes go out, nothing comes back, no
# FIN, no reset; heal() lets new connections through, the old ones stay dead
# (their client side is never answered: only the agent's deadline helps).

def applied_seq(sec):
    h = sec.connect("info")
    try:
        applied = json.loads(h.pread(h.get_size(), 0).split(b"\0", 1)[0])["applied"]
    finally:
        h.shutdown()
    return applied["target"]["seq"] if applied else None


def test_silent_link_once_timeout_holds(link):
    """`--once --timeout 10` against a link that goes silent at half of the
    initial sync exits 6 (timed out) within 30 s."""
    prim, sec, proxy = link(full=True)
    proxy.throttle(4 * MiB)                      # the 32 MiB sync takes about 8 s
    t0 = time.monotonic()
    a = agent(prim, proxy.listen, "--timeout", "10")
    try:
        wait_for(lambda: proxy.bytes_up > SIZE // 2 or a.poll() is not None, 30,
                 "half of the initial sync")
        assert a.poll() is None, "the sync ended before the link went silent"
        proxy.silence()
        t1 = time.monotonic()
        out, err = a.communicate(timeout=60)
    finally:
        proxy.heal()
        stop_process(a)
    t2 = time.monotonic()
    print(f"silent at {t1 - t0:.1f} s; exit {a.returncode} {t2 - t1:.1f} s later "
          f"({t2 - t0:.1f} s in all)")
    assert a.returncode == 6, err[-3000:]
    assert t2 - t0 < 30, f"the agent took {t2 - t0:.1f} s"
    assert "the peer does not answer" in err, err[-3000:]
    # healed: the next run finishes the sync
    proxy.throttle(None)
    finish(agent(prim, proxy.listen))
    assert_caught_up(prim, sec)


def test_running_agent_replicates_again_after_a_silent_link(link, tmp_path):
    """A running agent whose link goes silent mid-transfer for 20 s abandons
    the dead connections, retries, and applies a new interval within 30 s
    after the link heals; meanwhile the replica always reads as one of the
    primary's images at a snappoint (I1): there are only two, the volume
    is not written while the agent cycles."""
    prim, sec, proxy = link()
    scribble(prim, 21, 2 * MiB)
    logf = open(tmp_path / "agent.log", "w")
    # cycles only when asked (prepl sync) or to retry a failed one
    a = subprocess.Popen(PREPL + ["agent", prim.state, "--secondary",
                                  f"nbd+unix:///?socket={proxy.listen}", "--interval", "3600"],
                         env=ENV, cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    stop = threading.Event()
    samples, bad = [], []
    try:
        wait_for(lambda: applied_seq(sec) is not None, 60, "the first cycle")
        images = {digest(prim)}                     # P0: the replica holds it now
        assert digest(sec) in images
        scribble(prim, 22, 12 * MiB)
        images.add(digest(prim))                    # P1: every later snappoint's image

        def sampler():                              # I1, all along
            while not stop.is_set():
                # one request: a read is atomic against the apply's switch,
                # a digest of several requests could straddle a commit
                d = export_sha(sec, SIZE, chunk=SIZE)
                samples.append(d)
                if d not in images:
                    bad.append(d)
                time.sleep(0.2)
        th = threading.Thread(target=sampler)
        th.start()
        seq0 = applied_seq(sec)
        proxy.throttle(2 * MiB)                     # about 6 s of transfer
        up = proxy.bytes_up
        prepl("sync", prim.state, "--no-wait")
        wait_for(lambda: proxy.bytes_up > up + 2 * MiB, 30, "the transfer to start")
        proxy.silence()
        silent_at = time.monotonic()
        wait_for(lambda: "the peer does not answer" in (tmp_path / "agent.log").read_text(),
                 20, "the agent to declare the silent connection dead")
        detected = time.monotonic() - silent_at
        print(f"the silent link was declared dead after {detected:.1f} s")
        time.sleep(max(0.0, 20 - detected))
        assert applied_seq(sec) == seq0 and a.poll() is None
        proxy.throttle(None)
        proxy.heal()
        healed = time.monotonic()
        wait_for(lambda: (applied_seq(sec) or -1) > seq0, 30,
                 "a new interval after the link healed")
        back = time.monotonic() - healed
        print(f"replicating again {back:.1f} s after the link healed")
        stop.set()
        th.join(30)
        assert not bad, f"I1: {len(bad)} of {len(samples)} reads of the replica were no " \
                        "primary image"
        assert len(samples) > 20
        assert digest(sec) == digest(prim)
    finally:
        stop.set()
        proxy.heal()
        stop_process(a)
        logf.close()
    log = (tmp_path / "agent.log").read_text()
    assert "retrying" in log, log[-3000:]


# an NBD request (magic 0x25609513) with no flags of type NBD_CMD_READ (0):
# the first read through the proxy is a cycle's read of the info export
NBD_READ_REQUEST = b"\x25\x60\x95\x13\0\0\0\0"


@pytest.mark.parametrize("what,pattern,then", [
    ("info", NBD_READ_REQUEST, 0),           # the info export's read
    ("commit", b'"primary_uuid"', 0),        # the manifest's write
], ids=["info", "commit"])
def test_silent_exchange_is_bounded(link, what, pattern, then):
    """The info read or the commit goes silent: `--once --timeout 5
    --peer-timeout 3` still ends, with exit 6, and once the link heals the
    next run applies the interval."""
    prim, sec, proxy = link()
    scribble(prim, 31, MiB)
    proxy.silence_on(pattern, then)
    t0 = time.monotonic()
    a = agent(prim, proxy.listen, "--timeout", "5", "--peer-timeout", "3")
    try:
        out, err = a.communicate(timeout=60)
    finally:
        stop_process(a)
    took = time.monotonic() - t0
    print(f"{what}: exit {a.returncode} after {took:.1f} s")
    assert proxy.silences == 1 and proxy.silent
    assert a.returncode == 6, err[-3000:]
    # two attempts at most, each ends after one peer timeout (a commit after
    # two: it is retried once on a new connection), plus start-up
    assert took < 5 + 2 * 3 + 5, f"{took:.1f} s"
    assert "the peer does not answer" in err, err[-3000:]
    assert ("reading the replica's info failed" if what == "info"
            else "commit on the early connection failed") in err, err[-3000:]
    proxy.heal()
    finish(agent(prim, proxy.listen))
    assert_caught_up(prim, sec)


def test_slow_link_is_not_a_dead_link(link):
    """Throttled so that each 1 MiB batch takes longer than the peer
    timeout to cross: bytes keep moving, so the link is alive and the cycle
    succeeds at the first attempt."""
    prim, sec, proxy = link()
    finish(agent(prim, proxy.listen))
    scribble(prim, 41, 3 * MiB, sizes=(65536, 262144))
    proxy.throttle(256 * 1024)                  # a 1 MiB batch: about 4 s
    up = proxy.bytes_up
    t0 = time.monotonic()
    err = finish(agent(prim, proxy.listen, "--peer-timeout", "3"))
    took = time.monotonic() - t0
    proxy.throttle(None)
    print(f"{proxy.bytes_up - up} bytes in {took:.1f} s")
    assert proxy.bytes_up - up > 2 * MiB
    assert took > 2 * 3, f"{took:.1f} s: the link was not that slow"
    assert "cycle failed" not in err, err[-3000:]
    assert_caught_up(prim, sec)


def test_silent_tls_handshake_is_a_timeout_not_a_refusal(tmp_path, make_server):
    """The link goes silent in the middle of the TLS handshake (the client's
    hello is swallowed): the handshake times out after --peer-timeout and
    the agent reports a timeout (exit 6, retrying may help), not a wrong
    key (exit 5); healed, the same agent command replicates."""
    key = tmp_path / "link.psk"
    prepl("keygen", key)
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img", "--size", str(SIZE))
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    prim = make_server(tmp_path / "p", tmp_path / "p.sock").start()
    sec = make_server(tmp_path / "s", tmp_path / "s.sock")
    sec.extra = ["--tls-psk", str(key)]
    sec.start()
    scribble(prim, 51, MiB)
    with CutProxy(tmp_path / "proxy.sock", tmp_path / "s.sock") as proxy:
        # NBD_OPT_STARTTLS (option 5); the next chunk is the TLS ClientHello
        proxy.silence_on(b"IHAVEOPT\0\0\0\x05", then=1)
        cmd = PREPL + ["agent", prim.state, "--secondary",
                       f"nbds+unix:///?socket={proxy.listen}", "--tls-psk", str(key),
                       "--once", "--timeout", "3", "--peer-timeout", "3"]
        t0 = time.monotonic()
        r = subprocess.run(cmd, env=ENV, cwd=REPO, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
        print(f"exit {r.returncode} after {took:.1f} s")
        assert proxy.silences == 1
        assert r.returncode == 6, r.stderr[-3000:]
        assert "timed out connecting" in r.stderr, r.stderr[-3000:]
        assert took < 3 + 3 + 5
        proxy.heal()
        r = subprocess.run(cmd, env=ENV, cwd=REPO, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-3000:]
