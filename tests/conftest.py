"""Shared fixtures.  Every process a test starts is stopped by PID in a
finalizer, even when the test fails; mounts and loop devices likewise."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from replication import nbdkit_bin  # noqa: E402
from tests.harness.servers import ForegroundServer, wait_for  # noqa: E402,F401  (wait_for: for tests)

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


class Server(ForegroundServer):
    """A real `prepl serve` (nbdkit + our plugin) on a unix socket, run as
    the tests run the CLI (tests/harness/servers.py)."""

    def __init__(self, state, sock, log):
        super().__init__(state, sock, log, prepl=PREPL, env=ENV, cwd=REPO)


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
def small_fs(tmp_path):
    """A 1.5 MiB tmpfs (for full-disk tests), unmounted at the end."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k,mode=0700", "tmpfs", d],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=True)


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


def export_chunks(srv, size, export="", chunk=8 << 20):
    """The first size bytes of export of server srv, read over NBD chunk
    bytes at a time (a request may be at most 64 MiB)."""
    h = srv.connect(export)
    try:
        for off in range(0, size, chunk):
            yield h.pread(min(chunk, size - off), off)
    finally:
        h.shutdown()


def read_export(srv, size, export=""):
    """The first size bytes of export of server srv."""
    return b"".join(export_chunks(srv, size, export))


def export_sha(srv, size, export="", chunk=8 << 20):
    """SHA-256 (hex) of the first size bytes of export of server srv."""
    d = hashlib.sha256()
    for data in export_chunks(srv, size, export, chunk):
        d.update(data)
    return d.hexdigest()


def dump_maps(server):
    return server.ctl("maps")


def runs_to_set(runs):
    return {i for s, n in runs for i in range(s, s + n)}


def read_json(text):
    return json.loads(text)


def meta_json(state):
    """The metadata body of state directory `state` as meta.json holds it:
    its JSON, read here and not by the code under test, so a test compares
    what a server shows against the file itself (read_meta() must accept
    the file too)."""
    from replication.state import StateDir
    StateDir(state).read_meta()
    with open(os.path.join(state, "meta.json")) as f:
        return json.load(f)["body"]
