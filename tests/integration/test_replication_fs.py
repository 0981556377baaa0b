"""A filesystem through replication: a file workload on ext4 on the primary
(create, append, rename, delete, fsync), with agent cycles in between and
no freeze; after each applied interval a copy of the replica and a copy of
the primary's snapshot at that snappoint are mounted (journal replay on the
copies) and their file trees are equal."""
import hashlib
import os
import random
import shutil
import subprocess

import pytest

from replication.agent import Agent
from tests.conftest import served_pair
from tests.harness.powerdisk import NbdMount
from tests.integration.test_filesystem import tree
pytestmark = pytest.mark.slow


SIZE = 64 << 20


def export_to_file(srv, export, path):
    h = srv.connect(export)
    try:
        with open(path, "wb") as f:
            for off in range(0, SIZE, 8 << 20):
                f.write(h.pread(8 << 20, off))
    finally:
        h.shutdown()


def mounted_tree(image, mnt):
    """Tree of the ext4 in image (a copy: the mount may replay its journal)."""
    os.makedirs(mnt, exist_ok=True)
    dev = subprocess.run(["losetup", "-f", "--show", image], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        subprocess.run(["mount", "-t", "ext4", dev, mnt], check=True)
        try:
            return tree(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def workload(mnt, rnd, step, synced):
    d = os.path.join(mnt, "data")
    os.makedirs(d, exist_ok=True)
    names = sorted(os.listdir(d))
    for i in range(10):
        data = rnd.randbytes(rnd.randint(0, 200000))
        with open(os.path.join(d, f"s{step}-{i}"), "wb") as f:
            f.write(data)
            if i % 3 == 0:
                f.flush()
                os.fsync(f.fileno())
                synced[f"data/s{step}-{i}"] = hashlib.sha256(data).hexdigest()
    for name in names[:3]:
        synced.pop(f"data/{name}", None)          # appended, not fsynced again
        with open(os.path.join(d, name), "ab") as f:
            f.write(rnd.randbytes(5000))
    if len(names) > 6:
        for name in names[4:6]:
            synced.pop(f"data/{name}", None)
        os.unlink(os.path.join(d, names[4]))
        os.rename(os.path.join(d, names[5]), os.path.join(d, f"renamed-{step}"))


def test_ext4_through_cycles(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, str(SIZE))
    # whole snapshots: snap/dr.N is the witness of each cycle's image
    agent = Agent(prim.state, f"nbd+unix:///?socket={sec.sock}", "dr", whole_snapshot=True)
    rnd = random.Random(11)
    with NbdMount(tmp_path / "fs", f"nbd+unix:///?socket={prim.sock}",
                  mkfs_args=["-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0"]) as fs:
        synced = {}
        for step in range(3):
            workload(fs.mountpoint, rnd, step, synced)
            receipt = agent.cycle()                 # no freeze: crash-consistent images
            name = receipt.target.name
            export_to_file(sec, "", tmp_path / "replica.copy")
            export_to_file(prim, f"snap/{name}", tmp_path / "snap.copy")
            got = mounted_tree(tmp_path / "replica.copy", tmp_path / "m1")
            want = mounted_tree(tmp_path / "snap.copy", tmp_path / "m2")
            assert got == want, f"the replica's files differ from the snapshot at {name}"
            for path, digest in synced.items():     # fsynced before the cycle: there
                assert got.get(path) == digest, f"{path} fsynced but not replicated as such"
    shutil.rmtree(tmp_path / "m1", ignore_errors=True)
