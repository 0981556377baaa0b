"""Every metadata write of a scripted scenario fails once, on both roles,
with ENOSPC and with EIO, at the temp file's write and at its fsync: the
server stays up, its status says what the metadata file says, the failed
operation reports the error, a retry succeeds, and a cycle afterwards makes
the replica equal to the primary.  A failure after the rename (the
directory's fsync) stops the server (fail-stop); its next start trusts the
file.  And a failed commit record never yields a receipt (I1, I2)."""
import errno
import os
import subprocess

import pytest

from replication import control
from replication.errors import PreplError
from replication.state import StateDir
from tests.conftest import ENV, PREPL, meta_json, prepl, wait_for
from tests.integration.test_exports import list_exports
from tests.integration.test_secondary_exports import read_doc, ship

MiB = 1 << 20
SIZE = 8 * MiB
FAULTS = [("meta.write", "ENOSPC"), ("meta.write", "EIO"),
          ("meta.fsync", "ENOSPC"), ("meta.fsync", "EIO")]


@pytest.fixture
def faulty_pair(tmp_path, make_server):
    """A served primary and secondary whose I/O fault points read a file of
    their own; returns (primary, secondary, arm): arm(server, POINT, ERRNO,
    COUNT, AFTER) arms one point of that server (replication/faults.py),
    arm(server) disarms."""
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img", "--size", str(SIZE))
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    servers = [make_server(tmp_path / "p"), make_server(tmp_path / "s")]
    servers[0].extra = ["--sync-interval", "0.2"]     # the volume's durable points
    for s in servers:
        s.fault_file = tmp_path / f"faults.{os.path.basename(s.state)}"
        s.env = {"PREPL_FAULT_FILE": str(s.fault_file)}
        s.start()

    def arm(srv, point=None, err=None, count=1, after=0):
        srv.fault_file.write_text(f"{point} {err} {count} {after}\n" if point else "")
    return servers[0], servers[1], arm


def meta(srv):
    return meta_json(srv.state)


def primary_view_matches_file(prim):
    """status (what memory says) against meta.json (what the disk says)."""
    st, body = prim.ctl("status"), meta(prim)
    assert [(s["name"], s["interval"], s["snapshot"]) for s in st["snappoints"]] == \
        [(sp["name"], sp["seq"], "valid" if sp["snapshot"] else
          ("invalid" if sp["invalidated"] else "none")) for sp in body["snappoints"]]
    assert st["intervals"] == len(body["intervals"])
    assert st["open_interval"]["seq"] == body["intervals"][-1]["seq"]
    for name, link in st["links"].items():
        durable = {k: v for k, v in link.items() if k in ("replica_uuid", "secondary", "cursor",
                                                          "last_cycle")}
        assert durable == {k: v for k, v in body["links"][name].items() if k in durable}
    assert set(st["links"]) == set(body["links"])
    listed = {e for e in list_exports(prim) if e.startswith("snap/")}
    assert listed == {f"snap/{sp['name']}" for sp in body["snappoints"] if sp["snapshot"]}


def secondary_view_matches_file(sec):
    info, body = read_doc(sec, "info"), meta(sec)
    assert info["applied"] == body.get("applied")
    assert info["bound"] == body.get("bound")
    st = body.get("staging")
    assert info["staging"] == ({k: v for k, v in st.items() if k != "files"} if st else None)


def fails_with(err, f, *args, **kw):
    with pytest.raises(PreplError) as e:
        f(*args, **kw)
    assert os.strerror(getattr(errno, err)) in str(e.value), str(e.value)
    return e.value


def test_primary_metadata_write_failures(faulty_pair):
    prim, sec, arm = faulty_pair
    h = prim.connect()
    h.pwrite(b"a" * 65536, 0)
    ops = [
        ("create", lambda: prim.ctl("snappoint_create", name="a")),
        ("convert", lambda: prim.ctl("snappoint_convert", name="a")),
        ("create-b", lambda: prim.ctl("snappoint_create", name="b")),
        ("create-c", lambda: prim.ctl("snappoint_create", name="c", dataless=True)),
        ("delete-closed-next", lambda: prim.ctl("snappoint_delete", name="b")),
        ("delete-open-next", lambda: prim.ctl("snappoint_delete", name="c")),
        ("link", lambda: prim.ctl("link_update", name="l1",
                                  fields={"secondary": "nbd://example:10809", "state": "idle"})),
        ("resync", lambda: prim.ctl("link_resync", name="l1")),
    ]
    for i, (what, op) in enumerate(ops):
        for j, (point, err) in enumerate(FAULTS):
            before = meta(prim)
            # a block of its own each time: a write after a failed switch
            # whose bits went nowhere would be missing from the replica
            h.pwrite(bytes([i * 16 + j + 1]) * 4096, (i * len(FAULTS) + j) * 65536)
            arm(prim, point, err)
            fails_with(err, op)
            assert prim.proc.poll() is None, f"{what}: the server stopped"
            assert meta(prim) == before, f"{what} at {point}/{err}: the file changed"
            primary_view_matches_file(prim)
        arm(prim)
        op()                          # the retry after the fault cleared works
        primary_view_matches_file(prim)
        h.pwrite(b"w" * 4096, 7 * MiB)              # and the volume is served all along
        assert h.pread(4096, 7 * MiB) == b"w" * 4096
    assert [sp["name"] for sp in meta(prim)["snappoints"]] == ["a"]
    # the chain still tells every change: a cycle makes the replica equal
    h.flush()
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once",
          "--timeout", "30")
    assert sec.connect().pread(SIZE, 0) == h.pread(SIZE, 0)
    # stop: the clean record fails -> the stop reports it; retried, it works
    for point, err in FAULTS:
        arm(prim, point, err)
        fails_with(err, prim.ctl, "shutdown")
        assert meta(prim)["clean"] is False and prim.proc.poll() is None
    arm(prim)
    prim.ctl("shutdown")
    assert meta(prim)["clean"] is True


def test_primary_fail_stop_after_rename(faulty_pair):
    """The directory's fsync fails after the rename: the server stops at
    once; the next start trusts the file (and recovers as after a crash)."""
    prim, sec, arm = faulty_pair
    h = prim.connect()
    h.pwrite(b"x" * 8192, 4096)
    h.flush()
    restarts = 0
    for op, args, check in [
            ("snappoint_create", {"name": "f1"}, lambda b: "f1" in names(b)),
            ("link_update", {"name": "l", "fields": {"secondary": "nbd://x:1"}},
             lambda b: b["links"]["l"]["secondary"] == "nbd://x:1"),
            ("snappoint_delete", {"name": "f1"}, lambda b: "f1" not in names(b))]:
        arm(prim, "meta.dirsync", "EIO")
        with pytest.raises(PreplError):
            prim.ctl(op, **args)
        prim.proc.wait(10)
        assert prim.output().count("stopping the server") == restarts + 1
        restarts += 1
        arm(prim)
        assert check(meta(prim))          # the renamed file is what the next start trusts
        prim.start()
        assert prim.ctl("status")["recovered"] is not None
        primary_view_matches_file(prim)
        h = prim.connect()
    h.pwrite(b"y" * 4096, 3 * MiB)
    h.flush()
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once",
          "--timeout", "30")
    assert sec.connect().pread(SIZE, 0) == h.pread(SIZE, 0)


def names(body):
    return [sp["name"] for sp in body["snappoints"]]


def staging_of(sec, name):
    st = meta(sec).get("staging")
    return st is not None and st["state"] == "receiving" and st["target"] == name


def test_secondary_metadata_write_failures(faulty_pair):
    prim, sec, arm = faulty_pair
    h = prim.connect()
    base = None
    for i, phase in enumerate(("staging", "commit", "merge")):
        h.pwrite(bytes([i + 1]) * 65536, i * MiB)
        prim.ctl("snappoint_create", name=f"s{i}")
        target = str(meta(prim)["intervals"][-2]["seq"])
        image = prim.connect(f"snap/s{i}").pread(SIZE, 0)
        previous = sec.connect().pread(SIZE, 0)
        for point, err in FAULTS:
            before = meta(sec)
            started = 0 if staging_of(sec, target) else 1   # its record passes first
            if phase == "staging":      # the first staged write starts the staging
                arm(sec, point, err)
                with pytest.raises(Exception) as e:
                    ship(prim, sec, base, f"s{i}")
                assert os.strerror(getattr(errno, err)) in str(e.value)
            elif phase == "commit":     # staging works, its commit record fails
                arm(sec, point, err, 1, started)
                _, reply = ship(prim, sec, base, f"s{i}")
                assert reply["ok"] is False and os.strerror(getattr(errno, err)) in \
                    reply["error"], reply
            else:                       # commit works, the merge's record fails
                arm(sec, point, err, 1, started + 1)
                _, reply = ship(prim, sec, base, f"s{i}")
                assert reply["ok"] is True
                wait_for(lambda: "merging interval" in sec.output(), 10, "the merge's failure")
                assert meta(sec).get("staging")["state"] == "complete"
                assert sec.connect().pread(SIZE, 0) == image      # the overlay serves it
                secondary_view_matches_file(sec)
                break
            assert sec.proc.poll() is None
            if phase == "staging" or not started:
                assert meta(sec) == before
            else:       # the staging's start was recorded, nothing after it
                assert staging_of(sec, target) and meta(sec).get("applied") == before.get("applied")
            secondary_view_matches_file(sec)
            assert sec.connect().pread(SIZE, 0) == previous      # I1: the old image
            assert read_doc(sec, f"commit/{target}")["ok"] is False     # no receipt
        arm(sec)
        if phase != "merge":
            _, reply = ship(prim, sec, base, f"s{i}")       # the retry
            assert reply["ok"] is True, reply
            wait_for(lambda: meta(sec).get("staging") is None, 10, "the merge")
        base = reply["receipt"]["target"]
        assert sec.connect().pread(SIZE, 0) == image
        secondary_view_matches_file(sec)
    # the failed merge is retried before the next staging; a cycle after all
    h.pwrite(b"z" * 4096, 5 * MiB)
    prim.ctl("snappoint_create", name="s9")
    _, reply = ship(prim, sec, base, "s9")
    assert reply["ok"] is True, reply
    assert sec.connect().pread(SIZE, 0) == prim.connect("snap/s9").pread(SIZE, 0)
    wait_for(lambda: meta(sec).get("staging") is None, 10, "the merge")
    assert meta(sec).get("applied")["target"]["name"] == "s9"


def test_secondary_fail_stop_at_commit(faulty_pair, tmp_path):
    """The commit's record is renamed in place but not synced: the server
    stops; restarted, it trusts the file (the interval is applied: the
    merge is redone) and the next interval follows."""
    prim, sec, arm = faulty_pair
    h = prim.connect()
    h.pwrite(b"q" * 65536, 2 * MiB)
    prim.ctl("snappoint_create", name="a")
    arm(sec, "meta.dirsync", "EIO", 1, 1)    # staging start passes, the commit's fails
    with pytest.raises(Exception):
        ship(prim, sec, None, "a")
    sec.proc.wait(10)
    assert "stopping the server" in sec.output()
    arm(sec)
    sec.start()
    assert meta(sec).get("applied")["target"]["name"] == "a"
    assert sec.connect().pread(SIZE, 0) == prim.connect("snap/a").pread(SIZE, 0)
    h.pwrite(b"r" * 4096, 0)
    prim.ctl("snappoint_create", name="b")
    _, reply = ship(prim, sec, meta(sec)["applied"]["target"], "b")
    assert reply["ok"] is True, reply
    assert sec.connect().pread(SIZE, 0) == prim.connect("snap/b").pread(SIZE, 0)


def test_agent_gets_no_receipt_when_the_commit_record_fails(faulty_pair):
    """The secondary's commit record fails (every time while armed): the
    agent retries the commit on a new connection and must not get a
    receipt; its cursor stays, the replica serves the previous image and
    the staging is sent again once the fault clears."""
    prim, sec, arm = faulty_pair
    h = prim.connect()
    h.pwrite(b"1" * 65536, 0)
    agent = ["agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once"]
    prepl(*agent, "--timeout", "30")
    first = sec.connect().pread(SIZE, 0)
    cursor = meta(prim)["links"]["default"]["cursor"]
    applied = meta(sec).get("applied")
    h.pwrite(b"2" * 65536, MiB)
    h.flush()
    arm(sec, "meta.write", "ENOSPC", 1000, 1)   # the staging starts; every record after fails
    r = prepl(*agent, "--timeout", "6", check=False)
    assert r.returncode != 0
    assert "No space left on device" in r.stderr, r.stderr
    assert meta(sec).get("applied") == applied
    assert read_doc(sec, "info")["applied"] == applied
    assert meta(prim)["links"]["default"]["cursor"] == cursor
    assert sec.connect().pread(SIZE, 0) == first
    assert cursor in [s["name"] for s in prim.ctl("snappoint_list")]   # the base is kept
    arm(sec)
    prepl(*agent, "--timeout", "30")
    assert sec.connect().pread(SIZE, 0) == h.pread(SIZE, 0)
    assert meta(sec).get("applied")["target"]["seq"] > applied["target"]["seq"]
    assert control.request(StateDir(sec.state).control_socket, "status")["applied"] == \
        meta(sec).get("applied")


def test_a_failed_volume_sync_reaches_the_clients_flush(faulty_pair):
    """An EIO from a durable point of the volume (the server's background
    fdatasync, replication/durability.py) is never retried into a success:
    every later flush of the volume's clients fails, the server takes no
    snappoint (nothing is sent of data the kernel may have dropped), and
    the closed interval's extent stays in the activity log.  A restart
    recovers, and the next cycle makes the replica the primary."""
    import nbd
    prim, sec, arm = faulty_pair
    h = prim.connect()
    h.pwrite(b"d" * 4096, 0)
    h.flush()
    arm(prim, "primary.volume.durable", "EIO")
    prim.ctl("snappoint_create", name="a")         # the snappoint does not sync the volume
    wait_for(lambda: prim.ctl("status")["volume_sync_error"] is not None, 10,
             "the durable point to fail")
    st = prim.ctl("status")
    assert st["volume_sync_error"] == os.strerror(errno.EIO)
    d = st["volume_durability"]
    assert d["syncs"] == 0 and d["pending_extents"] == 1, d
    h.pwrite(b"e" * 4096, 4096)
    with pytest.raises(nbd.Error) as e:
        h.flush()
    assert e.value.errno in ("EIO", errno.EIO)
    arm(prim)
    fails_with("EIO", prim.ctl, "snappoint_create", name="b")   # sticky until a restart
    assert names(meta(prim)) == ["a"] and [s["name"] for s in prim.ctl("snappoint_list")] == ["a"]
    assert prim.ctl("status")["volume_durability"]["pending_extents"] == 1
    prim.kill()
    prim.start()                 # the restart recovers: the log's extents count as changed
    assert prim.ctl("status")["volume_sync_error"] is None
    h = prim.connect()
    h.flush()
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once",
          "--timeout", "30")
    assert sec.connect().pread(SIZE, 0) == h.pread(SIZE, 0)


def test_a_failed_staging_sync_drops_the_staging(faulty_pair):
    """An EIO from the commit's fdatasync of the staging: the commit fails,
    the staging is dropped (never committed from pages the kernel may have
    lost), and the interval staged again applies."""
    import nbd
    prim, sec, arm = faulty_pair
    h = prim.connect()
    h.pwrite(b"s" * 65536, MiB)
    prim.ctl("snappoint_create", name="a")
    arm(sec, "secondary.staging.fdatasync", "EIO")
    with pytest.raises(nbd.Error):
        ship(prim, sec, None, "a")
    assert "must be sent again" in sec.output()
    _, reply = commit_again(prim, sec, "a")
    assert reply["ok"] is False and "nothing is staged" in reply["error"]
    assert meta(sec).get("applied") is None
    _, reply = ship(prim, sec, None, "a")
    assert reply["ok"] is True, reply
    assert sec.connect().pread(SIZE, 0) == prim.connect("snap/a").pread(SIZE, 0)


def commit_again(prim, sec, name):
    """The commit of interval NAME sent again without staging anything."""
    from replication import manifest
    from tests.integration.test_secondary_exports import commit, interval_runs
    body, target, runs = interval_runs(prim, None, name)
    src = prim.connect(f"snap/{name}")
    d = manifest.Digest()
    for off, n, z in manifest.pieces(runs):
        d.add(off, n, z, None if z else src.pread(n, off))
    return commit(sec, body, None, target, name, d)


@pytest.mark.parametrize("unclean", [False, True], ids=["clean", "after-a-crash"])
def test_a_start_whose_record_fails_does_not_serve(tmp_path, make_server, unclean):
    """The start records the server as running (clean: false), after a crash
    also what recovery did: if that write fails the server does not serve
    (exit 1, the message, no traceback) and the file is as it was; once the
    fault clears it starts (and recovers)."""
    st = tmp_path / "st"
    prepl("init", st, "--volume", tmp_path / "v.img", "--size", "4M")
    if unclean:
        srv = make_server(st).start()
        srv.connect().pwrite(b"u" * 4096, 0)
        srv.kill()
    before = (st / "meta.json").read_bytes()
    ffile = tmp_path / "faults"
    ffile.write_text("meta.write ENOSPC 1\n")
    env = dict(ENV, PREPL_FAULT_FILE=str(ffile))
    r = subprocess.run(PREPL + ["serve", st, "--unix", tmp_path / "s.sock", "--background",
                                "--timeout", "20"], env=env, capture_output=True, text=True,
                       timeout=60)
    log = (st / "server.log").read_text() if (st / "server.log").exists() else ""
    assert r.returncode != 0 and "No space left on device" in r.stderr + log, (r.stderr, log)
    assert "Traceback" not in r.stderr + log
    assert (st / "meta.json").read_bytes() == before
    assert not StateDir(st).is_locked()              # nothing serves it
    ffile.write_text("")
    srv = make_server(st).start()
    assert (srv.ctl("status")["recovered"] is not None) == unclean
    assert srv.connect().pread(4096, 0) == (b"u" * 4096 if unclean else bytes(4096))
