"""prepl failback (replication/roles.py): the old primary becomes the
promoted node's secondary; the new primary's next cycle sends exactly the
union of its changes since the failover and the old primary's writes after
the divergence point, through the ordinary staging and atomic apply.  A
split brain is refused both ways until --discard-my-data names the loser."""
import random
import time

import pytest

from replication import divergence, writeclock
from tests.conftest import meta_json, prepl
from tests.integration.test_failover import SIZE, failover, replicated_pair

BS = 4096


def uri(srv):
    return f"nbd+unix:///?socket={srv.sock}"


def write_random(srv, n, seed):
    """n random 4-64 KiB writes; returns the set of blocks written."""
    h = srv.connect()
    rnd = random.Random(seed)
    blocks = set()
    for _ in range(n):
        k = rnd.randrange(1, 17)
        b = rnd.randrange(SIZE // BS - k)
        h.pwrite(rnd.randbytes(k * BS), b * BS)
        blocks |= set(range(b, b + k))
    h.flush()
    return blocks


def agent(prim, sec, check=True):
    return prepl("agent", prim.state, "--secondary", uri(sec), "--once", "--timeout", "30",
                 check=check)


def failback(srv, peer, *args, check=True):
    return prepl("failback", srv.state, "--peer", uri(peer), *args, check=check)


def wait_out_the_clock_margin():
    """Until the old primary's last write is provably before a failover."""
    time.sleep(writeclock.PERIOD + divergence.CLOCK_MARGIN + 0.5)


def last_cycle_bytes(srv):
    c = srv.ctl("status")["links"]["default"]["last_cycle"]
    return c["bytes"] + c["zero_bytes"]


def test_failback_sends_exactly_the_union(tmp_path, make_server):
    a, b, image = replicated_pair(tmp_path, make_server)
    late = write_random(a, 5, seed=11) | {0}       # replicated_pair wrote block 0 late too
    a.stop()                                       # the old primary stops
    wait_out_the_clock_margin()
    failover(b)
    new = write_random(b, 20, seed=12)             # the new primary is written
    a.start()                                      # comes back: finds itself superseded
    assert meta_json(a.state)["superseded"]["learned_by"] == "probe"
    old_image = a.connect().pread(SIZE, 0)
    r = failback(a, b, "--json")
    import json
    rep = json.loads(r.stdout)
    assert rep["blocks"] == len(late) and rep["split_brain"] is False
    assert rep["bytes"] == len(late) * BS
    # a secondary now: "" is its own old image, read-only, until the cycle applies
    h = a.connect()
    assert h.is_read_only() and h.pread(SIZE, 0) == old_image
    m = meta_json(a.state)
    assert m["role"] == "secondary" and m["failback"]["blocks"] == len(late)
    assert m["bound"]["primary_uuid"] == meta_json(b.state)["volume_uuid"]
    assert m["links"] == {} and m["snappoints"] == [] and m["superseded"] is None
    assert "failback:   pending" in prepl("status", a.state).stdout
    r = agent(a, b, check=False)                   # its own agent stops: it is a secondary
    assert r.returncode == 5 and "is a secondary now" in r.stderr
    # the new primary's ordinary agent makes the failback cycle
    agent(b, a)
    want = b.connect().pread(SIZE, 0)
    assert a.connect().pread(SIZE, 0) == want
    assert last_cycle_bytes(b) == len(late | new) * BS      # exactly the union
    m = meta_json(a.state)
    assert m["failback"] is None and m["applied"]["target"]["name"].startswith("default.")
    assert [f for f in (tmp_path / "p" / "maps").iterdir() if "divergence" in f.name] == []
    # periodic replication goes on, incrementally
    more = write_random(b, 3, seed=13)
    agent(b, a)
    assert a.connect().pread(SIZE, 0) == b.connect().pread(SIZE, 0)
    assert last_cycle_bytes(b) == len(more) * BS
    assert "failback" not in [sp["name"] for sp in b.ctl("snappoint_list")]
    # failing back again finishes nothing more: it says so
    applied = meta_json(a.state)["applied"]
    r = failback(a, b)
    assert "(already)" in r.stdout and meta_json(a.state)["applied"] == applied


@pytest.mark.slow
def test_a_crashed_old_primary_fails_back_without_the_flag(tmp_path, make_server):
    a, b, image = replicated_pair(tmp_path, make_server)
    write_random(a, 5, seed=21)
    a.kill()                                       # killed before the failover
    wait_out_the_clock_margin()
    failover(b)
    write_random(b, 5, seed=22)
    a.start()                                      # recovers; found superseded by the probe
    assert a.connect().is_read_only()
    import json
    rep = json.loads(failback(a, b, "--json").stdout)
    assert rep["split_brain"] is False and rep["activity_log_extents"] > 0
    agent(b, a)
    assert a.connect().pread(SIZE, 0) == b.connect().pread(SIZE, 0)


@pytest.mark.slow
@pytest.mark.parametrize("loser", ["old", "promoted"])
def test_split_brain_is_refused_both_ways_until_a_loser_is_named(tmp_path, make_server,
                                                                 loser):
    a, b, image = replicated_pair(tmp_path, make_server)
    failover(b, "--peer", uri(a), "--force")       # a keeps serving: split brain
    write_random(a, 4, seed=31)
    write_random(b, 4, seed=32)
    a_img, b_img = a.connect().pread(SIZE, 0), b.connect().pread(SIZE, 0)
    # neither side replicates to the other
    r = agent(a, b, check=False)
    assert r.returncode == 5 and "prepl failback" in r.stderr
    r = agent(b, a, check=False)
    assert r.returncode == 5 and "is a primary" in r.stderr
    # failback refuses on either side without the flag, naming both sides' writes
    for srv, peer in ((a, b), (b, a)):
        before = (tmp_path / ("p" if srv is a else "s") / "meta.json").read_bytes()
        r = failback(srv, peer, check=False)
        assert r.returncode == 5, r.stderr
        assert "split brain" in r.stderr and "--discard-my-data" in r.stderr
        assert "bytes after the divergence point" in r.stderr and "since the failover" in r.stderr
        assert (tmp_path / ("p" if srv is a else "s") / "meta.json").read_bytes() == before
    assert (a.connect().pread(SIZE, 0), b.connect().pread(SIZE, 0)) == (a_img, b_img)
    assert a.connect().is_read_only()              # a: superseded, as its agent learned
    assert not b.connect().is_read_only()          # b: the promoted node still serves
    if loser == "old":
        failback(a, b, "--discard-my-data")
        agent(b, a)
        assert a.connect().pread(SIZE, 0) == b.connect().pread(SIZE, 0) == b_img
    else:
        failback(b, a, "--discard-my-data")
        assert b.connect().is_read_only()
        agent(a, b)                                # a is reinstated and replicates
        assert meta_json(a.state)["superseded"] is None
        assert not a.connect().is_read_only()
        assert a.connect().pread(SIZE, 0) == b.connect().pread(SIZE, 0) == a_img


def test_refusals_change_nothing(tmp_path, make_server):
    a, b, image = replicated_pair(tmp_path, make_server)
    prepl("init", tmp_path / "o", "--volume", tmp_path / "o.img", "--size", str(SIZE))
    other = make_server(tmp_path / "o").start()
    before = (tmp_path / "p" / "meta.json").read_bytes()
    # a peer of another volume, never promoted
    r = failback(a, other, check=False)
    assert r.returncode == 5 and "never promoted" in r.stderr
    # the peer is a secondary that was never promoted
    r = failback(a, b, check=False)
    assert r.returncode == 5 and "no prepl primary" in r.stderr
    assert (tmp_path / "p" / "meta.json").read_bytes() == before
    assert not a.connect().is_read_only()          # writes were unfenced again
    a.connect().pwrite(b"w" * BS, 0)
