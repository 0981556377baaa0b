"""The agent as a daemon: `prepl sync` returns once a cycle is applied, a
second agent for the same link is refused, --max-dirty and --max-writes
start a cycle by themselves, and `prepl sync` without an agent says so
(exit 3); the agent runs at niceness 10 unless told otherwise."""
import json
import subprocess

import pytest

from replication.state import StateDir
from tests.conftest import stop_process, served_pair, ENV, PREPL, REPO, prepl, wait_for

MiB = 1 << 20


@pytest.mark.slow
def test_agent_daemon(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, "32M")
    r = prepl("sync", prim.state, check=False)
    assert r.returncode == 3 and "no agent is running" in r.stderr
    uri = f"nbd+unix:///?socket={sec.sock}"
    a = subprocess.Popen(PREPL + ["agent", prim.state, "--secondary", uri, "--interval", "3600",
                                  "--max-dirty", "4M", "--max-writes", "300"],
                         env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        h = prim.connect()

        def applied():
            d = json.loads(sec.connect("info").pread(4096, 0).split(b"\0", 1)[0])
            return d["applied"]
        wait_for(applied, 30, "the first cycle")
        # the agent runs at niceness 10 (--nice's default), read from the kernel
        with open(f"/proc/{a.pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[16]) == 10
        r = prepl("agent", prim.state, "--secondary", uri, "--once", check=False)
        assert r.returncode == 4 and "another agent" in r.stderr
        h.pwrite(b"s" * MiB, 0)
        out = prepl("sync", prim.state).stdout
        assert "applied" in out
        assert sec.connect().pread(MiB, 0) == b"s" * MiB
        # --max-dirty: 6 MiB written, no sync asked, the agent cycles by itself
        before = applied()["target"]["seq"]
        h.pwrite(b"d" * 6 * MiB, 8 * MiB)
        wait_for(lambda: applied()["target"]["seq"] > before, 30, "a --max-dirty cycle")
        assert sec.connect().pread(6 * MiB, 8 * MiB) == b"d" * 6 * MiB
        # --max-writes: 400 small writes (far below 4M), the agent cycles again
        before = applied()["target"]["seq"]
        for i in range(400):
            h.pwrite(b"w" * 512, (i % 64) * 4096)
        wait_for(lambda: applied()["target"]["seq"] > before, 30, "a --max-writes cycle")
        # the secondary applies before the agent records the cycle: wait for that
        wait_for(lambda: StateDir(prim.state).read_meta().links["default"].cursor
                 == applied()["target"]["name"], 30, "the agent to record its cycle")
    finally:
        stop_process(a)
