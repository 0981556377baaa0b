"""prepl failover (replication/roles.py): a running secondary becomes a
primary in place; export "" at the same address is then the read-write,
tracked volume holding exactly the image of the last applied interval.
Refusals (exit 5) change nothing; a failed or interrupted failover leaves
a secondary that a second one promotes."""
import os
import random

import pytest

from tests.conftest import meta_json, prepl, served_pair
from tests.integration.test_stale_staging import Staging

MiB = 1 << 20
SIZE = 8 * MiB


def agent(prim, sec, *extra):
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once",
          "--timeout", "20", *extra)


def replicated_pair(tmp_path, make_server, *agent_args):
    """A pair with one interval applied and more writes on the primary after
    it; returns (primary, secondary, the replica's image).  agent_args go
    to the agent (e.g. --whole-snapshot)."""
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    h = prim.connect()
    rnd = random.Random(3)
    for _ in range(30):
        h.pwrite(rnd.randbytes(rnd.randrange(1, 5) * 4096), rnd.randrange(SIZE // 4096 - 4) * 4096)
    h.flush()
    agent(prim, sec, *agent_args)
    cursor = prim.ctl("status")["links"]["default"]["cursor"]
    assert cursor
    image = prim.connect().pread(SIZE, 0)    # nothing written since the cycle's snappoint
    h.pwrite(b"late" * 1024, 0)          # never replicated
    h.flush()
    assert sec.connect().pread(SIZE, 0) == image != prim.connect().pread(SIZE, 0)
    return prim, sec, image


def failover(sec, *args, check=True):
    return prepl("failover", sec.state, *args, check=check)


def test_failover_serves_the_replica_read_write_and_tracked(tmp_path, make_server):
    prim, sec, image = replicated_pair(tmp_path, make_server)
    before = meta_json(sec.state)
    r = failover(sec)
    assert r.returncode == 0 and "was not checked" in r.stderr
    assert "is a primary now (generation 2)" in r.stdout
    h = sec.connect()                                   # the same address
    assert not h.is_read_only()
    assert h.pread(SIZE, 0) == image                    # the last applied interval
    h.pwrite(b"n" * 4096, 65536)
    h.flush()
    st = sec.ctl("status")
    assert (st["role"], st["generation"]) == ("primary", before["generation"] + 1)
    assert {k: type(v) for k, v in st["promoted"].items()} == \
        {"from_volume_uuid": str, "divergence": dict, "at": float, "generation": int,
         "planned": bool}
    assert st["promoted"]["from_volume_uuid"] == meta_json(prim.state)["volume_uuid"]
    assert st["promoted"]["divergence"] == before["applied"]["target"]
    assert [sp["name"] for sp in st["snappoints"]] == ["failback"]
    assert st["open_interval"]["changed_blocks"] == 1   # writes are tracked from the failover
    after = meta_json(sec.state)
    assert after["role"] == "primary" and after["staging"] is None
    assert after["tracked_since_empty"] is False
    # a primary in every way: snappoints with snapshots
    sec.ctl("snappoint_create", name="after")
    assert sec.connect("snap/after").pread(4096, 65536) == b"n" * 4096
    # and it stays one across a restart
    sec.stop()
    sec.start()
    h = sec.connect()
    assert not h.is_read_only() and h.pread(4096, 65536) == b"n" * 4096
    assert sec.ctl("status")["role"] == "primary"


def test_refusals_change_nothing(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    for srv, msg in ((prim, "is a primary already"), (sec, "never applied an interval")):
        before = (tmp_path / os.path.basename(srv.state) / "meta.json").read_bytes()
        r = failover(srv, check=False)
        assert r.returncode == 5 and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert (tmp_path / os.path.basename(srv.state) / "meta.json").read_bytes() == before
    assert sec.connect().is_read_only()


@pytest.mark.slow
def test_peer_still_serving_refuses_unless_forced(tmp_path, make_server):
    prim, sec, image = replicated_pair(tmp_path, make_server)
    peer = f"nbd+unix:///?socket={prim.sock}"
    before = (tmp_path / "s" / "meta.json").read_bytes()
    r = failover(sec, "--peer", peer, check=False)
    assert r.returncode == 5 and "still serves" in r.stderr and "--force" in r.stderr
    assert (tmp_path / "s" / "meta.json").read_bytes() == before
    assert sec.connect().is_read_only()
    # a peer that serves another volume is a wrong --peer, not the old primary
    prepl("init", tmp_path / "o", "--volume", tmp_path / "o.img", "--size", str(SIZE))
    other = make_server(tmp_path / "o").start()
    r = failover(sec, "--peer", f"nbd+unix:///?socket={other.sock}", check=False)
    assert r.returncode == 5 and "wrong --peer" in r.stderr
    assert (tmp_path / "s" / "meta.json").read_bytes() == before
    r = failover(sec, "--peer", peer, "--force")
    assert r.returncode == 0 and "split brain" in r.stderr
    assert sec.connect().pread(SIZE, 0) == image


def test_peer_stopped_or_unreachable(tmp_path, make_server):
    prim, sec, image = replicated_pair(tmp_path, make_server)
    prim.stop()
    r = failover(sec, "--peer", f"nbd+unix:///?socket={prim.sock}")
    assert r.returncode == 0 and "does not answer" in r.stderr
    assert sec.connect().pread(SIZE, 0) == image


def test_an_incomplete_staging_is_discarded(tmp_path, make_server):
    prim, sec, image = replicated_pair(tmp_path, make_server)
    prim.ctl("snappoint_create", name="x")
    applied = meta_json(sec.state)["applied"]["target"]["seq"]
    part = Staging(prim, sec, "stage", applied, "x")
    part.send(slice(0, 2))                               # half sent, never committed
    assert meta_json(sec.state)["staging"]["state"] == "receiving"
    failover(sec)
    assert sec.connect().pread(SIZE, 0) == image
    assert meta_json(sec.state)["staging"] is None
    assert not os.path.exists(tmp_path / "s" / "staging" / "data.bmap")


@pytest.mark.slow
@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
def test_a_failed_record_leaves_a_secondary(tmp_path, make_server, err):
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img", "--size", str(SIZE))
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    prim = make_server(tmp_path / "p").start()
    sec = make_server(tmp_path / "s")
    sec.env = {"PREPL_FAULT_FILE": str(tmp_path / "faults")}
    sec.start()
    prim.connect().pwrite(b"a" * 65536, 0)
    agent(prim, sec)
    image = sec.connect().pread(SIZE, 0)
    before = (tmp_path / "s" / "meta.json").read_bytes()
    maps = sorted(os.listdir(tmp_path / "s" / "maps"))
    (tmp_path / "faults").write_text(f"meta.write {err}\n")
    r = failover(sec, check=False)
    assert r.returncode == 1 and os.strerror(getattr(__import__("errno"), err)) in r.stderr
    assert (tmp_path / "s" / "meta.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "s" / "maps")) == maps     # no files left behind
    assert sec.connect().is_read_only() and sec.ctl("status")["role"] == "secondary"
    failover(sec)                                        # the fault is used up
    h = sec.connect()
    assert not h.is_read_only() and h.pread(SIZE, 0) == image


@pytest.mark.parametrize("point", ["secondary.failover.before_record",
                                   "secondary.failover.recorded"])
@pytest.mark.slow
def test_a_crash_in_the_failover(tmp_path, make_server, point):
    """Before the record: a secondary, and failover again works; after it:
    the restarted server serves a primary."""
    prim, sec, image = replicated_pair(tmp_path, make_server)
    sec.stop()
    sec.env = {"PREPL_FAULT": point}
    sec.start()
    r = failover(sec, check=False)
    assert r.returncode != 0
    sec.proc.wait(10)
    sec.env = {}
    sec.start()
    recorded = point.endswith("recorded")
    assert sec.ctl("status")["role"] == ("primary" if recorded else "secondary")
    if not recorded:
        failover(sec)
    h = sec.connect()
    assert not h.is_read_only() and h.pread(SIZE, 0) == image
    r = failover(sec, check=False)                       # a second failover is refused
    assert r.returncode == 5 and "is a primary already" in r.stderr


@pytest.mark.slow
def test_the_old_primarys_agent_is_refused_by_the_promoted_node(tmp_path, make_server):
    prim, sec, image = replicated_pair(tmp_path, make_server)
    failover(sec)
    r = prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once",
              "--timeout", "20", check=False)
    assert r.returncode == 5 and "was promoted from this primary by a failover (generation 2)" \
        in r.stderr
    assert sec.connect().pread(SIZE, 0) == image         # nothing reached it
