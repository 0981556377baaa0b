"""A damaged closed map (a flipped bit in its file) never silently drops
change bits: the server keeps serving the volume, the cycles of the links
that need that interval fail with a message naming the file, `status`
shows it, and `prepl link resync STATE LINK` (a full resync) is the
remedy.  And a state directory made by the previous format (SHA-256 map
digests) is upgraded in place at its first start."""
import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO, meta_json, prepl, served_pair

MiB = 1 << 20
SIZE = 8 * MiB


def agent(prim, sec, *extra, check=True):
    return prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}",
                 "--once", "--timeout", "20", *extra, check=check)


def meta(srv):
    return meta_json(srv.state)


@pytest.mark.slow
def test_damaged_closed_map(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    h = prim.connect()
    h.pwrite(b"a" * 65536, 0)
    agent(prim, sec)
    first = sec.connect().pread(SIZE, 0)
    h.pwrite(b"b" * 4096, MiB)                       # in the interval that "x" closes
    prim.ctl("snappoint_create", name="x", dataless=True)
    h.pwrite(b"c" * 4096, 2 * MiB)
    h.flush()
    iv = next(i for i in meta(prim)["intervals"] if i["closed_by"] == "x")
    path = os.path.join(prim.state, "maps", iv["maps"]["bmap"])
    block = MiB // 4096
    with open(path, "r+b") as f:                    # the bit of block 256 lost
        f.seek(block // 8)
        byte = f.read(1)[0]
        assert byte & (1 << (block % 8))
        f.seek(block // 8)
        f.write(bytes([byte & ~(1 << (block % 8))]))
    # the volume is served as before
    h.pwrite(b"d" * 4096, 3 * MiB)
    assert h.pread(4096, MiB) == b"b" * 4096
    damaged = prim.ctl("status")["damaged_intervals"]
    assert [(d["interval"], d["file"], d["needed_by"]) for d in damaged] == \
        [(iv["seq"], path, ["default"])]
    assert "DAMAGED interval" in prepl("status", prim.state).stdout
    # the link's cycle fails and names the file; nothing reaches the replica
    snaps_before = [s["name"] for s in prim.ctl("snappoint_list")]
    r = agent(prim, sec, check=False)
    assert r.returncode == 4 and path in r.stderr and "prepl link resync" in r.stderr, r.stderr
    assert sec.connect().pread(SIZE, 0) == first
    assert [s["name"] for s in prim.ctl("snappoint_list")] == snaps_before  # none taken
    # a restart does not refuse the volume for it (it did before)
    prim.stop()
    prim.start()
    assert [d["interval"] for d in prim.ctl("status")["damaged_intervals"]] == [iv["seq"]]
    h = prim.connect()
    # the remedy
    r = prepl("link", "resync", prim.state, "nosuchlink", check=False)
    assert r.returncode == 1 and "no link named" in r.stderr
    prepl("link", "resync", prim.state, "default")
    assert meta(prim)["links"]["default"]["resync"] is True
    agent(prim, sec)
    assert sec.connect().pread(SIZE, 0) == h.pread(SIZE, 0)
    link = meta(prim)["links"]["default"]
    assert link["last_cycle"]["full"] is True and link["resync"] is False
    h.pwrite(b"e" * 4096, 4 * MiB)
    agent(prim, sec)                                 # and incremental again
    assert meta(prim)["links"]["default"]["last_cycle"]["full"] is False
    assert sec.connect().pread(SIZE, 0) == h.pread(SIZE, 0)
    # the resync's cleanup merged the link's old interval into x's: no link
    # needs x's any more, so its damage is dropped, and the chain no longer
    # holds every change since creation (no initial sync is skipped on it)
    assert prim.ctl("status")["damaged_intervals"] == []
    assert meta(prim)["chain_truncated"] is True
    # so a new link to an empty replica gets a full initial sync, not the
    # chain since creation (which no longer holds every change)
    prepl("init", tmp_path / "s2", "--volume", tmp_path / "s2.img", "--size", str(SIZE),
          "--role", "secondary")
    sec2 = make_server(tmp_path / "s2").start()
    agent(prim, sec2, "--name", "second")
    assert meta(prim)["links"]["second"]["last_cycle"]["full"] is True
    assert sec2.connect().pread(SIZE, 0) == h.pread(SIZE, 0)


def test_damage_is_carried_forward_while_a_link_needs_it(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    h = prim.connect()
    h.pwrite(b"a" * 4096, 0)
    agent(prim, sec)
    for name in ("x", "y"):
        h.pwrite(name.encode() * 4096, MiB if name == "x" else 2 * MiB)
        prim.ctl("snappoint_create", name=name, dataless=True)
    ivx = next(i for i in meta(prim)["intervals"] if i["closed_by"] == "x")
    with open(os.path.join(prim.state, "maps", ivx["maps"]["cmap"]), "r+b") as f:
        f.write(b"\xff")
    prim.ctl("snappoint_delete", name="x")          # x's interval merges into y's
    ivy = next(i for i in meta(prim)["intervals"] if i["closed_by"] == "y")
    assert "merged with damaged interval" in ivy["damaged"]
    assert [d["interval"] for d in prim.ctl("status")["damaged_intervals"]] == [ivy["seq"]]
    r = agent(prim, sec, check=False)
    assert r.returncode == 4 and "damaged" in r.stderr


def test_format1_state_directories_are_upgraded(tmp_path, make_server):
    """A primary and a secondary made by the previous release (format 1,
    SHA-256 map digests, tests/data/format1-pair.tar.gz): the new server
    starts on them, converts the digests, and replication goes on
    incrementally from where it was."""
    subprocess.run(["tar", "-xzf", os.path.join(REPO, "tests", "data", "format1-pair.tar.gz"),
                    "-C", str(tmp_path)], check=True)
    for role in ("p", "s"):     # the volumes' paths were those of the machine that made them
        path = tmp_path / role / "meta.json"
        doc = json.loads(path.read_text())
        assert doc["format"] == 1
        doc["body"]["volume"] = str(tmp_path / f"{role}.img")
        from replication.meta import checksum
        doc["checksum"] = checksum(doc["body"])
        path.write_text(json.dumps(doc))
    old = json.loads((tmp_path / "p" / "meta.json").read_text())["body"]
    prim, sec = make_server(tmp_path / "p").start(), make_server(tmp_path / "s").start()
    new = meta(prim)
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["format"] == 2
    for a, b in zip(old["intervals"][:-1], new["intervals"][:-1]):
        assert a["maps"] == b["maps"] and all(d.startswith("xxh3-128:")
                                               for d in b["digests"].values())
        assert not a["digests"]["cmap"].startswith("xxh3")
    assert prim.ctl("status")["damaged_intervals"] == []
    assert [s["name"] for s in prim.ctl("snappoint_list")] == ["default.2", "keep", "mark"]
    assert prim.connect("snap/keep").pread(4096, 0) == bytes(4096)   # zeroed before "keep"
    h = prim.connect()
    h.pwrite(b"n" * 4096, 100 * 4096)
    agent(prim, sec, "--secondary", f"nbd+unix:///?socket={sec.sock}")
    link = meta(prim)["links"]["default"]
    assert link["last_cycle"]["full"] is False
    assert sec.connect().pread(MiB, 0) == h.pread(MiB, 0)
    # a format-1 prepl would refuse the upgraded file rather than misread it
    shutil.copy(tmp_path / "p" / "meta.json", tmp_path / "copy.json")
    assert json.loads((tmp_path / "copy.json").read_text())["format"] == 2
