"""A resumable initial sync (issue 13 item 4), with the fault proxy
(tests/harness/proxy.py) between the agent and the secondary counting the
bytes on the wire, outside the agent:

  * the link cut at random points of an initial sync (three seeds);
  * the agent killed mid-sync;
  * the secondary stopped cleanly mid-sync, and killed (SIGKILL) mid-sync.

Each time the replica stays "no image yet" until the sync completes, both
sides' status say how far it got, the resumed sync continues the same
snappoint and sends at most what the secondary did not hold when it was
interrupted + 5 % of the volume, and the replica then equals that
snappoint's snapshot (while the primary took writes meanwhile), then the
primary after one more cycle."""
import json
import random
import signal
import subprocess

import pytest

from tests.conftest import ENV, PREPL, REPO, export_sha, prepl, stop_process, wait_for
from tests.harness.proxy import CutProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
SIZE = 64 * MiB
SLACK = 0.05 * SIZE


def digest(srv, export=""):
    return export_sha(srv, SIZE, export)


def status(state):
    return json.loads(prepl("status", state, "--json").stdout)


STARTED = []      # agents started by a test: the pair fixture stops them


def agent(prim, proxy):
    a = subprocess.Popen(PREPL + ["agent", prim.state, "--secondary",
                                  f"nbd+unix:///?socket={proxy.listen}", "--once",
                                  "--peer-timeout", "10"],
                         env=ENV, cwd=REPO, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    STARTED.append(a)
    return a


def run(a, ok=True, timeout=120):
    try:
        out, err = a.communicate(timeout=timeout)
    finally:
        stop_process(a)
    assert (a.returncode == 0) == ok, err[-3000:]
    return err


@pytest.fixture
def pair(tmp_path, make_server):
    """(primary, secondary, proxy, restart): the primary made from an image
    of random data (its first cycle is a full initial sync)."""
    (tmp_path / "p.img").write_bytes(random.Random(7).randbytes(SIZE))
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img")
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    prim = make_server(tmp_path / "p", tmp_path / "p.sock").start()
    servers = [make_server(tmp_path / "s", tmp_path / "s.sock").start()]
    proxy = CutProxy(tmp_path / "proxy.sock", tmp_path / "s.sock").start()

    def restart(kill):
        old = servers[-1]
        if kill:
            old.kill()
        else:
            prepl("stop", old.state)
            wait_for(lambda: old.proc.poll() is not None, 30, "the secondary to stop")
        servers.append(make_server(tmp_path / "s", tmp_path / "s.sock").start())
        return servers[-1]
    try:
        yield prim, servers, proxy, restart
    finally:
        while STARTED:
            stop_process(STARTED.pop())
        proxy.stop()


def scribble(prim, seed):
    rnd = random.Random(seed)
    h = prim.connect()
    for _ in range(200):
        h.pwrite(rnd.randbytes(4096), rnd.randrange(SIZE // 4096) * 4096)
    h.flush()
    h.shutdown()


def start(prim, proxy, at, rate=24 * MiB):
    """Starts an initial sync over a link of `rate` bytes/s; returns the
    agent once `at` bytes went to the secondary, and the snappoint."""
    proxy.throttle(rate)
    a = agent(prim, proxy)
    wait_for(lambda: proxy.bytes_up >= at, 60, f"{at} bytes on the wire")
    names = [s["name"] for s in prim.ctl("status")["snappoints"]]
    assert len(names) == 1 and names[0].startswith("default.")
    return a, names[0]


def seq_of(prim, snap):
    """The interval snappoint snap closed."""
    return next(s["interval"] for s in status(prim.state)["snappoints"] if s["name"] == snap)


def partial(prim, sec, snap):
    """While interrupted: no image yet on the secondary, and both sides say
    how far the sync got; returns the bytes the secondary holds durably."""
    s = status(sec.state)
    assert s["applied"] is None and s["staging"]["state"] == "receiving"
    assert s["staging"]["target"] == str(seq_of(prim, snap))
    assert s["staging_held_bytes"] <= s["staging_received_bytes"] <= SIZE
    link = status(prim.state)["links"]["default"]
    assert link["cursor"] is None       # progress: reported every 2 s, if it was
    assert link["progress"] is None or link["progress"]["snappoint"] == snap
    return s["staging_held_bytes"]


def finished(a, prim, sec, proxy, snap, since, not_held):
    """The sync resumed by agent a (running, or None: start one) after
    proxy.bytes_up was `since` sent at most not_held + 5 %; the replica is
    the snappoint's image, then the primary's after one more cycle."""
    scribble(prim, 5)                       # the primary goes on meanwhile
    proxy.throttle(None)
    err = run(a or agent(prim, proxy))
    sent = proxy.bytes_up - since
    assert sent <= not_held + SLACK, f"resumed: {sent} bytes, not held: {not_held}"
    assert "resuming the transfer of " + snap in err, err[-2000:]
    info = status(sec.state)
    assert info["applied"]["target"]["seq"] == seq_of(prim, snap)
    assert info["staging"] is None and info["staging_held_bytes"] == 0
    assert digest(sec) == digest(prim, f"snap/{snap}") != digest(prim)
    run(agent(prim, proxy))                 # and the next cycle catches up
    assert digest(sec) == digest(prim)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_link_cut_at_a_random_point(pair, seed):
    """The agent retries by itself; the proxy holds its new connection
    while the test looks at both sides."""
    prim, servers, proxy, _ = pair
    a, snap = start(prim, proxy, random.Random(seed).randrange(SIZE // 10, SIZE * 9 // 10))
    try:
        proxy.stall()
        proxy.cut()
        cut = proxy.bytes_up               # at most what the secondary received
        partial(prim, servers[-1], snap)
    finally:
        proxy.resume()
    finished(a, prim, servers[-1], proxy, snap, cut, SIZE - cut)


def test_agent_killed(pair):
    prim, servers, proxy, _ = pair
    a, snap = start(prim, proxy, SIZE // 2)
    a.send_signal(signal.SIGKILL)
    run(a, ok=False)
    killed = proxy.bytes_up
    held = partial(prim, servers[-1], snap)
    assert held <= killed
    finished(None, prim, servers[-1], proxy, snap, killed, SIZE - killed)


@pytest.mark.parametrize("kill", [False, True], ids=["stopped", "killed"])
def test_secondary_restarted(pair, kill):
    """Stopped cleanly, the secondary holds all it received; killed, what
    its last periodic checkpoint recorded: after the restart it says which
    (the bytes the resumed sync must not send again).  The agent retries
    by itself meanwhile."""
    prim, servers, proxy, restart = pair
    # killed: past the first periodic checkpoint (secondary.CHECKPOINT_SECONDS)
    a, snap = start(prim, proxy, SIZE * 3 // 4 if kill else SIZE // 3,
                    rate=6 * MiB if kill else 24 * MiB)
    try:
        proxy.stall()
        since = proxy.bytes_up
        sec = restart(kill)
        held = partial(prim, sec, snap)
    finally:
        proxy.resume()
    if kill:
        assert 8 * MiB <= held < since
    else:
        assert since - 8 * MiB <= held <= since
    finished(a, prim, sec, proxy, snap, since, SIZE - held)


def test_a_resume_onto_damaged_staging_is_refused_then_sent_whole(pair):
    """The staging changed under the secondary while interrupted (a byte
    of what it holds): the resumed commit's digest does not match, the
    secondary drops the staging, and the next sync sends everything again;
    no wrong image is ever applied."""
    prim, servers, proxy, restart = pair
    a, snap = start(prim, proxy, SIZE // 2)
    a.send_signal(signal.SIGKILL)
    run(a, ok=False)
    sec = restart(False)                    # holds what it received
    with open(servers[0].state + "/../s.img", "r+b") as f:
        f.seek(4096)
        old = f.read(1)
        f.seek(4096)
        f.write(bytes([old[0] ^ 0xFF]))
    err = run(agent(prim, proxy), ok=False)
    assert "staged data does not match the manifest" in err, err[-2000:]
    s = status(sec.state)
    assert s["applied"] is None and s["staging"] is None
    since = proxy.bytes_up
    err = run(agent(prim, proxy))
    assert "resuming" not in err and proxy.bytes_up - since >= SIZE
    names = [s["name"] for s in status(prim.state)["snappoints"]]
    assert digest(sec) == digest(prim, f"snap/{names[-1]}")
