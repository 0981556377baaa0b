"""Out of space during copy-on-write: the client's write succeeds, the
snapshot is reported invalid (and its export disappears), nothing else
changes.  The state directory sits on a small real filesystem (tmpfs)."""
import os
import random

import nbd
import pytest

from tests.conftest import prepl, runs_to_set, wait_for

MiB = 1 << 20
REGION = 65536


def test_cow_out_of_space_invalidates_snapshot_only(tmp_path, small_fs, make_server):
    vol = tmp_path / "vol.img"
    rnd = random.Random(8)
    original = rnd.randbytes(16 * MiB)
    vol.write_bytes(original)
    st = small_fs / "st"
    prepl("init", st, "--volume", vol)
    srv = make_server(st).start()
    srv.ctl("snappoint_create", name="old", dataless=True)
    srv.ctl("snappoint_create", name="s")
    h = srv.connect()
    model = bytearray(original)
    for r in range(64):                      # 64 x 60 KiB copied: far beyond 1.5 MiB
        data = rnd.randbytes(REGION - 4096)
        h.pwrite(data, r * REGION + 4096)    # every write must succeed
        model[r * REGION + 4096:(r + 1) * REGION] = data
    h.flush()
    assert h.pread(16 * MiB, 0) == bytes(model)
    st_ = wait_for(lambda: (lambda s: s if s["snappoints"][1]["snapshot"] == "invalid" else None)(
        srv.ctl("status")), 10, "the invalidation to be reported")
    sp = {s["name"]: s for s in st_["snappoints"]}
    assert "No space left on device" in sp["s"]["invalidated"]
    assert sp["old"]["snapshot"] == "none" and sp["old"]["invalidated"] is None
    with pytest.raises(nbd.Error):
        srv.connect("snap/s")
    maps = srv.ctl("maps")
    assert runs_to_set(maps["intervals"][-1]["cmap"]) == set(range(64))
    assert maps["snapshots"] == {}
    assert not os.listdir(st / "snaps"), "the invalid snapshot's space is freed"
    # and the server goes on: new snappoints work once there is space again
    srv.ctl("snappoint_create", name="again")
    assert srv.connect("snap/again").pread(4096, 0) == bytes(model[:4096])
    out = prepl("snappoint", "list", st).stdout
    assert "invalid" in out


def test_volume_out_of_space_reaches_the_client_as_enospc(tmp_path, small_fs, make_server):
    # a sparse 8 MiB volume on a 1.5 MiB filesystem: writes fail for real
    st = tmp_path / "st"
    prepl("init", st, "--volume", small_fs / "vol.img", "--size", "8M")
    srv = make_server(st).start()
    h = srv.connect()
    with pytest.raises(nbd.Error) as e:
        for r in range(128):
            h.pwrite(b"x" * REGION, r * REGION)
    assert e.value.errno == "ENOSPC"   # libnbd names the errno
    assert srv.connect().pread(512, 0) == b"x" * 512   # and it keeps serving
