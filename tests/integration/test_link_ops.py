"""prepl link list|pause|resume|remove, and the chain behind a disconnected
link staying bounded while another link cycles."""
import json
import os
import subprocess
import time

import pytest

from replication.agent import Agent
from tests.conftest import ENV, PREPL, REPO, meta_json, prepl, served_pair, stop_process, \
    wait_for

SIZE = 4 << 20


def uri(srv):
    return f"nbd+unix:///?socket={srv.sock}"


@pytest.mark.slow
def test_pause_resume_remove(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    h = prim.connect()
    h.pwrite(b"a" * 4096, 0)
    h.flush()
    prepl("agent", prim.state, "--secondary", uri(sec), "--once")
    assert "default: idle" in prepl("link", "list", prim.state).stdout
    prepl("link", "pause", prim.state, "default")
    assert meta_json(prim.state)["links"]["default"]["paused"] is True
    h.pwrite(b"b" * 4096, 0)
    h.flush()
    r = prepl("agent", prim.state, "--secondary", uri(sec), "--once", check=False)
    assert r.returncode == 5 and "is paused" in r.stderr
    assert "PAUSED" in prepl("link", "list", prim.state).stdout
    assert prepl("check", prim.state, "--warn-rpo", "0.01", check=False).returncode == 0
    # a daemon waits while paused, and cycles once resumed
    daemon = subprocess.Popen(PREPL + ["agent", prim.state, "--secondary", uri(sec),
                                       "--interval", "0.5"], env=ENV, cwd=REPO,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        before = prim.ctl("status")["links"]["default"]["last_cycle"]
        time.sleep(2)
        assert daemon.poll() is None
        st = prim.ctl("status")["links"]["default"]
        assert st["last_cycle"] == before and st["rpo_seconds"] >= 2
        r = prepl("link", "remove", prim.state, "default", check=False)
        assert r.returncode == 5 and "stop it first" in r.stderr
        prepl("link", "resume", prim.state, "default")
        wait_for(lambda: prim.ctl("status")["links"]["default"]["last_cycle"] != before, 30,
                 "a cycle after resume")
        assert sec.connect().pread(4096, 0) == b"b" * 4096
    finally:
        stop_process(daemon)
    # remove: the link and the snappoints only it needed are gone
    prim.ctl("snappoint_create", name="mine", dataless=True)
    r = prepl("link", "remove", prim.state, "default")
    assert "snappoints freed: default." in r.stdout
    m = meta_json(prim.state)
    assert m["links"] == {} and [sp["name"] for sp in m["snappoints"]] == ["mine"]
    assert json.loads(prepl("link", "list", prim.state, "--json").stdout) == {}
    r = prepl("link", "pause", prim.state, "default", check=False)
    assert r.returncode == 4 or "no link named" in r.stderr


@pytest.mark.slow
def test_the_chain_behind_a_disconnected_link_stays_bounded(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    prepl("init", tmp_path / "s2", "--volume", tmp_path / "s2.img", "--size", str(SIZE),
          "--role", "secondary")
    sec2 = make_server(tmp_path / "s2").start()
    h = prim.connect()
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    Agent(prim.state, uri(sec), "a").cycle()
    sec.stop()                                     # link a: disconnected from now on
    b = Agent(prim.state, uri(sec2), "b")
    maps = os.path.join(prim.state, "maps")
    for i in range(500):
        h.pwrite(bytes([i % 256]) * 4096, 4096 * (1 + i % 200))
        h.flush()
        b.cycle()
        if i == 10:
            files_early = len(os.listdir(maps))
            meta_early = os.path.getsize(os.path.join(prim.state, "meta.json"))
    m = meta_json(prim.state)
    # a's cursor, b's cursor and the open interval: nothing else accumulates
    assert len(m["intervals"]) == 3, [iv["closed_by"] for iv in m["intervals"]]
    assert sorted(sp["name"] for sp in m["snappoints"]) == \
        sorted([m["links"]["a"]["cursor"], m["links"]["b"]["cursor"]])
    assert len(os.listdir(maps)) <= files_early
    assert os.path.getsize(os.path.join(prim.state, "meta.json")) <= meta_early + 2048
    # and link a still has every change since its cursor: a catch-up cycle equals b's image
    sec.start()
    Agent(prim.state, uri(sec), "a").cycle()
    assert sec.connect().pread(SIZE, 0) == sec2.connect().pread(SIZE, 0) == \
        prim.connect().pread(SIZE, 0)
