"""The secondary's NBD exports with real servers: staging through
stage/UUID/BASE/TARGET, commit through commit/TARGET, the replica on "",
the info document; opening and listing change nothing; bad input is
refused with the replica untouched."""
import json
import random
import subprocess

import nbd
import pytest

from replication import manifest
from replication.chain import union_runs
from replication.state import StateDir
from tests.conftest import ENV, prepl

SIZE = 8 << 20


def read_doc(srv, export):
    h = srv.connect(export)
    try:
        return json.loads(h.pread(h.get_size(), 0).split(b"\0", 1)[0])
    finally:
        h.shutdown()


def interval_runs(prim, base_seq, name):
    """(metadata, the interval NAME closes, the run list since base_seq)."""
    sd = StateDir(prim.state)
    body = sd.read_meta()
    target = body.closed_by(name)
    return body, target, union_runs(sd, body, base_seq, target.seq)


def commit(sec, body, base, target, name, d, tamper=None):
    """The manifest of a staged interval (digest d) into commit/TARGET;
    returns (manifest, reply)."""
    info = read_doc(sec, "info")
    m = {"version": manifest.MANIFEST_VERSION, "primary_uuid": body.volume_uuid,
         "replica_uuid": info["replica_uuid"], "size": body.size,
         "region_size": body.region_size, "block_size": body.block_size,
         "base": base, "target": {"seq": target.seq, "name": name},
         "extents": d.extents, "bytes": d.data_bytes, "digest": d.hexdigest()}
    if tamper:
        tamper(m)
    c = sec.connect(f"commit/{target.seq}")
    c.pwrite(json.dumps(m).encode(), 0)
    c.flush()
    reply = json.loads(c.pread(65536, 0).split(b"\0", 1)[0])
    c.shutdown()
    return m, reply


def ship(prim, sec, base, name, tamper=None):
    """One interval, the agent's way, with libnbd: snap/NAME -> staging,
    then the manifest into commit/TARGET; returns (manifest, reply)."""
    body, target, runs = interval_runs(prim, base["seq"] if base else None, name)
    src = prim.connect(f"snap/{name}")
    dst = sec.connect(f"stage/{body.volume_uuid}/{base['seq'] if base else 'none'}/"
                      f"{target.seq}")
    d = manifest.Digest()
    for off, n, z in manifest.pieces(runs):
        if z:
            dst.zero(n, off)
            d.add(off, n, True)
        else:
            buf = src.pread(n, off)
            dst.pwrite(buf, off)
            d.add(off, n, False, buf)
    dst.flush()
    return commit(sec, body, base, target, name, d, tamper)


@pytest.fixture
def pair(tmp_path, make_server):
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img", "--size", str(SIZE))
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    return make_server(tmp_path / "p").start(), make_server(tmp_path / "s").start()


def test_intervals_through_exports(pair):
    prim, sec = pair
    h = prim.connect()
    rnd = random.Random(5)
    base = None
    for i in range(3):
        for _ in range(30):
            h.pwrite(rnd.randbytes(rnd.randint(1, 50000)), rnd.randrange(SIZE - 50000))
        h.zero(65536, 1 << 20)
        prim.ctl("snappoint_create", name=f"s{i}")
        m, reply = ship(prim, sec, base, f"s{i}")
        assert reply["ok"], reply
        assert reply["receipt"]["target"] == m["target"]
        assert sec.connect().pread(SIZE, 0) == prim.connect(f"snap/s{i}").pread(SIZE, 0)
        # the receipt can be read again from a new connection (idempotent)
        assert read_doc(sec, f"commit/{m['target']['seq']}")["receipt"] == reply["receipt"]
        base = m["target"]
    info = read_doc(sec, "info")
    assert info["bound"]["primary_uuid"] == StateDir(prim.state).read_meta().volume_uuid
    assert info["applied"]["target"]["name"] == "s2"


def test_opening_and_listing_change_nothing(pair):
    prim, sec = pair
    before = read_doc(sec, "info")
    r = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sec.sock}"],
                       capture_output=True, text=True, env=ENV, check=True)
    assert [e["export-name"] for e in json.loads(r.stdout)["exports"]] == [""]
    uuid = StateDir(prim.state).read_meta().volume_uuid
    sec.connect(f"stage/{uuid}/none/0").shutdown()        # open, no write
    read_doc(sec, "commit/0")                              # not applied yet: no state
    assert read_doc(sec, "info") == before
    assert before["staging"] is None and before["bound"] is None


def test_replica_is_read_only_and_bad_exports_refused(pair):
    prim, sec = pair
    h = sec.connect()
    assert h.is_read_only()
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 0)
    for name in ("stage/x", "stage/a/b/c/d", "commit/abc", "nope", "snap/x"):
        with pytest.raises(nbd.Error):
            sec.connect(name)
    uuid = StateDir(prim.state).read_meta().volume_uuid
    with pytest.raises(nbd.Error):
        sec.connect(f"stage/{uuid}/7/8")                   # not after the last applied
    st = sec.connect(f"stage/{uuid}/none/0")
    with pytest.raises(nbd.Error):
        st.pwrite(b"x" * 100, 4096)                         # unaligned staging write


def test_bad_commits_leave_the_replica_untouched(pair):
    prim, sec = pair
    prim.connect().pwrite(b"a" * 100000, 0)
    prim.ctl("snappoint_create", name="s0")
    m0, reply = ship(prim, sec, None, "s0")        # an applied, bound replica ...
    assert reply["ok"]
    prim.connect().pwrite(b"b" * 100000, 0)
    prim.ctl("snappoint_create", name="s1")
    before = sec.connect().pread(SIZE, 0)
    for tamper, msg in ((lambda m: m.update(digest="0" * 64), "does not match"),
                        (lambda m: m.update(size=SIZE * 2), "geometry mismatch"),
                        (lambda m: m.update(primary_uuid="other"), "")):
        _, reply = ship(prim, sec, m0["target"], "s1", tamper)
        assert not reply["ok"] and msg in reply["error"]
        assert sec.connect().pread(SIZE, 0) == before   # ... stays as it was
    assert read_doc(sec, "info")["applied"]["target"] == m0["target"]
    c = sec.connect("commit/1")
    c.pwrite(b"{not json", 0)
    c.flush()
    assert "malformed" in json.loads(c.pread(4096, 0).split(b"\0", 1)[0])["error"]
