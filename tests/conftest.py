"""Shared fixtures.  Every process a test starts is stopped by PID in a
finalizer, even when the test fails; mounts and loop devices likewise."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from replication import control, nbdkit_bin  # noqa: E402
from replication.state import StateDir  # noqa: E402

PREPL = [sys.executable, "-m", "replication.cli"]
ENV = dict(os.environ, PYTHONPATH=REPO, PATH=nbdkit_bin.server_path())
# the nbdkit every test server runs: the one `prepl serve` runs
NBDKIT = nbdkit_bin.binary()


def prepl(*args, check=True, **kw):
    """Runs the real CLI; returns CompletedProcess (text)."""
    r = subprocess.run(PREPL + [str(a) for a in args], capture_output=True, text=True,
                       env=ENV, cwd=REPO, timeout=120, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"prepl {' '.join(map(str, args))} -> {r.returncode}\n"
                             f"stdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Server:
    """A real `prepl serve` (nbdkit + our plugin) on a unix socket."""

    def __init__(self, state, sock, log):
        self.state = str(state)
        self.sock = str(sock)
        self.log = log
        self.proc = None
        self.extra = []           # more `prepl serve` arguments
        self.env = {}             # more environment (e.g. PREPL_FAULT)

    def start(self):
        self.logf = open(self.log, "ab")
        # `prepl serve` execs nbdkit -f: the Popen pid is nbdkit's pid
        self.proc = subprocess.Popen(PREPL + ["serve", self.state, "--unix", self.sock]
                                     + self.extra,
                                     env=dict(ENV, **self.env), cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=self.logf)
        ctl = StateDir(self.state).control_socket

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n"
                                     + open(self.log).read())
            try:
                return control.request(ctl, "status", timeout=5)
            except Exception:
                return None
        wait_for(up, 30, "the server's control socket")
        return self

    @property
    def pid(self):
        return self.proc.pid

    def ctl(self, op, **kw):
        return control.request(StateDir(self.state).control_socket, op, **kw)

    def connect(self, export="", meta=False):
        import nbd
        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.set_export_name(export)
        h.connect_unix(self.sock)
        return h

    def stop(self):
        """Clean stop, as `prepl stop` does it: the tracker's state is made
        final through the control socket, then nbdkit is signalled (and
        killed if idle clients keep it up)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ctl("shutdown")
        except Exception:
            pass
        self._signal(signal.SIGTERM, 3)

    def kill(self):
        """An unclean stop: SIGKILL."""
        self._signal(signal.SIGKILL, 10)

    def _signal(self, sig, timeout):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.logf.close()

    def output(self):
        with open(self.log, errors="replace") as f:
            return f.read()


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(state, sock=None):
        sock = sock or tmp_path / f"nbd{len(servers)}.sock"
        s = Server(state, sock, tmp_path / f"server{len(servers)}.log")
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.kill()


@pytest.fixture
def primary(tmp_path, make_server):
    """A fresh 4 MiB primary, served.  Returns the Server."""
    def make(size="4M", *extra):
        st = tmp_path / "state"
        prepl("init", st, "--volume", tmp_path / "vol.img", "--size", size, *extra)
        return make_server(st).start()
    return make


def served_pair(tmp_path, make_server, size):
    """A primary and a secondary of the same geometry (both created empty),
    each served; returns (primary, secondary) Servers."""
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img", "--size", str(size))
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(size),
          "--role", "secondary")
    return make_server(tmp_path / "p").start(), make_server(tmp_path / "s").start()


def stop_process(proc, timeout=10):
    """SIGTERM, then SIGKILL after timeout; always reaps it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dump_maps(server):
    return server.ctl("maps")


def runs_to_set(runs):
    return {i for s, n in runs for i in range(s, s + n)}


def read_json(text):
    return json.loads(text)
