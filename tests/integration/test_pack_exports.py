"""The packed transfer's exports with real servers: the primary's
pack/NAME/BASE/FP is the concatenation of the interval's data pieces of
snap/NAME; the secondary's batch/PRIMARY/BASE/TARGET stages batches so that
a commit applies exactly the snapshot; wrong fingerprints, malformed names
and malformed batches are refused with nothing changed."""
import json
import random
import subprocess

import nbd
import pytest

from replication import manifest, pack
from replication.state import StateDir
from tests.conftest import ENV, meta_json
from tests.integration.test_secondary_exports import (SIZE, commit, interval_runs,  # noqa: F401
                                                      pair, read_doc)

EINVAL = 22


def pack_name(name, base_seq, runs):
    return f"pack/{name}/{'none' if base_seq is None else base_seq}/{pack.fingerprint(runs)}"


def scribble(prim, rnd, n=40):
    h = prim.connect()
    for _ in range(n):
        h.pwrite(rnd.randbytes(rnd.randrange(1, 9) * 4096), rnd.randrange(SIZE // 4096 - 8) * 4096)
    h.zero(3 * 4096, rnd.randrange(SIZE // 4096 - 3) * 4096)
    h.shutdown()


def ship_packed(prim, sec, base, name, batch_bytes=64 << 10):
    """One interval the agent's packed way: pack/... read batch by batch,
    written to batch/..., then committed; returns (manifest, reply)."""
    base_seq = base["seq"] if base else None
    body, target, runs = interval_runs(prim, base_seq, name)
    plan = pack.batches(runs, batch_bytes=batch_bytes)
    src = prim.connect(pack_name(name, base_seq, runs))
    dst = sec.connect(f"batch/{body.volume_uuid}/{'none' if base is None else base_seq}/"
                      f"{target.seq}")
    d = manifest.Digest()
    for b in plan:
        data = src.pread(b.data_bytes, b.stream_offset) if b.data_bytes else b""
        pos = 0
        for off, n, z in b.entries:
            if z:
                d.add(off, n, True)
            else:
                d.add(off, n, False, data[pos:pos + n])
                pos += n
        dst.pwrite(pack.encode_header(b.entries) + data, b.stream_offset)
    dst.flush()
    return commit(sec, body, base, target, name, d)


def test_pack_export_is_the_snapshot_packed(pair):
    prim, _ = pair
    rnd = random.Random(7)
    base = None
    for i in range(2):
        scribble(prim, rnd)
        prim.ctl("snappoint_create", name=f"s{i}")
        scribble(prim, rnd)              # after the snappoint: not in snap/s{i}
        _, target, runs = interval_runs(prim, base, f"s{i}")
        snap = prim.connect(f"snap/s{i}")
        model = b"".join(snap.pread(n, o) for o, n, z in manifest.pieces(runs) if not z)
        assert len(model) > 0
        h = prim.connect(pack_name(f"s{i}", base, runs))
        assert h.get_size() == len(model) and h.is_read_only()
        got = b"".join(h.pread(min(50000, len(model) - o), o) for o in range(0, len(model), 50000))
        assert got == model
        base = target.seq
    # not listed
    r = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={prim.sock}"],
                       capture_output=True, text=True, env=ENV, check=True)
    assert not [e for e in json.loads(r.stdout)["exports"]
                if e["export-name"].startswith("pack/")]


def test_pack_export_refuses_wrong_fingerprint_and_bad_names(pair):
    prim, _ = pair
    scribble(prim, random.Random(8))
    prim.ctl("snappoint_create", name="s0")
    _, target, runs = interval_runs(prim, None, "s0")
    fp = pack.fingerprint(runs)
    before = meta_json(prim.state)
    for name in (f"pack/s0/none/{'0' * 32}",            # another run list
                 f"pack/s0/none/{pack.fingerprint(runs[1:])}",
                 f"pack/nope/none/{fp}", f"pack/s0/{target.seq}/{fp}",   # base not before
                 f"pack/s0/007/{fp}", "pack/s0/none", f"pack/s0/none/{fp}/x", "pack/"):
        with pytest.raises(nbd.Error):
            prim.connect(name)
    assert meta_json(prim.state) == before
    assert "fingerprint" in open(prim.log, errors="replace").read()
    prim.connect(f"pack/s0/none/{fp}").shutdown()


def test_batches_apply_exactly_the_snapshot(pair):
    prim, sec = pair
    rnd = random.Random(9)
    base = None
    for i in range(3):
        scribble(prim, rnd, n=60)
        prim.ctl("snappoint_create", name=f"s{i}")
        m, reply = ship_packed(prim, sec, base, f"s{i}", batch_bytes=rnd.choice((4096, 65536)))
        assert reply["ok"], reply
        assert sec.connect().pread(SIZE, 0) == prim.connect(f"snap/s{i}").pread(SIZE, 0)
        base = m["target"]


def test_malformed_batches_refused_with_nothing_staged(pair):
    prim, sec = pair
    rnd = random.Random(10)
    scribble(prim, rnd)
    prim.ctl("snappoint_create", name="s0")
    m0, reply = ship_packed(prim, sec, None, "s0")
    assert reply["ok"]
    scribble(prim, rnd)
    prim.ctl("snappoint_create", name="s1")
    uuid = StateDir(prim.state).read_meta().volume_uuid
    before, info = sec.connect().pread(SIZE, 0), read_doc(sec, "info")
    good = pack.encode_header([(0, 4096, False)]) + b"x" * 4096
    bad = [b"nonsense" * 512,
           good[:-1],                                                  # short data
           good + b"y",                                                # trailing bytes
           pack.encode_header([(SIZE, 4096, False)]) + b"x" * 4096,    # beyond the replica
           pack.encode_header([(100, 4096, False)]) + b"x" * 4096,     # unaligned
           pack.encode_header([(0, 4096, False), (SIZE - 4096, 8192, True)]) + b"x" * 4096]
    h = sec.connect(f"batch/{uuid}/{m0['target']['seq']}/{m0['target']['seq'] + 1}")
    for payload in bad:
        with pytest.raises(nbd.Error) as e:
            h.pwrite(payload, 0)
        assert e.value.errnum == EINVAL
    h.shutdown()
    assert read_doc(sec, "info") == info and info["staging"] is None   # nothing was staged
    assert sec.connect().pread(SIZE, 0) == before
    with pytest.raises(nbd.Error):                                     # the wrong base
        sec.connect(f"batch/{uuid}/none/{m0['target']['seq'] + 1}").pwrite(good, 0)
    _, reply = ship_packed(prim, sec, m0["target"], "s1")
    assert reply["ok"], reply
    assert sec.connect().pread(SIZE, 0) == prim.connect("snap/s1").pread(SIZE, 0)
