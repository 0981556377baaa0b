"""A cycle's snapshot of changes (replication/snappoints.py,
snapshot_of_changes), on real servers with the real agent: the link's
snapshot holds only the blocks the cycle sends -- those of the closed
intervals after the link's base and of the interval its snappoint closes.

Writes that land after the snappoint, while the transfer has not read yet,
must not reach the replica (I1: it equals an independent model of the
volume at the snappoint); only the blocks of the cycle's set that they
overwrite are copied; reads of any other block of snap/LINK.N fail with
EIO rather than return the volume's newer data.  --whole-snapshot keeps
the whole image as before.  A clean stop drops snapshots of changes (the
metadata would reopen them as whole images), and a seed refuses them."""
import random

import nbd
import pytest

from replication import control
from replication.agent import Agent
from replication.errors import PreplError
from replication.state import StateDir
from tests.conftest import prepl, read_export

MiB = 1 << 20
SIZE = 16 * MiB
BS = 4096
NBLOCKS = SIZE // BS


def snap_info(prim, name):
    sps = control.request(StateDir(prim.state).control_socket, "snappoint_list")
    return next(sp for sp in sps if sp["name"] == name)


def pair_with_two_intervals(tmp_path, make_server):
    """A synced pair, then writes A1, a dataless snappoint "mid", writes A2:
    the next cycle sends A1 (a closed interval after the base) and A2 (the
    interval its snappoint closes).  Returns (prim, sec, model, A1, A2)."""
    rnd = random.Random(7)
    model = bytearray(rnd.randbytes(SIZE))
    (tmp_path / "p.img").write_bytes(model)
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img")
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    prim, sec = make_server(tmp_path / "p").start(), make_server(tmp_path / "s").start()
    Agent(prim.state, f"nbd+unix:///?socket={sec.sock}").cycle()     # full: whole image
    h = prim.connect()
    blocks = rnd.sample(range(NBLOCKS), 400)
    a1, a2 = set(blocks[:200]), set(blocks[200:])
    for i, part in enumerate((a1, a2)):
        for b in sorted(part):
            data = rnd.randbytes(BS)
            h.pwrite(data, b * BS)
            model[b * BS:(b + 1) * BS] = data
        if i == 0:
            prepl("snappoint", "create", prim.state, "mid", "--dataless")
    h.flush()
    return prim, sec, model, a1, a2


def cycle_with_writes_after_its_snappoint(prim, sec, written, **kw):
    """One cycle; right after its snappoint (before the transfer reads
    anything) every block of `written` is overwritten.  Returns the
    receipt."""
    a = Agent(prim.state, f"nbd+unix:///?socket={sec.sock}", **kw)
    take = a._snappoint
    rnd = random.Random(11)

    def snappoint_then_write(plan):
        out = take(plan)
        h = prim.connect()
        for b in sorted(written):
            h.pwrite(rnd.randbytes(BS), b * BS)
        h.flush()
        return out
    a._snappoint = snappoint_then_write
    return a.cycle()


@pytest.fixture
def after_cycle(tmp_path, make_server):
    prim, sec, model, a1, a2 = pair_with_two_intervals(tmp_path, make_server)
    rnd = random.Random(9)
    outside = set(rnd.sample(sorted(set(range(NBLOCKS)) - a1 - a2), 300))
    written = set(rnd.sample(sorted(a1), 100)) | set(rnd.sample(sorted(a2), 100)) | outside
    receipt = cycle_with_writes_after_its_snappoint(prim, sec, written)
    return prim, sec, model, a1 | a2, written, receipt.target


def test_a_cycle_copies_only_what_it_sends_and_the_replica_is_its_snappoints_image(
        after_cycle):
    prim, sec, model, sent, written, target = after_cycle
    assert read_export(sec, SIZE) == bytes(model)                 # I1, against the model
    info = snap_info(prim, target.name)
    assert info["snapshot"] == "valid"
    assert info["snapshot_changes_after"] == target.seq - 2       # the base, before "mid"
    assert info["copied_blocks"] == len(written & sent)           # 200 of 500 writes
    src = prim.connect(f"snap/{target.name}")
    for b in sorted(sent)[::37] + sorted(written & sent)[::23]:   # the old image
        assert src.pread(BS, b * BS) == model[b * BS:(b + 1) * BS], b
    for b in sorted(written - sent)[::29] + [min(set(range(NBLOCKS)) - sent - written)]:
        with pytest.raises(nbd.Error) as e:                       # never newer data
            src.pread(BS, b * BS)
        assert e.value.errno == "EIO", b


def test_a_whole_snapshot_copies_every_write_and_reads_whole(tmp_path, make_server):
    prim, sec, model, a1, a2 = pair_with_two_intervals(tmp_path, make_server)
    written = set(random.Random(3).sample(range(NBLOCKS), 300))
    target = cycle_with_writes_after_its_snappoint(prim, sec, written,
                                                   whole_snapshot=True).target
    info = snap_info(prim, target.name)
    assert info["snapshot_changes_after"] is None
    assert info["copied_blocks"] == len(written)
    assert read_export(prim, SIZE, f"snap/{target.name}") == bytes(model) \
        == read_export(sec, SIZE)


def test_a_clean_stop_drops_snapshots_of_changes_and_the_next_cycle_works(after_cycle):
    prim, sec, model, sent, written, target = after_cycle
    prim.stop()
    body = StateDir(prim.state).read_meta()                       # as the stop wrote it
    assert body.clean and body.snappoint(target.name).snapshot is None
    prim.start()
    info = snap_info(prim, target.name)
    assert info["snapshot"] == "none" and info["export"] is None
    Agent(prim.state, f"nbd+unix:///?socket={sec.sock}").cycle()
    assert read_export(sec, SIZE) == read_export(prim, SIZE)


def test_a_seed_refuses_a_snapshot_of_changes(after_cycle, tmp_path):
    prim, sec, model, sent, written, target = after_cycle
    r = prepl("seed", "export", prim.state, tmp_path / "seed.img", "--snappoint",
              target.name, check=False)
    assert r.returncode == 2, r.stderr
    assert "snapshot of changes only" in r.stderr and "whole image" in r.stderr
    assert not (tmp_path / "seed.img").exists()


@pytest.mark.parametrize("args", [{"changes_after": -2}, {"changes_after": "1"},
                                  {"changes_after": 0, "dataless": True}])
def test_a_bad_changes_after_is_refused_and_nothing_changes(primary, args):
    srv = primary()
    sock = StateDir(srv.state).control_socket
    before = control.request(sock, "snappoint_list")
    with pytest.raises(PreplError) as e:
        control.request(sock, "snappoint_create", name="x", **args)
    assert "changes_after" in str(e.value)
    assert control.request(sock, "snappoint_list") == before
