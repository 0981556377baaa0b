"""A real filesystem: ext4 on the primary through nbdfuse + loop device;
files written; snappoint (filesystem frozen around it, as with any block
snapshot); files changed and deleted; the snapshot export mounted
read-only through nbdfuse + loop shows exactly the files as they were."""
import hashlib
import os
import random
import shutil
import subprocess

import pytest

from tests.conftest import prepl
from tests.harness.powerdisk import NbdMount

pytestmark = pytest.mark.slow


def tree(root):
    """{relative path: sha256} of every regular file, plus directories."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x != "lost+found"]
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root) + "/"] = "dir"
        for name in files:
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_snapshot_mount_shows_files_at_snappoint(tmp_path, make_server):
    st = tmp_path / "st"
    prepl("init", st, "--volume", tmp_path / "vol.img", "--size", "64M")
    srv = make_server(st).start()
    uri = f"nbd+unix:///?socket={srv.sock}"
    rnd = random.Random(3)
    with NbdMount(tmp_path / "primary", uri,
                  mkfs_args=["-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0"]) as fs:
        mnt = fs.mountpoint
        os.makedirs(os.path.join(mnt, "docs/sub"))
        for i in range(30):
            with open(os.path.join(mnt, "docs" if i % 2 else "docs/sub", f"f{i}"), "wb") as f:
                f.write(rnd.randbytes(rnd.randint(0, 300000)))
        subprocess.run(["fsfreeze", "-f", mnt], check=True)
        try:
            srv.ctl("snappoint_create", name="before")
        finally:
            subprocess.run(["fsfreeze", "-u", mnt], check=True)
        expected = tree(mnt)
        # change, append, delete, rename, create
        for i in range(0, 30, 3):
            os.unlink(os.path.join(mnt, "docs" if i % 2 else "docs/sub", f"f{i}"))
        with open(os.path.join(mnt, "docs/f1"), "ab") as f:
            f.write(b"appended" * 1000)
        with open(os.path.join(mnt, "docs/sub/f4"), "r+b") as f:
            f.write(b"overwritten")
        os.rename(os.path.join(mnt, "docs/f5"), os.path.join(mnt, "f5-moved"))
        with open(os.path.join(mnt, "new"), "wb") as f:
            f.write(rnd.randbytes(1 << 20))
        shutil.rmtree(os.path.join(mnt, "docs/sub"))
        subprocess.run(["sync", "-f", mnt], check=True)
        after = tree(mnt)
        assert after != expected
        with NbdMount(tmp_path / "snap", f"nbd+unix:///snap/before?socket={srv.sock}",
                      readonly=True) as snap:
            assert tree(snap.mountpoint) == expected
        assert tree(mnt) == after          # the primary is untouched by it
