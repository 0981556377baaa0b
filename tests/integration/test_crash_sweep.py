"""Crash sweep: every named fault point (replication/faults.py), and random
power cuts in the middle of a cycle, with the power-loss disk
(tests/harness/powerdisk.py) under the primary's node in one run and under
the secondary's in the other.

Per case: a primary and a secondary replicate an 8 MiB volume once (image
P0), then more writes are made and flushed (image P1).  The fault point is
armed in the process it belongs to and reached (a write, or a cycle);
that process exits 99 as in a crash.  When the crashed process lives on
the node whose disk is the power-loss disk, the power is cut as well
(unflushed blocks lost at random), and the filesystem comes back by
journal replay.  Then, judged only by full-image digests read over NBD,
never by prepl's own maps:

  * I1: the replica is exactly P0 or exactly P1, never a mix;
  * I2: the primary still holds every flushed write (it is P1), and after
    the next cycle the replica equals the primary.

More seeds: PREPL_SWEEP_SEEDS=5 pytest tests/integration/test_crash_sweep.py
"""
import os
import random
import subprocess
import time

import nbd
import pytest

from tests.conftest import ENV, PREPL, REPO, export_sha, prepl, stop_process, wait_for
from tests.harness.powerdisk import PowerLossDisk

pytestmark = pytest.mark.slow


MiB = 1 << 20
SIZE = 8 * MiB

# fault point -> the process it crashes ("agent" runs on the primary's node)
POINTS = {
    "primary.al.before_write": "primary",
    "primary.al.after_sync": "primary",
    "primary.snappoint.after_switch": "primary",
    "primary.snappoint.after_save": "primary",
    "secondary.commit.staged_durable": "secondary",
    "secondary.commit.after_switch": "secondary",
    "secondary.apply.midway": "secondary",
    "secondary.apply.before_record": "secondary",
    "secondary.merge.recorded": "secondary",     # (the soak found this window)
    "agent.after_receipt": "agent",
    None: None,                       # a power cut at a random moment of a cycle
}
SEEDS = range(1, 1 + int(os.environ.get("PREPL_SWEEP_SEEDS", "1")))


def digest(srv):
    return export_sha(srv, SIZE)


def scribble(srv, rnd, n=40):
    """Random writes (some runs of zeroes), then a flush: all of it durable."""
    h = srv.connect()
    for _ in range(n):
        length = rnd.choice([4096, 65536, 200000])
        off = rnd.randrange(SIZE - length)
        if rnd.random() < 0.15:
            h.zero(length, off)
        else:
            h.pwrite(rnd.randbytes(length), off)
    h.flush()
    h.shutdown()


def agent(prim, sec, env=None):
    return subprocess.Popen(PREPL + ["agent", prim.state, "--secondary",
                                     f"nbd+unix:///?socket={sec.sock}", "--once",
                                     "--timeout", "60"],
                            env=dict(ENV, **(env or {})), cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cycle(prim, sec):
    a = agent(prim, sec)
    out, err = a.communicate(timeout=90)
    assert a.returncode == 0, err


def restart(srv, env=None):
    srv.kill()
    srv.env = env or {}
    srv.start()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("disk_node", ["primary", "secondary"])
@pytest.mark.parametrize("point", list(POINTS), ids=[p or "random-power-cut" for p in POINTS])
def test_crash_sweep(tmp_path, make_server, point, disk_node, seed):
    rnd = random.Random(f"{point}/{disk_node}/{seed}")
    disk = PowerLossDisk(tmp_path / "disk", 96 << 20)
    disk.start()
    a = None
    try:
        where = {"primary": tmp_path, "secondary": tmp_path}
        where[disk_node] = disk.mountpoint
        prepl("init", os.path.join(where["primary"], "p"), "--volume",
              os.path.join(where["primary"], "p.img"), "--size", str(SIZE))
        prepl("init", os.path.join(where["secondary"], "s"), "--volume",
              os.path.join(where["secondary"], "s.img"), "--size", str(SIZE),
              "--role", "secondary")
        os.sync()
        prim = make_server(os.path.join(where["primary"], "p"), tmp_path / "p.sock").start()
        sec = make_server(os.path.join(where["secondary"], "s"), tmp_path / "s.sock").start()
        scribble(prim, rnd)
        cycle(prim, sec)
        p0 = digest(prim)
        assert digest(sec) == p0
        scribble(prim, rnd)
        p1 = digest(prim)
        assert p1 != p0

        crashed = POINTS[point]
        if crashed == "primary":
            restart(prim, {"PREPL_FAULT": point})
        elif crashed == "secondary":
            restart(sec, {"PREPL_FAULT": point})

        if point is None:
            a = agent(prim, sec)
            time.sleep(rnd.uniform(0.05, 0.6))          # somewhere in the cycle
        elif point.startswith("primary.al."):
            # the log was reset at the start: the next write's extent is new
            h = prim.connect()
            with pytest.raises(nbd.Error):
                h.pwrite(b"x" * 4096, rnd.randrange(SIZE // 4096) * 4096)
        else:
            a = agent(prim, sec, {"PREPL_FAULT": point} if crashed == "agent" else None)
        if crashed in ("primary", "secondary"):
            srv = prim if crashed == "primary" else sec
            wait_for(lambda: srv.proc.poll() is not None, 60, f"the {crashed} to crash at {point}")
            assert srv.proc.returncode == 99, srv.output()[-2000:]
        elif crashed == "agent":
            a.wait(60)
            assert a.returncode == 99, a.stderr.read()[-2000:]

        # the crashed process's node loses its power too (the agent's node is
        # the primary's); a random cut hits whichever node has the disk
        if point is None or (crashed == "agent" and disk_node == "primary") \
                or crashed == disk_node:
            disk.crash("random", rnd.randrange(1 << 30))
            (prim if disk_node == "primary" else sec).kill()
            if a is not None:
                stop_process(a)
            disk.start()                             # journal replay
        if a is not None:
            stop_process(a)

        # I1: the replica is one applied point in time, never a mix
        restart(sec)
        restart(prim)
        assert digest(sec) in (p0, p1), "the replica is neither P0 nor P1"
        # I2: nothing flushed was lost, and the next cycle catches up
        assert digest(prim) == p1, "the primary lost flushed writes"
        cycle(prim, sec)
        assert digest(sec) == digest(prim) == p1
        prim.stop()
        sec.stop()
    finally:
        if a is not None:
            stop_process(a)
        disk.stop()
