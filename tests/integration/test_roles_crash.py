"""Crash sweep of the role changes (ARCHITECTURE §4a): every named fault
point of failover, failback (the demotion's record) and the failback
cycle's apply, with the power-loss disk (tests/harness/powerdisk.py) under
the old primary's node in one run and under the promoted node's in the
other.

Per case: A (primary) replicates to B once (image P0), then A is written
more (P1, never replicated) and stopped; B fails over and is written (Q);
A comes back superseded and fails back; B's agent makes the failback
cycle.  The step under test crashes its server at the fault point (exit
99) and, if that node has the power-loss disk, cuts its power.  After a
restart, judged by full-image digests read over NBD:

  * each node is in its old role or its new one, with its image intact:
    B holds P0 (then Q once written), A holds P1 until the failback cycle
    applies and exactly Q from then on, never a mix;
  * re-running the interrupted command finishes the job: A == B == Q.
"""
import os
import random
import subprocess
import time

import pytest

from replication import divergence, writeclock
from tests.conftest import ENV, PREPL, REPO, meta_json, prepl, wait_for
from tests.harness.powerdisk import PowerLossDisk
from tests.integration.test_crash_sweep import SIZE, cycle, digest, restart, scribble

pytestmark = pytest.mark.slow

# fault point -> the step whose server crashes there
POINTS = {
    "secondary.failover.before_record": "failover",
    "secondary.failover.recorded": "failover",
    "primary.failback.before_record": "failback",
    "primary.failback.recorded": "failback",
    "secondary.commit.staged_durable": "resync",
    "secondary.commit.after_switch": "resync",
    "secondary.apply.midway": "resync",
}


def uri(srv):
    return f"nbd+unix:///?socket={srv.sock}"


def crash_at(srv, point, run, disk, on_disk):
    """Restarts srv with point armed, runs run() (which fails), waits for
    the crash; cuts the power if srv's node has the disk; restarts srv."""
    restart(srv, {"PREPL_FAULT": point})
    run()
    wait_for(lambda: srv.proc.poll() is not None, 60, f"the crash at {point}")
    assert srv.proc.returncode == 99, srv.output()[-2000:]
    if on_disk:
        disk.crash("random", random.Random(point).randrange(1 << 30))
        disk.start()
    restart(srv)


def replicated_nodes(tmp_path, make_server, disk, disk_node, rnd):
    """A (primary) and B (secondary), disk_node's state and volume on the
    power-loss disk; one interval applied (image P0), then A written more
    (P1, not replicated).  Returns (a, b, p0, p1)."""
    where = {"old-primary": tmp_path, "promoted": tmp_path}
    where[disk_node] = disk.mountpoint
    pa, pb = os.path.join(where["old-primary"], "a"), os.path.join(where["promoted"], "b")
    prepl("init", pa, "--volume", pa + ".img", "--size", str(SIZE))
    prepl("init", pb, "--volume", pb + ".img", "--size", str(SIZE), "--role", "secondary")
    os.sync()
    a = make_server(pa, tmp_path / "a.sock").start()
    b = make_server(pb, tmp_path / "b.sock").start()
    scribble(a, rnd)
    cycle(a, b)
    p0 = digest(b)
    assert digest(a) == p0
    scribble(a, rnd)
    return a, b, p0, digest(a)


@pytest.mark.parametrize("disk_node", ["old-primary", "promoted"])
@pytest.mark.parametrize("point", list(POINTS))
def test_role_change_crash(tmp_path, make_server, point, disk_node):
    rnd = random.Random(f"{point}/{disk_node}")
    step = POINTS[point]
    disk = PowerLossDisk(tmp_path / "disk", 96 << 20)
    disk.start()
    try:
        a, b, p0, p1 = replicated_nodes(tmp_path, make_server, disk, disk_node, rnd)
        a.stop()
        time.sleep(writeclock.PERIOD + divergence.CLOCK_MARGIN + 0.5)

        def failover(check=True):
            return prepl("failover", b.state, check=check)
        if step == "failover":
            crash_at(b, point, lambda: failover(check=False), disk, disk_node == "promoted")
            role = meta_json(b.state)["role"]
            assert role == ("primary" if point.endswith("recorded") else "secondary")
            assert digest(b) == p0
            if role == "secondary":
                failover()
        else:
            failover()
        assert digest(b) == p0
        scribble(b, rnd)
        q = digest(b)
        a.start()
        assert meta_json(a.state)["superseded"] is not None

        def failback(check=True):
            return prepl("failback", a.state, "--peer", uri(b), check=check)
        if step == "failback":
            crash_at(a, point, lambda: failback(check=False), disk, disk_node == "old-primary")
            role = meta_json(a.state)["role"]
            assert role == ("secondary" if point.endswith("recorded") else "primary")
            assert digest(a) == p1
            if role == "primary":
                failback()
        else:
            failback()
        assert digest(a) == p1
        if step == "resync":
            crash_at(a, point, lambda: prepl("agent", b.state, "--secondary", uri(a),
                                             "--once", "--timeout", "30", check=False),
                     disk, disk_node == "old-primary")
            assert digest(a) in (p1, q), "the old primary is neither its own image nor Q"
        cycle(b, a)
        assert digest(a) == digest(b) == q
        assert meta_json(a.state)["failback"] is None
        a.stop()
        b.stop()
    finally:
        disk.stop()


# fault point -> (the process it crashes, the node it runs on)
MIGRATE_POINTS = {
    "migrate.before_promote": ("cli", "old-primary"),
    "secondary.failover.before_record": ("server", "promoted"),
    "secondary.failover.recorded": ("server", "promoted"),
    "migrate.promoted": ("cli", "old-primary"),
    "primary.failback.before_record": ("server", "old-primary"),
    "primary.failback.recorded": ("server", "old-primary"),
}


@pytest.mark.parametrize("disk_node", ["old-primary", "promoted"])
@pytest.mark.parametrize("point", list(MIGRATE_POINTS))
def test_migrate_crash(tmp_path, make_server, point, disk_node):
    """A migration A -> B crashed at each of its points: afterwards each
    node is in its old role or its new one with the image P (nothing lost,
    no write accepted meanwhile), and running `prepl migrate` again
    finishes it: B primary, A its secondary, both P."""
    rnd = random.Random(f"{point}/{disk_node}")
    what, where_ = MIGRATE_POINTS[point]
    disk = PowerLossDisk(tmp_path / "disk", 96 << 20)
    disk.start()
    try:
        a, b, p0, p = replicated_nodes(tmp_path, make_server, disk, disk_node, rnd)

        def migrate(env=None, check=True):
            if env is None:
                return prepl("migrate", a.state, "--peer", uri(b), check=check)
            return subprocess.run(PREPL + ["migrate", a.state, "--peer", uri(b)],
                                  env=dict(ENV, **env), cwd=REPO, capture_output=True,
                                  text=True, timeout=120)
        srv = a if where_ == "old-primary" else b
        if what == "cli":
            r = migrate({"PREPL_FAULT": point}, check=False)
            assert r.returncode == 99, r.stderr
            if disk_node == "old-primary":
                disk.crash("random", rnd.randrange(1 << 30))
                a.kill()
                disk.start()
                restart(a)
        else:
            crash_at(srv, point, lambda: migrate(check=False), disk, disk_node == where_)
        roles_now = (meta_json(a.state)["role"], meta_json(b.state)["role"])
        assert roles_now in (("primary", "secondary"), ("primary", "primary"),
                             ("secondary", "primary")), roles_now
        assert digest(a) == p and digest(b) in (p0, p)
        migrate()                                  # finishes the job
        assert (meta_json(a.state)["role"], meta_json(b.state)["role"]) == \
            ("secondary", "primary")
        assert digest(a) == digest(b) == p
        scribble(b, rnd, n=5)
        cycle(b, a)
        assert digest(a) == digest(b)
        a.stop()
        b.stop()
    finally:
        disk.stop()
