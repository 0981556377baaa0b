"""The secondary's staging, commit and apply, in process: a real primary
Tracker produces intervals, a real Replica stages and applies them; the
replica must equal the primary's snapshot at the applied snappoint (I1),
bad manifests are refused with the replica untouched, commits are
idempotent, and a crash in the middle of an apply is redone at restart."""
import hashlib
import json
import os
import random

import pytest

from replication import faults, manifest, staging, state, workers
from replication.chain import union_runs
from replication.errors import PreplError, RefusedError
from replication.secondary import Replica
from replication.tracker import Tracker

SIZE = 4 << 20


def sha(b):
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def pair(tmp_path):
    state.init(tmp_path / "p", tmp_path / "p.img", size=SIZE)
    state.init(tmp_path / "s", tmp_path / "s.img", size=SIZE, role="secondary")
    t = Tracker(tmp_path / "p")
    t.start()
    r = Replica(tmp_path / "s")
    r.start()
    yield t, r, tmp_path
    r.wait_merged()
    t.close()
    t._lockfile.close()
    r._lockfile.close()


def read_snap(t, name):
    buf = bytearray(SIZE)
    t.vol.snap_pread(t.snapshot(name).c, buf, 0)
    return bytes(buf)


def read_replica(r):
    buf = bytearray(SIZE)
    r.pread(buf, 0)
    return bytes(buf)


def read_replica_file(tmp_path):
    """The replica volume on disk (without the overlay of a merge in progress)."""
    with open(tmp_path / "s.img", "rb") as f:
        return f.read()


def ship(t, r, base, name, tamper=None, split=False):
    """What the agent does for one interval: stage the union since base,
    then commit a manifest.  Returns the manifest.  split: each data piece
    is staged as two writes (not the transfer's request boundaries)."""
    body = t.body
    target = body.closed_by(name)
    runs = union_runs(t.sd, body, base["seq"] if base else None, target.seq)
    r.begin_staging(body.volume_uuid, "none" if base is None else str(base["seq"]),
                    str(target.seq))
    d = manifest.Digest()
    snap = t.snapshot(name)
    for off, n, z in manifest.pieces(runs):
        if z:
            r.staging.zero(n, off)
            d.add(off, n, True)
        else:
            buf = bytearray(n)
            t.vol.snap_pread(snap.c, buf, off)
            cut = (n // 2 // 4096) * 4096 if split and n > 4096 else n
            r.staging.write(bytes(buf[:cut]), off)
            if cut < n:
                r.staging.write(bytes(buf[cut:]), off + cut)
            d.add(off, n, False, bytes(buf))
    m = {"version": manifest.MANIFEST_VERSION, "primary_uuid": body.volume_uuid,
         "replica_uuid": r.body.volume_uuid, "size": body.size,
         "region_size": body.region_size, "block_size": body.block_size,
         "base": base, "target": {"seq": target.seq, "name": name},
         "extents": d.extents, "bytes": d.data_bytes, "digest": d.hexdigest()}
    if tamper:
        tamper(m)
    return m


def commit(r, m):
    """Manifest m (JSON, as the agent writes it) parsed and committed, as the
    commit export does; returns the receipt."""
    return r.commit(manifest.parse(json.dumps(m), m["target"]["seq"]))


def first_interval(t, r):
    """Volume of "1"s applied as interval 0 (snappoint s0) and merged."""
    t.vol.pwrite(b"1" * SIZE, 0)
    t.snappoints.create("s0")
    commit(r, ship(t, r, None, "s0"))
    r.wait_merged()


@pytest.mark.parametrize("split", [False, True], ids=["hashed-on-arrival", "read-back"])
def test_intervals_apply_exactly(pair, split, monkeypatch):
    t, r, tmp_path = pair
    read_backs = []
    real_digest_of = manifest.digest_of
    monkeypatch.setattr(manifest, "digest_of",
                        lambda *a, **k: read_backs.append(1) or real_digest_of(*a, **k))
    # the staging's writeback is started every 256 KiB staged, here
    monkeypatch.setattr(workers.Writeback, "STEP", 256 << 10)
    rnd = random.Random(1)
    base = None
    for i in range(5):
        for _ in range(20):
            off = rnd.randrange(SIZE - 70000)
            t.vol.pwrite(rnd.randbytes(rnd.randint(1, 70000)), off)
        t.vol.zero(8192 * (i + 1), 65536 * i)
        t.snappoints.create(f"s{i}")
        m = ship(t, r, base, f"s{i}", split=split)
        receipt = commit(r, m)
        assert read_replica(r) == read_snap(t, f"s{i}"), "I1: replica == snapshot"
        assert commit(r, m) == receipt, "a commit is idempotent"
        r.wait_merged()
        assert read_replica_file(tmp_path) == read_snap(t, f"s{i}"), "merged on disk"
        assert read_replica(r) == read_snap(t, f"s{i}")
        base = m["target"]
    # pieces staged as the transfer cuts them are verified from the hashes
    # taken on arrival; other boundaries make the commit read the staging back
    assert len(read_backs) == (5 if split else 0)
    assert r.body.bound.primary_uuid == t.body.volume_uuid
    r.staging.writeback.close()
    assert r.staging.writeback.kicks > 0
    staging = str(tmp_path / "s" / "staging")
    assert not [fd for fd in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{fd}").startswith(staging)], \
        "the writeback thread closed its descriptors"


@pytest.mark.parametrize("tamper,error,msg", [
    (lambda m: m.update(digest="0" * 64), RefusedError, "does not match the manifest"),
    (lambda m: m.update(bytes=m["bytes"] + 1), RefusedError, "does not match the manifest"),
    (lambda m: m.update(replica_uuid="x"), RefusedError, "manifest is for replica"),
    (lambda m: m.update(block_size=8192), RefusedError, "geometry mismatch"),
    (lambda m: m.update(version=99), RefusedError, "not supported"),
    (lambda m: m.pop("digest"), PreplError, "malformed manifest"),      # parse refuses these
    (lambda m: m.update(bytes="1"), PreplError, "malformed manifest"),
    (lambda m: m["target"].update(seq=0), PreplError, "malformed manifest"),
])
def test_bad_manifests_refused(pair, tamper, error, msg):
    t, r, _ = pair
    t.vol.pwrite(b"a" * 100000, 5000)
    t.snappoints.create("s0")
    commit(r, ship(t, r, None, "s0"))
    t.vol.pwrite(b"b" * 100000, 5000)
    t.snappoints.create("s1")
    before = read_replica(r)
    m = ship(t, r, {"seq": 0, "name": "s0"}, "s1", tamper)
    with pytest.raises(error, match=msg) as e:
        commit(r, m)
    assert type(e.value) is error
    assert read_replica(r) == before == read_snap(t, "s0")
    assert r.body.applied.target.name == "s0"


def test_stale_and_foreign_staging_refused(pair, tmp_path):
    t, r, _ = pair
    t.vol.pwrite(b"a" * 100000, 5000)
    t.snappoints.create("s0")
    m0 = ship(t, r, None, "s0")
    commit(r, m0)
    t.vol.pwrite(b"b" * 100000, 5000)
    t.snappoints.create("s1")
    with pytest.raises(RefusedError, match="stale or out-of-order"):
        r.begin_staging(t.body.volume_uuid, "none", "1")     # replays from scratch
    with pytest.raises(RefusedError, match="bound to primary volume"):
        r.begin_staging("another-volume", "0", "1")
    # a forged manifest for an applied interval is not a replay
    forged = dict(m0, digest="f" * 64)
    with pytest.raises(RefusedError):
        commit(r, forged)
    assert read_replica(r) == read_snap(t, "s0")


def test_crash_midway_through_apply_is_redone(pair, tmp_path):
    t, r, _ = pair
    rnd = random.Random(2)
    t.snappoints.create("s")
    commit(r, ship(t, r, None, "s"))
    for _ in range(50):
        t.vol.pwrite(rnd.randbytes(4096), rnd.randrange(SIZE // 4096) * 4096)
    t.snappoints.create("s0")
    m = ship(t, r, {"seq": 0, "name": "s"}, "s0")
    faults.set_for_test("secondary.apply.midway:raise")
    try:
        commit(r, m)                 # the receipt: applied, served as an overlay
        assert read_replica(r) == read_snap(t, "s0")
        with pytest.raises(faults.FaultInjected):
            r.wait_merged()         # the merge into the replica crashed halfway
    finally:
        faults.set_for_test("")
    half = read_replica_file(tmp_path)
    assert half != read_snap(t, "s0")              # really half-merged on disk
    assert read_replica(r) == read_snap(t, "s0")   # still served whole
    r._lockfile.close()
    r2 = Replica(tmp_path / "s")                    # restart: redo from staging
    try:
        assert read_replica(r2) == read_snap(t, "s0")
        assert read_replica_file(tmp_path) == read_snap(t, "s0")
        assert r2.body.applied.target.seq == m["target"]["seq"]
        assert commit(r2, m).target.to_json() == m["target"]   # the receipt is there
    finally:
        r2._lockfile.close()
        r._lockfile = r2._lockfile


def test_a_large_apply_keeps_readers_out_for_less_than_100ms(pair):
    """The switch and the end of the merge hold the replica's lock for a
    flag flip, not for the copy or an fsync."""
    t, r, _ = pair
    rnd = random.Random(5)
    t.snappoints.create("s")
    commit(r, ship(t, r, None, "s"))
    r.wait_merged()
    t.vol.pwrite(rnd.randbytes(SIZE), 0)            # every block changes
    t.snappoints.create("s0")
    r.rw.longest_write_hold = 0.0
    commit(r, ship(t, r, {"seq": 0, "name": "s"}, "s0"))
    r.wait_merged()
    assert read_replica(r) == read_snap(t, "s0")
    assert 0 < r.rw.longest_write_hold < 0.1, r.rw.longest_write_hold


def test_staging_files_go_only_after_the_metadata_forgot_them(pair, monkeypatch):
    """Regression (found by scripts/soak): the merge removed the staging's
    files before the metadata dropped the staging, so a kill -9 between two
    unlinks left a "complete" staging with its data file gone, and the secondary
    refused to start.  Every unlink must find the staging gone from disk."""
    t, r, _ = pair
    first_interval(t, r)
    t.vol.pwrite(b"2" * 100000, 0)
    t.snappoints.create("s1")
    m = ship(t, r, {"seq": 0, "name": "s0"}, "s1")
    on_disk = []
    real_unlink, real_rename = os.unlink, os.rename

    def unlink(path, *a, **k):
        on_disk.append(state.StateDir(r.sd.path).read_meta().staging)
        return real_unlink(path, *a, **k)

    def rename(src, dst, *a, **k):       # the data file into the trash
        if str(src).startswith(r.sd.p("staging") + "/"):
            on_disk.append(state.StateDir(r.sd.path).read_meta().staging)
        return real_rename(src, dst, *a, **k)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(staging, "KEEP", 0)      # the data file goes too
    commit(r, m)
    r.wait_merged()
    monkeypatch.setattr(os, "unlink", real_unlink)
    monkeypatch.setattr(os, "rename", real_rename)
    assert len(on_disk) >= 3 and all(st is None for st in on_disk), on_disk


def test_small_staging_file_is_reused_a_large_one_reaped(pair, monkeypatch):
    """The staging's data file is kept for the next interval while it holds
    at most staging.KEEP of the replica (written over, never freed per
    interval); a larger one goes to STATE/trash and the reaper removes it
    without anyone waiting.  Stale blocks of a kept file are never served."""
    t, r, tmp_path = pair
    data = tmp_path / "s" / "staging" / "data.log"
    trash = tmp_path / "s" / "trash"
    rnd = random.Random(7)
    t.vol.pwrite(rnd.randbytes(SIZE), 0)
    t.snappoints.create("s0")
    commit(r, ship(t, r, None, "s0"))            # in place: no data file
    r.wait_merged()
    base = {"seq": 0, "name": "s0"}
    t.vol.pwrite(rnd.randbytes(65536), 0)       # a small interval
    t.snappoints.create("s1")
    m = ship(t, r, base, "s1")
    commit(r, m)
    r.wait_merged()
    assert read_replica_file(tmp_path) == read_snap(t, "s1")
    ino = os.stat(data).st_ino                  # kept
    t.vol.pwrite(rnd.randbytes(65536), SIZE // 2)     # other blocks
    t.snappoints.create("s2")
    m2 = ship(t, r, m["target"], "s2")
    commit(r, m2)
    assert read_replica(r) == read_snap(t, "s2"), "the overlay serves no stale block"
    r.wait_merged()
    assert os.stat(data).st_ino == ino, "the same file was written over"
    assert read_replica_file(tmp_path) == read_snap(t, "s2")
    t.vol.pwrite(rnd.randbytes(SIZE // 2), 0)   # half the replica: > staging.KEEP
    t.snappoints.create("s3")
    commit(r, ship(t, r, m2["target"], "s3"))
    r.wait_merged()
    assert not data.exists()
    r.staging.reaper.wait()
    assert os.listdir(trash) == []
    assert read_replica(r) == read_snap(t, "s3")


def test_trash_left_by_a_stop_is_removed_at_the_next_start(pair):
    t, r, tmp_path = pair
    r.close()
    r._lockfile.close()
    trash = tmp_path / "s" / "trash"
    (trash / "123.img").write_bytes(b"x" * 100000)
    r2 = Replica(tmp_path / "s")
    r2.start()
    try:
        r2.staging.reaper.wait()
        assert os.listdir(trash) == []
    finally:
        r2.close()
        r2._lockfile.close()
        r._lockfile = open(os.devnull)      # the fixture closes it again


def test_reads_during_merge_see_the_new_image(pair):
    t, r, _ = pair
    t.vol.pwrite(b"1" * SIZE, 0)
    t.snappoints.create("s0")
    commit(r, ship(t, r, None, "s0"))
    t.vol.pwrite(b"2" * (SIZE // 2), 0)
    t.snappoints.create("s1")
    m = ship(t, r, {"seq": 0, "name": "s0"}, "s1")
    seen = []
    real_point = faults.point

    def read_midway(name):        # half of the runs are merged at this point
        if name == "secondary.apply.midway":
            seen.append(read_replica(r))
        real_point(name)
    faults.point = read_midway
    try:
        commit(r, m)
        r.wait_merged()
    finally:
        faults.point = real_point
    new = b"2" * (SIZE // 2) + b"1" * (SIZE // 2)
    assert seen and all(img == new for img in seen), "a read saw a half-applied image"
    assert read_replica(r) == b"2" * (SIZE // 2) + b"1" * (SIZE // 2)


def test_receiving_staging_with_half_removed_files_starts_afresh(pair):
    """A stop between two unlinks of an old staging (the metadata still says
    receiving) must not keep the secondary from starting: the staging starts
    afresh and the agent's next transfer fills it whole."""
    t, r, tmp_path = pair
    first_interval(t, r)
    base = {"seq": 0, "name": "s0"}
    for i, gone in enumerate((["data.bmap"], ["data.bmap", "zero.bmap"])):
        t.vol.pwrite(bytes([50 + i]) * 200000, 4096 * (i + 1))
        t.snappoints.create(f"s{i + 1}")
        ship(t, r, base, f"s{i + 1}")                  # staged, not committed
        assert r.body.staging.state == "receiving"
        r.close()
        r._lockfile.close()
        for name in gone:                              # an interrupted removal
            os.unlink(tmp_path / "s" / "staging" / name)
        r = Replica(tmp_path / "s")
        m = ship(t, r, base, f"s{i + 1}")
        commit(r, m)
        assert read_replica(r) == read_snap(t, f"s{i + 1}")
        r.wait_merged()
        assert read_replica_file(tmp_path) == read_snap(t, f"s{i + 1}")
        base = m["target"]
    r.close()
    r._lockfile.close()


def test_complete_staging_with_a_missing_map_is_refused(pair, monkeypatch):
    """A complete staging (the interval is recorded as applied) is redone
    from its files at start; with a map gone it must be refused, never
    redone as if nothing had been staged."""
    t, r, tmp_path = pair
    first_interval(t, r)
    t.vol.pwrite(b"2" * 200000, 4096)
    t.snappoints.create("s1")
    monkeypatch.setattr(Replica, "_merge_in_background", lambda self, st: None)
    commit(r, ship(t, r, {"seq": 0, "name": "s0"}, "s1"))
    assert r.body.staging.state == "complete"
    r.close()
    r._lockfile.close()
    os.unlink(tmp_path / "s" / "staging" / "data.bmap")
    with pytest.raises(FileNotFoundError):
        Replica(tmp_path / "s")
    r._lockfile = open(os.devnull)


def test_background_threads_run_at_lower_priority(pair):
    """The merge and the reaper step back for the server's request threads
    (niceness 10); the threads that serve requests keep theirs."""
    import threading
    from replication.priority import background_priority
    _, r, _ = pair
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    got = []

    def probe():
        background_priority()
        got.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    th = threading.Thread(target=probe)
    th.start()
    th.join()
    assert got == [max(10, mine)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    reaper = next(x for x in threading.enumerate() if x.name == "prepl-reaper")
    assert os.getpriority(os.PRIO_PROCESS, reaper.native_id) == max(10, mine)
