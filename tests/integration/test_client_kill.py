"""No client can take a server down: a client SIGKILLed with many requests
in flight, KILLS times in a row, on a plaintext unix socket and on plaintext
TCP, against the primary's "" and snap/NAME exports and the secondary's ""
export.  The server must survive every time: after each kill a new client
still reads from it, and at the end its pid is unchanged and its log holds
no abort.

Stock nbdkit 1.32.5 (Debian 12) fails this (connections.c:402:
raw_send_socket: Assertion `sock >= 0' failed): run it with
PREPL_NBDKIT=/usr/bin/nbdkit on Debian 12 to see it; the nbdkit that
scripts/bootstrap installs (replication/nbdkit_bin.py) passes.

Each client is a real process: a forked child of a small libnbd driver,
which queues DEPTH reads of CHUNK bytes (more than the socket buffers
hold, so the server's worker threads are blocked sending replies), waits
until the first reply has arrived, stops reading and is SIGKILLed."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from replication import nbdkit_bin
from replication.state import StateDir
from tests.conftest import ENV, REPO, prepl, wait_for

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("PREPL_CLIENT_KILLS", "100"))
SIZE = 8 << 20
CHUNK = 512 << 10
DEPTH = 64                  # 32 MiB of replies in flight per client

DRIVER = r"""
import json, os, random, signal, sys, time
import nbd

kind, addr, export = sys.argv[1:4]
kills, depth, chunk, size = map(int, sys.argv[4:8])


def connect():
    h = nbd.NBD()
    h.set_export_name(export)
    if kind == "unix":
        h.connect_unix(addr)
    else:
        h.connect_tcp("127.0.0.1", addr)
    return h


def client(w):
    # the child: many reads in flight, then it stops reading and waits to die
    h = connect()
    bufs = [nbd.Buffer(chunk) for _ in range(depth)]
    for i, b in enumerate(bufs):
        h.aio_pread(b, (i * chunk) % size)
    while h.aio_in_flight() >= depth:       # the server is replying
        h.poll(-1)
    os.write(w, b"1")
    time.sleep(600)


rng = random.Random(11)
out = {"kills": 0, "failed_at": None, "error": None}
for i in range(kills):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            client(w)
        except BaseException as e:
            os.write(w, b"E" + repr(e).encode()[:500])
        os._exit(1)
    os.close(w)
    got = os.read(r, 512)
    os.close(r)
    time.sleep(rng.uniform(0, 0.01))        # let more replies pile up
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if got != b"1":
        out.update(failed_at=i, error="client: " + got[1:].decode(errors="replace"))
        break
    out["kills"] += 1
    try:                                    # the server still answers
        h = connect()
        h.pread(4096, 0)
        h.shutdown()
        del h
    except nbd.Error as e:
        out.update(failed_at=i, error=f"after kill {i + 1}: {e}")
        break
print(json.dumps(out))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`prepl serve --background` on a unix socket or a TCP port; stopped
    with `prepl stop`, and killed by PID if that fails."""

    def __init__(self, state, tmp_path, transport):
        self.state = str(state)
        if transport == "unix":
            self.kind, self.addr = "unix", str(tmp_path / (os.path.basename(state) + ".sock"))
            where = ["--unix", self.addr]
        else:
            self.kind, self.addr = "tcp", str(free_port())
            where = ["--port", self.addr, "--bind", "127.0.0.1"]
        self.log = StateDir(self.state).p("server.log")
        self.pid = None
        prepl("serve", self.state, *where, "--background", "--timeout", "60")
        self.pid = self.ctl("status")["pid"]

    def ctl(self, op, **kw):
        from replication import control
        return control.request(StateDir(self.state).control_socket, op, timeout=10, **kw)

    def alive(self):
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"

    def output(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.pid is None or not self.alive():
            return
        r = prepl("stop", self.state, check=False)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            wait_for(lambda: not self.alive(), 10, f"pid {self.pid} to die")
        assert r.returncode == 0, r.stderr


def kill_clients(srv, export):
    """KILLS clients of `export` SIGKILLed with reads in flight; the server
    must survive every one."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", DRIVER, srv.kind, srv.addr, export, str(KILLS),
                        str(DEPTH), str(CHUNK), str(SIZE)],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    secs = time.monotonic() - t0
    assert r.returncode == 0, f"driver exited {r.returncode}: {r.stderr[-2000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    log = srv.output()
    where = f"{srv.kind} export {export!r} on {nbdkit_bin.binary()}"
    assert res["failed_at"] is None, \
        f"{where}: {res['error']} (server alive: {srv.alive()})\nserver log:\n{log[-3000:]}"
    assert res["kills"] == KILLS
    assert srv.alive() and srv.ctl("status")["pid"] == srv.pid, where
    assert "Assertion" not in log and "abort" not in log.lower(), f"{where}:\n{log[-3000:]}"
    print(f"{where}: {KILLS} clients killed in {secs:.1f} s, server pid {srv.pid} survived")


def check_runs_ours(srv):
    """The server is the nbdkit that replication/nbdkit_bin.py chose."""
    assert os.path.realpath(f"/proc/{srv.pid}/exe") == os.path.realpath(nbdkit_bin.binary())


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_primary_survives_killed_clients(tmp_path, transport):
    st = tmp_path / "p"
    prepl("init", st, "--volume", tmp_path / "p.img", "--size", str(SIZE))
    srv = Served(st, tmp_path, transport)
    try:
        check_runs_ours(srv)
        import nbd
        h = nbd.NBD()
        if srv.kind == "unix":
            h.connect_unix(srv.addr)
        else:
            h.connect_tcp("127.0.0.1", srv.addr)
        h.pwrite(os.urandom(SIZE), 0)
        h.flush()
        srv.ctl("snappoint_create", name="k")
        h.pwrite(os.urandom(SIZE // 2), 0)      # the snapshot holds copied data
        h.flush()
        h.shutdown()
        kill_clients(srv, "")
        kill_clients(srv, "snap/k")
    finally:
        srv.stop()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_secondary_survives_killed_clients(tmp_path, transport):
    st = tmp_path / "s"
    prepl("init", st, "--volume", tmp_path / "s.img", "--size", str(SIZE), "--role", "secondary")
    srv = Served(st, tmp_path, transport)
    try:
        check_runs_ours(srv)
        kill_clients(srv, "")
    finally:
        srv.stop()
