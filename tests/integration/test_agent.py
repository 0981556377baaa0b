"""`prepl agent --once` between a real primary and a real secondary server:
the replica equals the primary (quiesced) after each run; an empty pair
skips the initial sync and sends only what was written; a non-empty
primary gets a full initial sync; wrong peers are refused (exit 5)."""
import json
import os
import random
import subprocess

import pytest

from replication.state import StateDir
from tests.conftest import ENV, PREPL, REPO, prepl, wait_for

MiB = 1 << 20


def make_pair(tmp_path, make_server, psize="16M", ssize="16M", prefill=None, sargs=()):
    pvol = tmp_path / "p.img"
    if prefill is not None:
        pvol.write_bytes(prefill)
        prepl("init", tmp_path / "p", "--volume", pvol)
    else:
        prepl("init", tmp_path / "p", "--volume", pvol, "--size", psize)
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", ssize,
          "--role", "secondary", *sargs)
    return make_server(tmp_path / "p").start(), make_server(tmp_path / "s").start()


def agent_once(prim, sec, *extra, check=True):
    return prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}",
                 "--once", "--timeout", "20", *extra, check=check)


def test_empty_pair_replicates_changes_only(tmp_path, make_server):
    prim, sec = make_pair(tmp_path, make_server)
    h = prim.connect()
    rnd = random.Random(3)
    written = set()
    for _ in range(40):
        off = rnd.randrange(16 * MiB // 4096) * 4096
        h.pwrite(rnd.randbytes(4096), off)
        written.add(off)
    h.flush()
    agent_once(prim, sec)
    assert sec.connect().pread(16 * MiB, 0) == h.pread(16 * MiB, 0)
    link = StateDir(prim.state).read_meta().links["default"]
    assert link.last_cycle["full"] is False
    assert link.last_cycle["bytes"] == 4096 * len(written)     # I3: only what changed
    # ... and counted outside the agent: what the secondary staged (its receipt)
    seq = json.loads(sec.connect("info").pread(4096, 0).split(b"\0", 1)[0])["applied"]
    receipt = json.loads(sec.connect(f"commit/{seq['target']['seq']}").pread(65536, 0)
                         .split(b"\0", 1)[0])["receipt"]
    assert receipt["bytes"] == 4096 * len(written) and receipt["zero_bytes"] == 0
    for _ in range(3):
        h.pwrite(rnd.randbytes(100000), rnd.randrange(15 * MiB))
        h.zero(2 * MiB, 4 * MiB)
        agent_once(prim, sec)
        assert sec.connect().pread(16 * MiB, 0) == h.pread(16 * MiB, 0)
    snaps = prim.ctl("status")["snappoints"]
    assert len(snaps) == 1 and snaps[0]["snapshot"] == "valid"     # old cursors retired
    assert StateDir(prim.state).read_meta().links["default"].cursor == snaps[0]["name"]


def test_initial_sync_of_a_volume_with_data(tmp_path, make_server):
    data = random.Random(4).randbytes(8 * MiB)
    prim, sec = make_pair(tmp_path, make_server, prefill=data, ssize="8M")
    prim.connect().pwrite(b"x" * 5000, 12345)
    agent_once(prim, sec)
    link = StateDir(prim.state).read_meta().links["default"]
    assert link.last_cycle["full"] is True
    assert sec.connect().pread(8 * MiB, 0) == prim.connect().pread(8 * MiB, 0)


def test_nice_out_of_range_is_a_usage_error(tmp_path, make_server):
    prim, sec = make_pair(tmp_path, make_server)
    r = agent_once(prim, sec, "--nice", "25", check=False)
    assert r.returncode == 2 and "--nice" in r.stderr
    r = agent_once(prim, sec, "--nice", "0")       # normal priority: works as well
    assert sec.connect().pread(16 * MiB, 0) == prim.connect().pread(16 * MiB, 0)


def test_max_in_flight(tmp_path, make_server):
    prim, sec = make_pair(tmp_path, make_server)
    for bad in ("1K", "0", "lots"):
        r = agent_once(prim, sec, "--max-in-flight", bad, check=False)
        assert r.returncode == 2 and "--max-in-flight" in r.stderr, r.stderr
    assert StateDir(prim.state).read_meta().links.get("default") is None
    # the smallest window: one 4 KiB batch at a time, still the whole interval
    h = prim.connect()
    rnd = random.Random(11)
    for _ in range(50):
        h.pwrite(rnd.randbytes(4096 * rnd.randint(1, 3)),
                 rnd.randrange(16 * MiB // 4096 - 3) * 4096)
    agent_once(prim, sec, "--max-in-flight", "4K")
    assert sec.connect().pread(16 * MiB, 0) == prim.connect().pread(16 * MiB, 0)


def test_wrong_geometry_is_refused(tmp_path, make_server):
    prim, sec = make_pair(tmp_path, make_server, ssize="32M")
    r = agent_once(prim, sec, check=False)
    assert r.returncode == 5 and "geometry" in r.stderr
    info = json.loads(sec.connect("info").pread(4096, 0).split(b"\0", 1)[0])
    assert info["bound"] is None and info["applied"] is None


@pytest.mark.slow
def test_replica_of_another_volume_is_refused(tmp_path, make_server):
    prim, sec = make_pair(tmp_path, make_server)
    agent_once(prim, sec)
    other = tmp_path / "other"
    other.mkdir()
    prepl("init", other / "p", "--volume", other / "p.img", "--size", "16M")
    prim2 = make_server(other / "p").start()
    before = sec.connect().pread(16 * MiB, 0)
    r = agent_once(prim2, sec, check=False)
    assert r.returncode == 5 and "bound to another volume" in r.stderr
    assert sec.connect().pread(16 * MiB, 0) == before


@pytest.mark.slow
def test_commit_survives_a_secondary_restart_after_the_transfer(tmp_path, make_server,
                                                                caplog):
    """The commit's connection is opened while the transfer runs.  When the
    secondary restarts between the transfer and the commit, that connection
    is dead: the agent commits on a new one (commits are idempotent), and
    the replica equals the snapshot."""
    from replication.agent import Agent
    prim, sec = make_pair(tmp_path, make_server)
    agent_once(prim, sec)
    h = prim.connect()
    rnd = random.Random(12)
    for _ in range(30):
        h.pwrite(rnd.randbytes(8192), rnd.randrange(16 * MiB // 4096 - 2) * 4096)
    h.flush()
    a = Agent(prim.state, f"nbd+unix:///?socket={sec.sock}",
              primary_uri=f"nbd+unix:///?socket={prim.sock}")
    transfer = a._transfer

    def transfer_then_restart(*args):
        out = transfer(*args)
        sec.stop()             # a clean stop: the staging stays, the connection goes
        sec.start()
        return out
    a._transfer = transfer_then_restart
    caplog.set_level("INFO", logger="replication.agent")
    receipt = a.cycle()
    assert receipt.target.name
    assert sec.connect().pread(16 * MiB, 0) == prim.connect().pread(16 * MiB, 0)   # quiesced
    assert "commit on the early connection failed" in caplog.text     # the path taken


def test_cycle_of_zeroes_only(tmp_path, make_server):
    """An interval that only zeroed blocks: its batches carry no data (the
    pack export is empty), and the zeroes reach the replica."""
    data = random.Random(13).randbytes(16 * MiB)
    prim, sec = make_pair(tmp_path, make_server, prefill=data)
    agent_once(prim, sec)                               # initial sync
    h = prim.connect()
    h.zero(3 * MiB, 5 * MiB)
    h.zero(4096, 12 * MiB)
    h.flush()
    agent_once(prim, sec)
    link = StateDir(prim.state).read_meta().links["default"]
    assert link.last_cycle["bytes"] == 0
    assert link.last_cycle["zero_bytes"] == 3 * MiB + 4096
    assert sec.connect().pread(16 * MiB, 0) == prim.connect().pread(16 * MiB, 0)


def test_only_the_new_snappoint_keeps_a_snapshot_during_a_cycle(tmp_path, make_server):
    """Once a cycle's snappoint is taken, the link's previous one (the
    cursor) is dataless: a write during the transfer copies its old data
    into one snapshot, not two.  The agent is stopped (a crash) with its
    receipt in hand, before the cursor moves, and the state is looked at
    there; the replica is still exactly snap/default.2, and the next cycle
    goes on from it."""
    prim, sec = make_pair(tmp_path, make_server)
    h = prim.connect()
    rnd = random.Random(8)
    h.pwrite(rnd.randbytes(MiB), 0)
    agent_once(prim, sec)                      # cursor default.1, with its snapshot
    h.pwrite(rnd.randbytes(MiB), 4 * MiB)
    r = subprocess.run(PREPL + ["agent", str(prim.state), "--secondary",
                                f"nbd+unix:///?socket={sec.sock}", "--once", "--timeout", "20",
                                "--whole-snapshot"],          # snap/default.2 read whole
                       env=dict(ENV, PREPL_FAULT="agent.after_receipt"), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stderr
    snaps = {sp["name"]: sp for sp in prim.ctl("snappoint_list")}
    assert StateDir(prim.state).read_meta().links["default"].cursor == "default.1"
    assert snaps["default.1"]["snapshot"] == "none" and snaps["default.1"]["export"] is None
    assert snaps["default.2"]["snapshot"] == "valid"
    assert sec.connect().pread(16 * MiB, 0) == prim.connect("snap/default.2").pread(16 * MiB, 0)
    copied = snaps["default.2"]["copied_blocks"]
    h.pwrite(rnd.randbytes(8192), 8 * MiB)        # copied into default.2 alone
    after = {sp["name"]: sp for sp in prim.ctl("snappoint_list")}
    assert after["default.2"]["copied_blocks"] == copied + 2
    assert after["default.1"]["copied_blocks"] == 0
    assert len(os.listdir(os.path.join(prim.state, "snaps"))) == 1   # default.2's image
    # default.1's image went to the trash at once, and a background thread
    # freed it there
    wait_for(lambda: not os.listdir(os.path.join(prim.state, "trash")), 10, "an empty trash")
    agent_once(prim, sec)
    assert sec.connect().pread(16 * MiB, 0) == h.pread(16 * MiB, 0)
    assert [sp["name"] for sp in prim.ctl("snappoint_list")] == ["default.3"]
