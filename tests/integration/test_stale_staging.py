"""A staging connection from an earlier cycle never reaches a later
staging (real servers): a connection that staged interval N, used again
after N was committed -- while N is merged as an overlay, once it is
merged, and while N+1 is being staged -- gets an error for every write,
zero and flush; the replica keeps reading as the primary's snapshot and
the next interval commits as if nothing had happened."""
import random

import nbd
import pytest

from replication import manifest, pack
from replication.state import StateDir
from tests.integration.test_secondary_exports import (SIZE, commit, interval_runs,  # noqa: F401
                                                      pair, read_doc)
from tests.conftest import read_export, wait_for

BLOCK = 4096


def scribble(prim, rnd, n=30):
    h = prim.connect()
    for _ in range(n):
        h.pwrite(rnd.randbytes(rnd.randrange(1, 9) * BLOCK),
                 rnd.randrange(SIZE // BLOCK - 8) * BLOCK)
    h.shutdown()


class Staging:
    """The agent's side of one interval, through one connection that the
    test keeps open: stage/... (one request per piece) or batch/..."""

    def __init__(self, prim, sec, kind, base_seq, name):
        self.prim, self.sec, self.name = prim, sec, name
        self.body, self.target, self.runs = interval_runs(prim, base_seq, name)
        self.kind = kind
        self.conn = sec.connect(f"{kind}/{self.body.volume_uuid}/"
                                f"{'none' if base_seq is None else base_seq}/"
                                f"{self.target.seq}")
        self.digest = manifest.Digest()

    def send(self, part=slice(None)):
        src = self.prim.connect(f"snap/{self.name}")
        pieces = list(manifest.pieces(self.runs))[part]
        for off, n, z in pieces:
            data = b"" if z else src.pread(n, off)
            self.digest.add(off, n, z, None if z else data)
            if self.kind == "batch":
                entries = [(off, n, z)]
                self.conn.pwrite(pack.encode_header(entries) + data, 0)
            elif z:
                self.conn.zero(n, off)
            else:
                self.conn.pwrite(data, off)
        src.shutdown()

    def commit(self, base):
        self.conn.flush()
        m, reply = commit(self.sec, self.body, base, self.target, self.name, self.digest)
        assert reply["ok"], reply
        return m["target"]

    def stray(self):
        """Requests of this connection that must all be refused now."""
        for req in (lambda: self.conn.pwrite(self.payload(b"X"), 0),
                    lambda: self.conn.pwrite(self.payload(b"Y"), SIZE - BLOCK),
                    self.conn.flush):
            with pytest.raises(nbd.Error):
                req()
        if self.kind == "stage":
            with pytest.raises(nbd.Error):
                self.conn.zero(BLOCK, BLOCK)

    def payload(self, byte):
        data = byte * BLOCK
        if self.kind == "batch":
            return pack.encode_header([(0, BLOCK, False)]) + data
        return data


def replica(sec):
    return read_export(sec, SIZE)


def snapshot(prim, name):
    return read_export(prim, SIZE, f"snap/{name}")


@pytest.mark.parametrize("kind", ["stage", "batch"])
def test_connection_of_an_earlier_staging_is_refused(pair, kind):
    prim, sec = pair
    rnd = random.Random(11)
    scribble(prim, rnd)
    prim.ctl("snappoint_create", name="s0")
    first = Staging(prim, sec, "stage", None, "s0")        # initial sync: into the replica
    first.send()
    t0 = first.commit(None)
    wait_for(lambda: read_doc(sec, "info")["staging"] is None, 10, "the merge of s0")
    first.stray()                         # its staging is gone (it was the replica itself)
    assert replica(sec) == snapshot(prim, "s0")

    scribble(prim, rnd)
    prim.ctl("snappoint_create", name="s1")
    second = Staging(prim, sec, kind, t0["seq"], "s1")
    second.send(slice(0, 2))              # staging s1 has begun
    first.stray()                         # ... and is never reached from cycle 0
    second.send(slice(2, None))
    t1 = second.commit(t0)                # the digest holds: nothing stray was staged
    second.stray()                        # committed: its connection is done
    wait_for(lambda: read_doc(sec, "info")["staging"] is None, 10, "the merge of s1")
    second.stray()
    first.stray()
    assert replica(sec) == snapshot(prim, "s1")

    scribble(prim, rnd)                   # and the next interval goes through
    prim.ctl("snappoint_create", name="s2")
    third = Staging(prim, sec, kind, t1["seq"], "s2")
    third.send()
    third.commit(t1)
    assert replica(sec) == snapshot(prim, "s2")


@pytest.mark.slow
def test_connection_of_a_committed_staging_cannot_change_the_overlay(pair, make_server):
    """While a committed interval is served as an overlay (its merge has
    not ended: here it fails half-way, injected), a write on the
    connection that staged it would be visible at once on export ""."""
    prim, sec = pair
    rnd = random.Random(12)
    scribble(prim, rnd)
    prim.ctl("snappoint_create", name="s0")
    first = Staging(prim, sec, "stage", None, "s0")
    first.send()
    t0 = first.commit(None)
    wait_for(lambda: read_doc(sec, "info")["staging"] is None, 10, "the merge of s0")
    sec.stop()
    sec = make_server(sec.state)
    sec.env = {"PREPL_FAULT": "secondary.apply.midway:raise"}
    sec.start()
    scribble(prim, rnd)
    prim.ctl("snappoint_create", name="s1")
    second = Staging(prim, sec, "stage", t0["seq"], "s1")
    second.send()
    second.commit(t0)
    wait_for(lambda: "merging interval" in sec.output(), 10, "the injected merge failure")
    assert read_doc(sec, "info")["staging"]["state"] == "complete"     # the overlay serves
    second.stray()
    assert replica(sec) == snapshot(prim, "s1")
    assert StateDir(sec.state).read_meta().applied.target.name == "s1"
