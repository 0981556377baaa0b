"""prepl migrate: a planned role swap with nothing lost and no resync.  The
primary waits for a quiet moment, refuses writes, runs a final cycle,
promotes its secondary through the secondary's export "promote" and
becomes its secondary; the ordinary agent on the new primary then
replicates incrementally.  Migrating back is the same command on the other
node.  Unsafe requests are refused (exit 5) and change nothing."""
import json
import random
import threading
import time

import nbd
import pytest

from tests.conftest import meta_json, prepl, served_pair
from tests.harness.powerdisk import NbdMount
from tests.harness.proxy import CutProxy
from tests.integration.test_filesystem import tree
from tests.integration.test_replication_fs import workload

SIZE = 8 << 20
FS_SIZE = 64 << 20


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def image(srv, size=SIZE):
    h = srv.connect()
    try:
        return h.pread(size, 0)
    finally:
        h.shutdown()


def migrate(srv, peer_sock, *args, check=True):
    return prepl("migrate", srv.state, "--peer", uri(peer_sock), *args, check=check)


def agent(prim, sec_sock):
    prepl("agent", prim.state, "--secondary", uri(sec_sock), "--once", "--timeout", "30")


def last_cycle(srv):
    return srv.ctl("status")["links"]["default"]["last_cycle"]


def test_migrate_there_and_back(tmp_path, make_server):
    a, b = served_pair(tmp_path, make_server, SIZE)
    rnd = random.Random(5)
    h = a.connect()
    for _ in range(20):
        h.pwrite(rnd.randbytes(4096 * rnd.randrange(1, 9)), 4096 * rnd.randrange(SIZE // 4096 - 8))
    h.flush()
    agent(a, b.sock)
    late = rnd.randbytes(3 * 4096)
    h.pwrite(late, 40960)                       # written after the last cycle
    h.flush()
    want = image(a)
    r = migrate(a, b.sock, "--json")
    res = json.loads(r.stdout)
    assert res["blocks"] == 0
    # both hold the same image; roles swapped; a's connection refuses writes
    assert image(a) == image(b) == want
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 0)
    ma, mb = meta_json(a.state), meta_json(b.state)
    assert (ma["role"], mb["role"]) == ("secondary", "primary")
    assert mb["promoted"]["planned"] is True and ma["failback"] is None
    assert ma["bound"]["primary_uuid"] == mb["volume_uuid"]
    # the new primary replicates incrementally to the old one
    hb = b.connect()
    hb.pwrite(b"B" * 8192, 8192)
    hb.flush()
    agent(b, a.sock)
    assert image(a) == image(b)
    assert last_cycle(b)["bytes"] == 8192 and not last_cycle(b)["full"]
    # and back: the same command on the other node
    hb.pwrite(b"C" * 4096, 0)
    hb.flush()
    res = json.loads(migrate(b, a.sock, "--json").stdout)
    assert image(a) == image(b)
    assert (meta_json(a.state)["role"], meta_json(b.state)["role"]) == ("primary", "secondary")
    assert res["final"]["bytes"] == 4096           # the final cycle: the one change
    ha = a.connect()
    ha.pwrite(b"D" * 4096, 4096)
    ha.flush()
    agent(a, b.sock)
    assert image(a) == image(b)
    assert last_cycle(a)["bytes"] == 4096
    # running it again once done finishes nothing more, and says so
    r = migrate(b, a.sock)
    assert "(already)" in r.stdout and meta_json(b.state)["role"] == "secondary"


def test_migrate_refusals_change_nothing(tmp_path, make_server):
    a, b = served_pair(tmp_path, make_server, SIZE)
    a.connect().pwrite(b"a" * 4096, 0)
    agent(a, b.sock)
    prepl("init", tmp_path / "o", "--volume", tmp_path / "o.img", "--size", str(SIZE),
          "--role", "secondary")
    o = make_server(tmp_path / "o").start()
    before = {s: (tmp_path / s / "meta.json").read_bytes() for s in ("p", "s")}
    # a peer that is no secondary of this volume: one never bound, a primary
    for peer in (o.sock, a.sock):
        r = migrate(a, peer, check=False)
        assert r.returncode == 5 and "no secondary of this volume" in r.stderr, r.stderr
    # migrate on a secondary
    r = migrate(b, a.sock, check=False)
    assert r.returncode == 5 and "migrate runs on the primary" in r.stderr
    # writes in flight the whole time
    stop = threading.Event()

    def writer():
        h = a.connect()
        i = 0
        while not stop.is_set():
            h.pwrite(bytes([i % 256]) * 4096, 4096 * (i % 64))
            i += 1
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(0.2)
        r = migrate(a, b.sock, "--wait-quiet", "1", check=False)
    finally:
        stop.set()
        t.join(10)
    assert r.returncode == 5 and "writes kept coming" in r.stderr
    assert {s: (tmp_path / s / "meta.json").read_bytes() for s in ("p", "s")} == before
    h = a.connect()
    assert not h.is_read_only()
    h.pwrite(b"w" * 4096, 0)                      # still accepts writes


@pytest.mark.slow
def test_migrate_under_a_file_workload(tmp_path, make_server):
    """ext4 on the primary: the workload pauses (unmounted) for each
    migration; nothing is lost; the migration's bytes and the first cycle's
    after it (counted by a proxy, outside the agent) are bounded by the
    changes."""
    a, b = served_pair(tmp_path, make_server, FS_SIZE)
    rnd = random.Random(9)
    synced = {}
    nodes = [a, b]
    mkfs = ["-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"]
    for round_ in range(2):
        prim, sec = nodes
        proxy = CutProxy(str(tmp_path / f"px{round_}.sock"), str(sec.sock)).start()
        try:
            with NbdMount(tmp_path / f"fs{round_}", uri(prim.sock),
                          mkfs_args=mkfs if round_ == 0 else None) as fs:
                for step in range(2):
                    workload(fs.mountpoint, rnd, 10 * round_ + step, synced)
                    agent(prim, proxy.listen)
                workload(fs.mountpoint, rnd, 10 * round_ + 5, synced)
                files = tree(fs.mountpoint)
            # paused (unmounted): migrate through the counting proxy
            before_bytes = proxy.bytes_up
            final = json.loads(migrate(prim, proxy.listen, "--json").stdout)["final"]
            moved = proxy.bytes_up - before_bytes
            # bounded by the change: the final cycle's data plus protocol overhead
            assert final["bytes"] <= moved <= 1.05 * final["bytes"] + 65536, (moved, final)
        finally:
            proxy.stop()
        assert image(prim, FS_SIZE) == image(sec, FS_SIZE)
        with NbdMount(tmp_path / f"chk{round_}", uri(sec.sock)) as fs:
            assert tree(fs.mountpoint) == files           # nothing lost
            workload(fs.mountpoint, rnd, 10 * round_ + 7, synced)
        agent(sec, prim.sock)                           # incremental, not a full sync
        lc = last_cycle(sec)
        assert not lc["full"] and lc["bytes"] < FS_SIZE // 4
        assert image(prim, FS_SIZE) == image(sec, FS_SIZE)
        nodes = [sec, prim]
