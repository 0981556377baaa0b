"""replication/meta.py: a change is written durably before it becomes the
body; a failed write leaves the file and the body as they were; a failure
after the rename is fail-stop; damaged files are refused."""
import errno
import json
import os

import pytest

from replication import faults, meta
from replication.errors import StateError

BODY = {"volume_uuid": "u", "volume": "/v", "size": 4096, "region_size": 4096,
        "block_size": 4096, "role": "primary", "generation": 1, "clean": True,
        "intervals": [], "snappoints": [], "links": {}}


@pytest.fixture
def md(tmp_path):
    meta.write(str(tmp_path), BODY)
    ffile = tmp_path / "faults"
    faults.set_file_for_test(ffile)
    yield meta.Metadata(str(tmp_path), meta.read(str(tmp_path))), ffile
    faults.set_file_for_test(None)


def test_a_change_is_durable_then_visible(md, tmp_path):
    m, _ = md
    with m.change() as b:
        b["links"]["x"] = {"cursor": "a"}
        assert m.body["links"] == {}          # not yet: nothing is written
    assert m.body["links"] == {"x": {"cursor": "a"}}
    assert meta.read(str(tmp_path)) == m.body
    assert not os.path.exists(tmp_path / "meta.json.tmp")


@pytest.mark.parametrize("point", ["meta.write", "meta.fsync", "meta.rename"])
@pytest.mark.parametrize("err", ["ENOSPC", "EIO"])
def test_a_failed_write_changes_nothing(md, tmp_path, point, err):
    m, ffile = md
    before = (tmp_path / "meta.json").read_bytes()
    ffile.write_text(f"{point} {err}\n")
    with pytest.raises(meta.MetadataWriteError) as e:
        with m.change() as b:
            b["clean"] = False
    assert e.value.errno == getattr(errno, err) and os.strerror(e.value.errno) in str(e.value)
    assert m.body["clean"] is True and m.body == BODY
    assert (tmp_path / "meta.json").read_bytes() == before
    assert not os.path.exists(tmp_path / "meta.json.tmp")
    with m.change() as b:                     # the fault is used up: a retry works
        b["clean"] = False
    assert meta.read(str(tmp_path))["clean"] is False and m.body["clean"] is False


def test_an_exception_inside_the_change_writes_nothing(md, tmp_path):
    m, _ = md
    with pytest.raises(KeyError):
        with m.change() as b:
            b["clean"] = False
            raise KeyError("x")
    assert m.body["clean"] is True and meta.read(str(tmp_path))["clean"] is True


def test_a_failed_directory_sync_is_fail_stop(md, tmp_path):
    m, ffile = md
    stopped = []
    m.fail_stop = stopped.append
    ffile.write_text("meta.dirsync EIO\n")
    with pytest.raises(meta.MetadataFailStop):
        with m.change() as b:
            b["clean"] = False
    assert len(stopped) == 1 and "unknown" in str(stopped[0])
    assert m.body["clean"] is True                     # memory never took it ...
    assert meta.read(str(tmp_path))["clean"] is False  # ... the next start trusts the file


def test_fault_points_count_and_skip(md, tmp_path):
    m, ffile = md
    ffile.write_text("meta.write EIO 2 1\n")           # one passes, two fail
    with m.change() as b:
        b["generation"] = 2
    for _ in range(2):
        with pytest.raises(meta.MetadataWriteError):
            with m.change() as b:
                b["generation"] = 3
    with m.change() as b:
        b["generation"] = 4
    assert meta.read(str(tmp_path))["generation"] == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "newer"])
def test_damaged_files_are_refused(tmp_path, damage):
    meta.write(str(tmp_path), BODY)
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
