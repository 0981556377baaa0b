"""Exports, block status and NBD semantics of a primary, through libnbd."""
import subprocess

import nbd
import pytest

from tests.conftest import ENV, runs_to_set

MiB = 1 << 20


def list_exports(srv):
    r = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={srv.sock}"],
                       capture_output=True, text=True, env=ENV, check=True)
    import json
    return sorted(e["export-name"] for e in json.loads(r.stdout)["exports"])


def test_exports_follow_snapshots(primary):
    srv = primary()
    assert list_exports(srv) == [""]
    srv.ctl("snappoint_create", name="a")
    srv.ctl("snappoint_create", name="b", dataless=True)
    assert list_exports(srv) == ["", "snap/a"]
    before = srv.ctl("status")
    list_exports(srv)                      # listing opens every export ...
    after = srv.ctl("status")              # ... and changes nothing
    assert before["open_interval"] == after["open_interval"]
    assert before["snappoints"] == after["snappoints"]
    srv.ctl("snappoint_convert", name="a")
    assert list_exports(srv) == [""]
    for name in ("snap/a", "snap/b", "snap/nope", "nope", "snap/", "snap/../x"):
        with pytest.raises(nbd.Error) as e:
            srv.connect(name)
        assert "no export" in str(e.value) and e.value.errno == "ENOENT"


def test_snapshot_export_is_read_only(primary):
    srv = primary()
    srv.ctl("snappoint_create", name="a")
    s = srv.connect("snap/a")
    assert s.is_read_only()
    with pytest.raises(nbd.Error):
        s.pwrite(b"x" * 512, 0)
    assert s.pread(4096, 0) == bytes(4096)


def test_out_of_range_requests(primary):
    srv = primary("4M")
    h = srv.connect()
    h.set_strict_mode(0)                   # let the server see the bad requests
    for call in (lambda: h.pread(4096, 4 * MiB - 2048), lambda: h.pwrite(b"x" * 4096, 4 * MiB),
                 lambda: h.zero(8192, 4 * MiB - 4096), lambda: h.trim(1, 4 * MiB)):
        with pytest.raises(nbd.Error):
            call()
    assert srv.ctl("status")["open_interval"]["changed_blocks"] == 0
    h.pwrite(b"y" * 4096, 4 * MiB - 4096)  # the last block is fine
    assert h.pread(4096, 4 * MiB - 4096) == b"y" * 4096


def test_flush_fua_zero_trim_multiconn(primary):
    srv = primary("4M")
    h = srv.connect()
    assert h.can_flush() and h.can_fua() and h.can_zero() and h.can_trim()
    assert h.can_fast_zero() and h.can_multi_conn()
    h.pwrite(b"a" * 65536, 0, nbd.CMD_FLAG_FUA)
    h.flush()
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(65536, 0) == bytes(65536)
    h.pwrite(b"b" * 8192, 65536)
    h.trim(4096, 65536)
    assert h.pread(8192, 65536) == bytes(4096) + b"b" * 4096
    h.zero(1000, 200000)                   # partial block: data, not a zero block
    maps = srv.ctl("maps")["intervals"][-1]
    assert runs_to_set(maps["zmap"]) == set(range(16)) | {16}
    assert runs_to_set(maps["bmap"]) == set(range(18)) | {48, 49}
    # a second connection sees the first one's flushed writes (multi-conn)
    assert srv.connect().pread(8192, 65536) == bytes(4096) + b"b" * 4096


def test_parallel_writes_run_in_c_at_once(primary):
    srv = primary("64M")
    h = srv.connect()
    buf = nbd.Buffer.from_bytearray(bytearray(b"z" * MiB))
    for _ in range(4):
        for i in range(32):
            h.aio_pwrite(buf, i * MiB, completion=lambda err: 1)
        while h.aio_in_flight() > 0:
            h.poll(-1)
    assert srv.ctl("status")["max_concurrent_writers_in_c"] >= 2
