"""The day the primary dies, end to end, with ext4 on the primary (nbdfuse
+ loop): a file workload with cycles; the primary's server SIGKILLed in the
middle of a cycle; failover; the filesystem on the new primary mounts
(journal replay), passes e2fsck -fn and holds every file of the last
applied interval; new files; the old primary restarted (superseded: ""
read-only); failback; the new primary's agent cycles; the two volumes are
byte-identical, and the bytes that reached the old primary (counted by a
proxy, outside the agent) are within 5 % of the union of the maps,
computed here from the raw map files and activity log -- not the volume's
size."""
import json
import os
import random
import subprocess
import time

import numpy as np
import pytest

from replication import divergence, writeclock
from tests.conftest import ENV, PREPL, REPO, export_sha, meta_json, prepl, served_pair, \
    stop_process, wait_for
from tests.harness.powerdisk import NbdMount
from tests.harness.proxy import CutProxy
from tests.integration.test_filesystem import tree
from tests.integration.test_replication_fs import workload

pytestmark = pytest.mark.slow

SIZE = 128 << 20
BS = 4096
MKFS = ["-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"]


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def bits_of(path):
    """The bits of a raw map file (little-endian uint64 words) as 0/1 per bit."""
    words = np.fromfile(path, dtype=np.uint64)
    return np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)


def blocks_after(state, seq):
    """Blocks set in the block maps of the intervals after seq, read from the
    raw files that meta.json names."""
    m = meta_json(state)
    nblocks = -(-m["size"] // m["block_size"])
    out = np.zeros(nblocks, bool)
    for iv in m["intervals"]:
        if iv["seq"] > seq:
            out |= bits_of(os.path.join(state, "maps", iv["maps"]["bmap"]))[:nblocks]
    return out


def activity_log_blocks(state):
    """Blocks of the extents in the raw activity log (after the 4 KiB header)."""
    m = meta_json(state)
    nblocks = -(-m["size"] // m["block_size"])
    with open(os.path.join(state, "al"), "rb") as f:
        raw = f.read()[4096:]
    ext = np.unpackbits(np.frombuffer(raw[:len(raw) // 8 * 8], np.uint8), bitorder="little")
    per = m["al_extent"] // m["block_size"]
    out = np.zeros(nblocks, bool)
    for e in np.flatnonzero(ext):
        out[e * per:(e + 1) * per] = True
    return out


def image_digest(srv):
    return export_sha(srv, SIZE)


def e2fsck_clean(fs):
    """The mounted fs (its journal replayed) unmounted, checked read-only,
    mounted again."""
    subprocess.run(["umount", fs.mountpoint], check=True)
    fs.mounted = False
    r = subprocess.run(["e2fsck", "-fn", fs.loopdev], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    fs._mount()


def test_primary_dies_failover_failback_ext4(tmp_path, make_server):
    a, b = served_pair(tmp_path, make_server, str(SIZE))
    rnd = random.Random(7)
    proxy = CutProxy(str(tmp_path / "to-b.sock"), str(b.sock)).start()
    fs = NbdMount(tmp_path / "fs-a", uri(a.sock), mkfs_args=MKFS).start()
    agent = None
    try:
        synced, applied = {}, {}
        for step in range(3):
            workload(fs.mountpoint, rnd, step, synced)
            prepl("agent", a.state, "--secondary", uri(proxy.listen), "--once", "--timeout",
                  "60")
            applied = dict(synced)             # fsynced before that cycle's snappoint
        last = meta_json(b.state)["applied"]["target"]
        workload(fs.mountpoint, rnd, 3, synced)
        os.sync()
        # the primary dies in the middle of a cycle: its transfer crawls
        proxy.throttle(64 << 10)
        agent = subprocess.Popen(PREPL + ["agent", a.state, "--secondary", uri(proxy.listen),
                                          "--once", "--timeout", "60"],
                                 env=ENV, cwd=REPO, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (a.ctl("status")["links"]["default"].get("state") or "")
                 in ("transferring", "applying"), 30, "the cycle's transfer")
        a.kill()
        fs.kill()
        proxy.throttle(None)
        stop_process(agent)
        agent = None
    finally:
        if agent is not None:
            stop_process(agent)
        fs.kill()
    al = activity_log_blocks(a.state)           # before any restart: the crash's log
    a_after = blocks_after(a.state, last["seq"]) | al
    time.sleep(writeclock.PERIOD + divergence.CLOCK_MARGIN + 0.5)
    assert meta_json(b.state)["applied"]["target"] == last      # the held cycle never applied
    r = prepl("failover", b.state, "--peer", uri(a.sock))
    assert "does not answer" in r.stderr
    # the new primary's filesystem: journal replay, e2fsck clean, every file there
    with NbdMount(tmp_path / "fs-b", uri(b.sock)) as fsb:
        e2fsck_clean(fsb)
        got = tree(fsb.mountpoint)
        for path, digest in applied.items():
            assert got.get(path) == digest, f"{path} of the last applied interval is missing"
        new = {}
        d = os.path.join(fsb.mountpoint, "after-failover")
        os.makedirs(d)
        for i in range(20):
            data = rnd.randbytes(rnd.randint(1000, 300000))
            with open(os.path.join(d, f"f{i}"), "wb") as f:
                f.write(data)
            new[f"after-failover/f{i}"] = data
    fb = next(iv for iv in meta_json(b.state)["intervals"] if iv["closed_by"] == "failback")
    b_after = blocks_after(b.state, fb["seq"])
    # the old primary comes back: superseded, read-only
    a.start()
    assert meta_json(a.state)["superseded"]["learned_by"] == "probe"
    assert a.connect().is_read_only()
    rep = json.loads(prepl("failback", a.state, "--peer", uri(b.sock), "--json").stdout)
    assert rep["split_brain"] is False and rep["blocks"] == int(a_after.sum())
    # the new primary's ordinary agent, through a counting proxy to the old one
    to_a = CutProxy(str(tmp_path / "to-a.sock"), str(a.sock)).start()
    try:
        prepl("agent", b.state, "--secondary", uri(to_a.listen), "--once", "--timeout", "60")
        sent = to_a.bytes_up
    finally:
        to_a.stop()
    proxy.stop()
    assert image_digest(a) == image_digest(b)
    union = int((a_after | b_after).sum()) * BS
    print(f"failback: {sent} bytes reached the old primary; union of the maps {union} "
          f"bytes ({union / SIZE:.1%} of the volume; its activity log "
          f"{int(al.sum()) * BS} bytes)")
    assert 0.95 * union <= sent <= 1.05 * union
    with NbdMount(tmp_path / "fs-a2", uri(a.sock), readonly=True) as fsa:
        for path, data in new.items():
            with open(os.path.join(fsa.mountpoint, path), "rb") as f:
                assert f.read() == data
