"""I1 under load: writers keep writing to the primary while the agent runs
cycle after cycle; after every applied interval the replica's SHA-256
equals the SHA-256 of the primary's snapshot at that interval's snappoint
(snap/LINK.N, kept by the agent until its next cycle)."""
import random
import threading

import pytest

from replication.agent import Agent
from tests.conftest import export_sha, served_pair

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


def test_replica_is_a_snapshot_after_every_cycle(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, str(SIZE))
    agent = Agent(prim.state, f"nbd+unix:///?socket={sec.sock}", "dr")
    stop = threading.Event()
    ts = [threading.Thread(target=writer, args=(prim, stop, s)) for s in range(3)]
    for t in ts:
        t.start()
    try:
        for _ in range(8):
            receipt = agent.cycle()
            name = receipt.target.name
            assert image_sha(sec, "") == image_sha(prim, f"snap/{name}"), \
                f"I1: the replica is not the primary's image at {name}"
    finally:
        stop.set()
        for t in ts:
            t.join()
    # and once the writers stop, one more cycle makes the replica the volume
    agent.cycle()
    assert image_sha(sec, "") == image_sha(prim, "")
