"""The patent's Figs. 4a-4d, exactly, through NBD: four regions A B C D."""
from tests.conftest import prepl, runs_to_set

R = 65536
BLK = 4096


def region(tag):
    return (tag.encode() * R)[:R]


def snap_extents(server, name):
    h = server.connect(f"snap/{name}", meta=True)
    out = []

    def cb(meta, off, entries, err):
        for i in range(0, len(entries), 2):
            out.append((entries[i], entries[i + 1]))
    off = 0
    while off < h.get_size():
        before = sum(n for n, _ in out)
        h.block_status(h.get_size() - off, off, cb)
        off = sum(n for n, _ in out)
        assert off > before
    h.shutdown()
    return out


def data_blocks(extents):
    """Blocks reported as data (type without the hole flag)."""
    blocks, off = set(), 0
    for n, t in extents:
        if not t & 1:
            blocks |= set(range(off // BLK, (off + n) // BLK))
        off += n
    return blocks


def interval_closed_by(maps, name):
    return next(iv for iv in maps["intervals"] if iv["closed_by"] == name)


def test_figs_4a_to_4d(tmp_path, make_server):
    vol = tmp_path / "vol.img"
    vol.write_bytes(region("A0") + region("B0") + region("C0") + region("D0"))
    st = tmp_path / "state"
    prepl("init", st, "--volume", vol)
    srv = make_server(st).start()
    h = srv.connect()

    # 4a: snappoint T1 with a snapshot, then A1 overwrites A
    srv.ctl("snappoint_create", name="T1")
    h.pwrite(region("A1"), 0)
    s1 = srv.connect("snap/T1")
    assert s1.pread(R, 0) == region("A0"), "snapshot T1 must hold A0"
    assert h.pread(R, 0) == region("A1")
    maps = srv.ctl("maps")
    # valid maps are per block (copy-on-write at block granularity): region A
    assert runs_to_set(maps["snapshots"]["T1"]["vmap"]) == set(range(16)), "valid map of T1: A"
    assert runs_to_set(maps["intervals"][-1]["cmap"]) == {0}, "open change map: bit 0"

    # 4b/4c: snappoint T2: a new snapshot with a clear valid map, a new change map
    srv.ctl("snappoint_create", name="T2")
    maps = srv.ctl("maps")
    assert maps["snapshots"]["T2"]["vmap"] == []
    assert maps["intervals"][-1]["cmap"] == []
    assert runs_to_set(interval_closed_by(maps, "T2")["cmap"]) == {0}

    # 4d: A2 and B1 (B1 only two blocks of B)
    h.pwrite(region("A2"), 0)
    b1 = b"B1" * (BLK)                      # 8 KiB = blocks 17, 18
    h.pwrite(b1, R + BLK)
    s2 = srv.connect("snap/T2")
    assert s2.pread(R, 0) == region("A1"), "snapshot T2 must hold A1"
    assert s2.pread(R, R) == region("B0"), "snapshot T2 must hold B0"
    assert s1.pread(4 * R, 0) == region("A0") + region("B0") + region("C0") + region("D0")
    assert s2.pread(2 * R, 2 * R) == region("C0") + region("D0")
    assert h.pread(2 * R, 0) == region("A2") + region("B0")[:BLK] + b1 + region("B0")[3 * BLK:]
    maps = srv.ctl("maps")
    assert runs_to_set(interval_closed_by(maps, "T2")["cmap"]) == {0}, \
        "the earlier change map is unchanged and still marks A"
    assert runs_to_set(maps["intervals"][-1]["cmap"]) == {0, 1}
    # only the blocks of B that B1 overwrote were copied
    assert runs_to_set(maps["snapshots"]["T2"]["vmap"]) == set(range(16)) | {17, 18}
    assert runs_to_set(maps["snapshots"]["T1"]["vmap"]) == set(range(16)) | {17, 18}

    # block status of snap/NAME: exactly the blocks written in the interval NAME closes
    srv.ctl("snappoint_create", name="T3")
    assert data_blocks(snap_extents(srv, "T1")) == set()
    assert data_blocks(snap_extents(srv, "T2")) == set(range(16))
    assert data_blocks(snap_extents(srv, "T3")) == set(range(16)) | {17, 18}
    # holes never claim zero: a copier must copy them
    assert all(t == 1 for n, t in snap_extents(srv, "T1"))
