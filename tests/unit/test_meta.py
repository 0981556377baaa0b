"""replication/meta.py: a change is written durably before it becomes the
body; a failed write leaves the file and the body as they were; a failure
after the rename is fail-stop; damaged files are refused; the typed records
read exactly what the JSON holds, write it back unchanged, and refuse a
field of the wrong type by its name."""
import copy
import errno
import hashlib
import json
import os
import tarfile

import pytest

from replication import faults, meta
from replication.errors import PreplError, StateError

BODY = {"volume_uuid": "u", "volume": "/v", "size": 4096, "region_size": 4096,
        "block_size": 4096, "role": "primary", "generation": 1, "clean": True,
        "intervals": [{"seq": 0, "maps": {"cmap": "i0-1.cmap"}}], "snappoints": [],
        "links": {}, "al_extent": 4096, "created": 1.5, "tracked_since_empty": True,
        "next_seq": 1, "next_snap_id": 1, "next_file_id": 2}


def write_raw(path, body):
    """meta.json holding JSON body, with its checksum (as the code under
    test would write it, computed here independently)."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc = {"format": meta.FORMAT, "body": body,
           "checksum": "sha256:" + hashlib.sha256(canon).hexdigest()}
    (path / "meta.json").write_text(json.dumps(doc))


def raw(path):
    return json.loads((path / "meta.json").read_text())["body"]


@pytest.fixture
def md(tmp_path):
    write_raw(tmp_path, BODY)
    ffile = tmp_path / "faults"
    faults.set_file_for_test(ffile)
    yield meta.Metadata(str(tmp_path), meta.read(str(tmp_path))), ffile
    faults.set_file_for_test(None)


def test_a_change_is_durable_then_visible(md, tmp_path):
    m, _ = md
    with m.change() as b:
        b.links["x"] = meta.Link(cursor="a")
        assert m.body.links == {}             # not yet: nothing is written
    assert m.body.links == {"x": meta.Link(cursor="a")}
    assert meta.read(str(tmp_path)) == m.body
    assert raw(tmp_path)["links"] == {"x": {"replica_uuid": None, "secondary": None,
                                            "cursor": "a", "last_cycle": None,
                                            "resync": False, "tls_psk": None,
                                            "paused": False}}
    assert not os.path.exists(tmp_path / "meta.json.tmp")


@pytest.mark.parametrize("point", ["meta.write", "meta.fsync", "meta.rename"])
@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
def test_a_failed_write_changes_nothing(md, tmp_path, point, err):
    m, ffile = md
    before = (tmp_path / "meta.json").read_bytes()
    ffile.write_text(f"{point} {err}\n")
    with pytest.raises(meta.MetadataWriteError) as e:
        with m.change() as b:
            b.clean = False
    assert e.value.errno == getattr(errno, err) and os.strerror(e.value.errno) in str(e.value)
    assert m.body.clean is True and m.body == meta.Body.from_json(BODY)
    assert (tmp_path / "meta.json").read_bytes() == before
    assert not os.path.exists(tmp_path / "meta.json.tmp")
    with m.change() as b:                     # the fault is used up: a retry works
        b.clean = False
    assert raw(tmp_path)["clean"] is False and m.body.clean is False


def test_an_exception_inside_the_change_writes_nothing(md, tmp_path):
    m, _ = md
    with pytest.raises(KeyError):
        with m.change() as b:
            b.clean = False
            b.intervals[0].closed_by = "x"    # nested records are copies too
            raise KeyError("x")
    assert m.body.clean is True and m.body.intervals[0].closed_by is None
    assert raw(tmp_path)["clean"] is True


def test_a_failed_directory_sync_is_fail_stop(md, tmp_path):
    m, ffile = md
    stopped = []
    m.fail_stop = stopped.append
    ffile.write_text("meta.dirsync EIO\n")
    with pytest.raises(meta.MetadataFailStop):
        with m.change() as b:
            b.clean = False
    assert len(stopped) == 1 and "unknown" in str(stopped[0])
    assert m.body.clean is True                        # memory never took it ...
    assert meta.read(str(tmp_path)).clean is False     # ... the next start trusts the file


def test_fault_points_count_and_skip(md, tmp_path):
    m, ffile = md
    ffile.write_text("meta.write EIO 2 1\n")           # one passes, two fail
    with m.change() as b:
        b.generation = 2
    for _ in range(2):
        with pytest.raises(meta.MetadataWriteError):
            with m.change() as b:
                b.generation = 3
    with m.change() as b:
        b.generation = 4
    assert raw(tmp_path)["generation"] == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "newer"])
def test_damaged_files_are_refused(tmp_path, damage):
    write_raw(tmp_path, BODY)
    p = tmp_path / "meta.json"
    raw = p.read_bytes()
    if damage == "flip":
        p.write_bytes(raw.replace(b'"clean": true', b'"clean": false'))
    elif damage == "truncate":
        p.write_bytes(raw[:len(raw) // 2])
    elif damage == "garbage":
        p.write_bytes(b"\x00" * 100)
    else:
        doc = json.loads(raw)
        doc["format"] = meta.FORMAT + 1
        p.write_text(json.dumps(doc))
    with pytest.raises(StateError) as e:
        meta.read(str(tmp_path))
    assert ("upgrade prepl" if damage == "newer" else "corrupt") in str(e.value)



def test_records_write_back_what_they_read(tmp_path):
    """Both bodies of a pair made by the previous code (format 1): every key
    read is written back with its value; keys added since get their
    defaults; a link's transient state and progress (saved by format 1) are
    forgotten."""
    with tarfile.open(os.path.join(os.path.dirname(__file__), "..", "data",
                                   "format1-pair.tar.gz")) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                    else {}))
    for role in ("p", "s"):
        want = raw(tmp_path / role)
        got = meta.read(str(tmp_path / role)).to_json()
        for link in want["links"].values():
            assert link.pop("state") is not None and "progress" in link
            del link["progress"]
        for iv in got["intervals"]:                # fields added since, with defaults
            assert iv.pop("damaged") is None
        for link in got["links"].values():
            assert link.pop("resync") is False and link.pop("tls_psk") is None
            assert link.pop("paused") is False
        added = {k: got.pop(k) for k in set(got) - set(want)}
        assert got == want, role
        assert added == {"chain_truncated": False, "promoted": None, "superseded": None,
                         "failback": None,
                         **({} if role == "s" else {"bound": None, "applied": None,
                                                    "receipts": [], "staging": None})}


def test_unknown_keys_are_kept(tmp_path):
    body = copy.deepcopy(BODY)
    body["future"] = {"a": [1]}
    body["intervals"][0]["hint"] = "x"
    write_raw(tmp_path, body)
    m = meta.Metadata(str(tmp_path), meta.read(str(tmp_path)))
    with m.change() as b:
        b.generation = 7
    after = raw(tmp_path)
    assert after["future"] == {"a": [1]} and after["intervals"][0]["hint"] == "x"
    assert after["generation"] == 7


@pytest.mark.parametrize("path,value,where", [
    (("size",), "4096", "size"),
    (("clean",), 1, "clean"),
    (("generation",), True, "generation"),
    (("intervals", 0, "seq"), None, "intervals[0].seq"),
    (("intervals", 0, "maps"), {"cmap": 5}, "intervals[0].maps.cmap"),
    (("intervals", 0), "i0", "intervals[0]"),
    (("links",), {"l": {"cursor": 3}}, "links.l.cursor"),
    (("snappoints",), [{"name": "a", "seq": 0}], "snappoints[0].created"),
    (("applied",), {"target": {"seq": 1}, "base": None}, "applied.applied_at"),
    (("receipts",), [{}], "receipts[0].replica_uuid"),
])
def test_a_field_of_the_wrong_type_is_named(tmp_path, path, value, where):
    body = copy.deepcopy(BODY)
    at = body
    for k in path[:-1]:
        at = at[k]
    at[path[-1]] = value
    write_raw(tmp_path, body)
    with pytest.raises(StateError) as e:
        meta.read(str(tmp_path))
    assert f"corrupt (missing or invalid: {where})" in str(e.value)


def test_a_missing_field_is_named(tmp_path):
    body = copy.deepcopy(BODY)
    del body["next_file_id"]
    write_raw(tmp_path, body)
    with pytest.raises(StateError, match=r"missing or invalid: next_file_id\)"):
        meta.read(str(tmp_path))


def test_a_body_that_would_not_read_back_is_not_written(md, tmp_path):
    m, _ = md
    before = (tmp_path / "meta.json").read_bytes()
    with pytest.raises(PreplError, match="missing or invalid: intervals.0..closed_at"):
        with m.change() as b:
            b.intervals[0].closed_at = "now"
    assert (tmp_path / "meta.json").read_bytes() == before
    assert m.body.intervals[0].closed_at is None


def test_an_interval_ref_writes_back_only_what_was_sent():
    """A manifest's base and target are fingerprinted as the agent sent
    them: a name or time left out stays out."""
    for doc in ({"seq": 3}, {"seq": 3, "name": "a"}, {"seq": 3, "name": "a", "time": 1.5}):
        assert meta.IntervalRef.from_json(doc).to_json() == doc
