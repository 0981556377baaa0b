"""Offline seeding (issue 13 item 3): `prepl seed export` from a running
primary taking writes, `prepl seed import` into a stopped secondary, then
one cycle that sends only the changes since the seed, counted on the wire
by the fault proxy (outside the agent); every bad seed refused with the
replica byte-identical; a seed whose snappoint the primary dropped refused
by the first cycle, with the remedy."""
import hashlib
import json
import os
import random
import threading

import pytest

from tests.conftest import export_sha, prepl
from tests.harness.proxy import CutProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
SIZE = 256 * MiB
BLOCK = 4096


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def nbd_sha(srv, export=""):
    return export_sha(srv, SIZE, export)


class Writer(threading.Thread):
    """Random 4 KiB writes to the primary's first half (the second stays
    zero) until stopped; `blocks` is every block it wrote since cleared (a
    superset of the changes since any later instant)."""

    def __init__(self, srv, seed):
        super().__init__(daemon=True)
        self.srv, self.rnd = srv, random.Random(seed)
        self.blocks = set()
        self.halt = threading.Event()
        self.error = None

    def run(self):
        h = self.srv.connect()
        try:
            while not self.halt.is_set():
                b = self.rnd.randrange(SIZE // 2 // BLOCK)
                h.pwrite(self.rnd.randbytes(BLOCK), b * BLOCK)
                self.blocks.add(b)
            h.flush()
        except Exception as e:      # noqa: BLE001 -- re-raised by stop()
            self.error = e
        finally:
            h.shutdown()

    def stop(self):
        self.halt.set()
        self.join(30)
        if self.error:
            raise self.error


@pytest.fixture
def nodes(tmp_path, make_server):
    """(primary server, secondary state, its volume, make_secondary): the
    primary from an image half random, half zeroes (the seed is sparse)."""
    (tmp_path / "p.img").write_bytes(random.Random(3).randbytes(SIZE // 2) + bytes(SIZE // 2))
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img")
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    prim = make_server(tmp_path / "p", tmp_path / "p.sock").start()
    return prim, str(tmp_path / "s"), str(tmp_path / "s.img")


def refused(state, seed_file, volume, why):
    """The import is refused with why in its message; the replica's bytes
    and metadata are as they were."""
    before = (sha(volume), open(os.path.join(state, "meta.json"), "rb").read()
              if os.path.exists(os.path.join(state, "meta.json")) else None)
    r = prepl("seed", "import", state, seed_file, check=False)
    assert r.returncode != 0 and why in r.stderr, (r.returncode, r.stderr)
    assert (sha(volume), open(os.path.join(state, "meta.json"), "rb").read()
            if os.path.exists(os.path.join(state, "meta.json")) else None) == before


def test_seed_then_one_cycle_sends_only_the_changes(tmp_path, nodes, make_server):
    prim, sstate, svol = nodes
    w = Writer(prim, 1)
    w.start()
    try:
        w.blocks.clear()        # from here on: a superset of the changes since the seed
        out = json.loads(prepl("seed", "export", prim.state, tmp_path / "seed",
                               "--json").stdout)
        assert out["snappoint"].startswith("seed.") and out["size"] == SIZE
        assert os.stat(tmp_path / "seed").st_size == 4096 + SIZE
        assert os.stat(tmp_path / "seed").st_blocks * 512 < 0.75 * SIZE  # sparse where zero
        # an import needs the server stopped
        sec = make_server(sstate, tmp_path / "s.sock").start()
        r = prepl("seed", "import", sstate, tmp_path / "seed", check=False)
        assert r.returncode != 0 and "in use by another server" in r.stderr
        sec.stop()
        r = prepl("seed", "import", sstate, tmp_path / "seed")
        assert "imported seed of volume" in r.stdout
    finally:
        w.stop()
    changed = len(w.blocks)
    sec = make_server(sstate, tmp_path / "s.sock").start()
    st = json.loads(prepl("status", sstate, "--json").stdout)
    assert st["applied"]["seed"] == out["snappoint"]
    assert nbd_sha(sec) == nbd_sha(prim, f"snap/{out['snappoint']}")
    with CutProxy(tmp_path / "proxy.sock", tmp_path / "s.sock").start() as proxy:
        prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={proxy.listen}",
              "--once")
        sent = proxy.bytes_up
    assert 0 < sent <= changed * BLOCK + 1 * MiB, (sent, changed)
    assert nbd_sha(sec) == nbd_sha(prim)
    sps = {s["name"]: s for s in json.loads(prepl("status", prim.state, "--json").stdout)
           ["snappoints"]}
    assert sps[out["snappoint"]]["snapshot"] == "none"      # pins no snapshot any more


def test_bad_seeds_are_refused_and_change_nothing(tmp_path, nodes, make_server):
    prim, sstate, svol = nodes
    seed = str(tmp_path / "seed")
    prepl("seed", "export", prim.state, seed)
    raw = open(seed, "rb").read()

    def variant(name, data):
        p = str(tmp_path / name)
        with open(p, "wb") as f:
            f.write(data)
        return p

    flipped = bytearray(raw)
    flipped[4096 + SIZE // 3] ^= 0x01
    refused(sstate, variant("corrupt", flipped), svol, "is corrupted")
    refused(sstate, variant("short", raw[:-4096]), svol, "truncated")
    refused(sstate, variant("noseed", b"\0" * 8192), svol, "not a prepl seed file")
    header = bytearray(raw[:4096])
    refused(sstate, variant("badheader", header[:20] + b"{" + header[21:] + raw[4096:]), svol,
            "header is damaged")
    # another geometry: a smaller primary's seed
    prepl("init", tmp_path / "q", "--volume", tmp_path / "q.img", "--size", str(SIZE // 2))
    q = make_server(tmp_path / "q", tmp_path / "q.sock").start()
    prepl("seed", "export", q.state, tmp_path / "qseed")
    refused(sstate, str(tmp_path / "qseed"), svol, "is a seed of geometry")
    # another volume: the replica is bound to the primary once its seed is in
    prepl("seed", "import", sstate, seed)
    prepl("init", tmp_path / "r", "--volume", tmp_path / "r.img", "--size", str(SIZE))
    r = make_server(tmp_path / "r", tmp_path / "r.sock").start()
    prepl("seed", "export", r.state, tmp_path / "rseed")
    refused(sstate, str(tmp_path / "rseed"), svol, "this replica is bound to volume")
    # a secondary is no primary, and a primary takes no seed
    r2 = prepl("seed", "export", sstate, tmp_path / "x", check=False)
    assert r2.returncode == 2 and "exported from a primary" in r2.stderr
    r3 = prepl("seed", "import", prim.state, seed, check=False)
    assert r3.returncode == 2 and "imported into a secondary" in r3.stderr


def test_a_seed_whose_snappoint_is_gone_is_refused_by_the_first_cycle(tmp_path, nodes,
                                                                       make_server):
    prim, sstate, svol = nodes
    out = json.loads(prepl("seed", "export", prim.state, tmp_path / "seed", "--json").stdout)
    prepl("seed", "import", sstate, tmp_path / "seed")
    prepl("snappoint", "delete", prim.state, out["snappoint"])
    sec = make_server(sstate, tmp_path / "s.sock").start()
    before = nbd_sha(sec)
    r = prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once",
              check=False)
    assert r.returncode == 5, r.stderr
    assert f"seeded from snappoint {out['snappoint']}" in r.stderr
    assert "export a new seed" in r.stderr
    assert nbd_sha(sec) == before
