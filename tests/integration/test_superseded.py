"""A superseded primary knows it (replication/roles.py): once its agent
meets the node promoted from it, or `prepl serve` probes a link's
secondary address and finds it promoted, the old primary records that
durably and export "" refuses writes (snapshots stay readable) until a
failback, or `prepl serve --force`.  Agents of a superseded primary stop
with exit 5."""
import os
import socket
import subprocess
import time

import nbd
import pytest

from replication import roles
from tests.conftest import PREPL, ENV, REPO, meta_json, prepl
from tests.integration.test_failover import SIZE, failover, replicated_pair


def agent_once(prim, sec, check=False):
    return prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}",
                 "--once", "--timeout", "20", check=check)


def assert_fenced(prim, image_before):
    """New connections to "" are read-only, the volume is unchanged."""
    h = prim.connect()
    assert h.is_read_only()
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, 0)
    assert "not permitted" in str(e.value)      # EPERM: NBD's error for a read-only export
    assert h.pread(SIZE, 0) == image_before


def test_the_agent_meets_the_promoted_node(tmp_path, make_server):
    # a whole snapshot: snap/CURSOR is read whole below
    prim, sec, image = replicated_pair(tmp_path, make_server, "--whole-snapshot")
    old = prim.connect()                 # a client connected before it learns
    before_meta = meta_json(prim.state)
    failover(sec)
    vol = prim.connect().pread(SIZE, 0)
    r = agent_once(prim, sec)
    assert r.returncode == 5, r.stderr
    assert "was promoted from this primary" in r.stderr and "prepl failback" in r.stderr
    m = meta_json(prim.state)
    sup = m["superseded"]
    assert sup["by_volume_uuid"] == meta_json(sec.state)["volume_uuid"]
    assert sup["generation"] == meta_json(sec.state)["generation"] == 2
    assert sup["divergence"] == meta_json(sec.state)["promoted"]["divergence"]
    assert (sup["learned_by"], sup["link"]) == ("agent", "default")
    assert m["intervals"] == before_meta["intervals"]      # nothing else changed
    # the connection opened before: its writes fail now, its reads work
    with pytest.raises(nbd.Error) as e:
        old.pwrite(b"y" * 4096, 0)
    assert "not permitted" in str(e.value)      # EROFS travels as NBD's EPERM
    assert old.pread(SIZE, 0) == vol
    assert_fenced(prim, vol)
    st = prim.ctl("status")
    assert st["superseded"] == sup and st["read_only"] is True
    out = prepl("status", prim.state).stdout
    assert "SUPERSEDED" in out and "read-only" in out and "prepl failback" in out
    # snapshots are served as before
    cursor = st["links"]["default"]["cursor"]
    assert prim.connect(f"snap/{cursor}").pread(SIZE, 0) == image
    # a second agent run refuses at once, without asking the peer
    r = agent_once(prim, sec)
    assert r.returncode == 5 and "is superseded" in r.stderr
    # it stays superseded across a restart
    prim.stop()
    prim.start()
    assert_fenced(prim, vol)


@pytest.mark.slow
def test_the_agent_daemon_stops_with_exit_5(tmp_path, make_server):
    prim, sec, image = replicated_pair(tmp_path, make_server)
    failover(sec)
    p = subprocess.run(PREPL + ["agent", prim.state, "--secondary",
                                f"nbd+unix:///?socket={sec.sock}", "--interval", "1"],
                       env=ENV, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 5, p.stderr
    assert "prepl failback" in p.stderr
    assert meta_json(prim.state)["superseded"] is not None


def test_serve_probes_the_links_and_force_overrides(tmp_path, make_server):
    prim, sec, image = replicated_pair(tmp_path, make_server)
    prim.kill()                          # the old primary dies
    failover(sec)
    prim.start()                         # restarted: the probe finds the promoted node
    m = meta_json(prim.state)
    assert m["superseded"]["learned_by"] == "probe"
    assert m["superseded"]["by_volume_uuid"] == meta_json(sec.state)["volume_uuid"]
    vol = prim.connect().pread(SIZE, 0)
    assert_fenced(prim, vol)
    prim.stop()
    # --force: read-write, with a warning; the record stays
    prim.extra = ["--force"]
    prim.start()
    h = prim.connect()
    assert not h.is_read_only()
    h.pwrite(b"f" * 4096, 0)
    h.flush()
    st = prim.ctl("status")
    assert st["read_only"] is False and st["superseded"] is not None
    assert "split brain" in (tmp_path / "server0.log").read_text()


@pytest.mark.slow
def test_a_silent_peer_does_not_block_the_start(tmp_path, make_server):
    prim, sec, image = replicated_pair(tmp_path, make_server)
    prim.stop()
    sec.stop()
    # something listens at the secondary's address and never answers
    os.unlink(sec.sock)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sec.sock))
    s.listen(1)
    try:
        t0 = time.monotonic()
        prim.start()
        assert time.monotonic() - t0 < roles.PROBE_TIMEOUT + 5
    finally:
        s.close()
    assert meta_json(prim.state)["superseded"] is None
    h = prim.connect()
    assert not h.is_read_only()
    assert "could not ask" in (tmp_path / "server0.log").read_text()
