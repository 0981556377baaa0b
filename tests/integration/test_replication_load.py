"""I1 under load: writers keep writing to the primary while the agent runs
cycle after cycle; after every applied interval the replica's SHA-256
equals the SHA-256 of the primary's snapshot at that interval's snappoint
(snap/LINK.N, kept whole by `--whole-snapshot` until the next cycle).  With
the default snapshots of changes, which hold only what a cycle sends, the
same holds by induction: the replica equals snap/LINK.N on the cycle's
runs and its previous image everywhere else."""
import contextlib
import random
import threading

import pytest

from replication.agent import Agent
from tests.conftest import export_sha, read_export, served_pair

pytestmark = pytest.mark.slow


MiB = 1 << 20
SIZE = 32 * MiB


def image_sha(srv, export):
    return export_sha(srv, SIZE, export)


def writer(srv, stop, seed):
    rnd = random.Random(seed)
    h = srv.connect()
    while not stop.is_set():
        off = rnd.randrange(SIZE - 70000)
        if rnd.random() < 0.1:
            h.zero(rnd.randint(1, 16) * 4096, off // 4096 * 4096)
        else:
            h.pwrite(rnd.randbytes(rnd.randint(1, 70000)), off)
    h.shutdown()


@contextlib.contextmanager
def writers(prim):
    """Three writers on the primary while the block runs; stopped (and
    joined) however it ends."""
    stop = threading.Event()
    ts = [threading.Thread(target=writer, args=(prim, stop, s)) for s in range(3)]
    for t in ts:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in ts:
            t.join()


def test_replica_is_a_snapshot_after_every_cycle(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, str(SIZE))
    # whole snapshots: snap/dr.N is the witness of each cycle's image
    agent = Agent(prim.state, f"nbd+unix:///?socket={sec.sock}", "dr", whole_snapshot=True)
    with writers(prim):
        for _ in range(8):
            receipt = agent.cycle()
            name = receipt.target.name
            assert image_sha(sec, "") == image_sha(prim, f"snap/{name}"), \
                f"I1: the replica is not the primary's image at {name}"
    # and once the writers stop, one more cycle makes the replica the volume
    agent.cycle()
    assert image_sha(sec, "") == image_sha(prim, "")


def test_replica_under_load_with_snapshots_of_changes(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, str(SIZE))
    agent = Agent(prim.state, f"nbd+unix:///?socket={sec.sock}", "dr")
    sent = {}
    runs = agent._runs

    def keep_runs(body, plan, target):
        sent[target.seq] = out = runs(body, plan, target)
        return out
    agent._runs = keep_runs
    image = bytes(SIZE)                 # both created empty: the replica's image before
    with writers(prim):
        for _ in range(6):
            target = agent.cycle().target
            src = prim.connect(f"snap/{target.name}")
            expect = bytearray(image)
            for off, n, zero in sent[target.seq]:
                for o in range(off, off + n, 4 * MiB):      # reads of the cycle's runs
                    k = min(4 * MiB, off + n - o)
                    expect[o:o + k] = bytes(k) if zero else src.pread(k, o)
            src.shutdown()
            image = read_export(sec, SIZE)
            assert image == expect, f"I1: the replica is not the primary's image at " \
                f"{target.name}"
            info = [sp for sp in prim.ctl("snappoint_list") if sp["name"] == target.name][0]
            assert info["snapshot_changes_after"] is not None
    agent.cycle()
    assert image_sha(sec, "") == image_sha(prim, "")
