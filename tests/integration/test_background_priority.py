"""The agent's connections are background work (issue 14): a primary serves
snap/ and pack/ readers, and a secondary the agent's staging and commit
connections, on threads at niceness 10, while the volume's and the
replica's clients keep niceness 0.  Checked on real servers by reading each
new connection's threads' niceness from /proc while it is open."""
import json
import os

from replication import pack
from replication.chain import union_runs
from replication.state import StateDir
from tests.conftest import prepl, served_pair

MiB = 1 << 20
BACKGROUND = 10


def niceness(pid):
    """{tid: niceness} of the threads of process pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
        except FileNotFoundError:       # a thread that just ended
            pass
    return out


def new_threads(srv, export):
    """Niceness of the threads that a connection to export adds, read while
    it is open."""
    before = set(niceness(srv.pid))
    h = srv.connect(export)
    try:
        h.get_size()
        return sorted(n for tid, n in niceness(srv.pid).items() if tid not in before)
    finally:
        h.shutdown()


def test_agent_connections_run_at_background_priority(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, "8M")
    prim.connect().pwrite(b"x" * MiB, 0)
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once")
    body = StateDir(prim.state).read_meta()
    cursor = body.links["default"].cursor
    seq = body.closed_by(cursor).seq
    fp = pack.fingerprint(union_runs(StateDir(prim.state), body, None, seq))
    info = json.loads(sec.connect("info").pread(4096, 0).split(b"\0", 1)[0])
    applied = info["applied"]["target"]["seq"]
    for srv, export, want in (
            (prim, "", 0),
            (prim, f"snap/{cursor}", BACKGROUND),
            (prim, f"pack/{cursor}/none/{fp}", BACKGROUND),
            (sec, "", 0),
            (sec, f"stage/{body.volume_uuid}/{applied}/{applied + 1}", BACKGROUND),
            (sec, f"batch/{body.volume_uuid}/{applied}/{applied + 1}", BACKGROUND),
            (sec, f"commit/{applied}", BACKGROUND)):
        got = new_threads(srv, export)
        assert got and set(got) == {want}, (export, got)
    # opening the staging exports changed nothing: the next cycle applies
    prim.connect().pwrite(b"y" * MiB, 2 * MiB)
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once")
    assert sec.connect().pread(8 * MiB, 0) == prim.connect().pread(8 * MiB, 0)
