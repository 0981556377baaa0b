"""Bad input gets a clear error, a non-zero exit code, and changes nothing."""
import hashlib
import json
import os
import subprocess

import pytest

from replication.meta import Link
from replication.state import StateDir
from tests.conftest import ENV, NBDKIT, PREPL, REPO, prepl

MiB = 1 << 20


def digest_tree(path):
    """SHA-256 of every file under path (names and contents)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(p.encode())
            if not p.endswith(("lock", ".sock")):
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


@pytest.mark.parametrize("args,code,msg", [
    (["--size", "12X"], 2, "invalid size"),
    (["--size", "0"], 2, "must be positive"),
    (["--size", "1M", "--region-size", "48K"], 2, "power of two"),
    (["--size", "1M", "--region-size", "1K"], 2, "between"),
    (["--size", "1M", "--block-size", "128K"], 2, "larger than region size"),
    (["--size", "1M", "--role", "tertiary"], 2, "invalid choice"),
    ([], 2, "does not exist: give --size"),
])
def test_init_rejects_bad_arguments(tmp_path, args, code, msg):
    r = prepl("init", tmp_path / "st", "--volume", tmp_path / "v.img", *args, check=False)
    assert r.returncode == code, r.stderr
    assert msg in r.stderr
    assert not (tmp_path / "st").exists() and not (tmp_path / "v.img").exists()


def test_init_refuses_existing_state_and_volume(tmp_path):
    prepl("init", tmp_path / "st", "--volume", tmp_path / "v.img", "--size", "1M")
    before = digest_tree(tmp_path)
    r = prepl("init", tmp_path / "st", "--volume", tmp_path / "w.img", "--size", "1M", check=False)
    assert r.returncode == 4 and "already holds a prepl state directory" in r.stderr
    r = prepl("init", tmp_path / "st2", "--volume", tmp_path / "v.img", "--size", "1M",
              check=False)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert digest_tree(tmp_path) == before


@pytest.mark.parametrize("name", ["a/b", "..", "x" * 65, "sp ace", ""])
def test_bad_snappoint_names(primary, name):
    srv = primary()
    r = prepl("snappoint", "create", srv.state, name, check=False)
    assert r.returncode == 2 and "invalid snappoint name" in r.stderr
    assert srv.ctl("status")["snappoints"] == []
    with pytest.raises(Exception, match="invalid snappoint name"):
        srv.ctl("snappoint_create", name=name)      # the server checks too


def test_snappoint_errors(primary):
    srv = primary()
    prepl("snappoint", "create", srv.state, "a")
    r = prepl("snappoint", "create", srv.state, "a", check=False)
    assert r.returncode == 5 and "already exists" in r.stderr
    r = prepl("snappoint", "delete", srv.state, "nope", check=False)
    assert r.returncode == 1 and "no snappoint named 'nope'" in r.stderr
    r = prepl("snappoint", "convert", srv.state, "a", check=False)
    assert r.returncode == 2                         # --dataless is required
    assert [s["name"] for s in srv.ctl("status")["snappoints"]] == ["a"]


def test_commands_without_server_change_nothing(tmp_path):
    st = tmp_path / "st"
    prepl("init", st, "--volume", tmp_path / "v.img", "--size", "1M")
    before = digest_tree(tmp_path)
    for args in (["snappoint", "create", st, "a"], ["snappoint", "list", st],
                 ["snappoint", "delete", st, "a"], ["stop", st]):
        r = prepl(*args, check=False)
        assert r.returncode == 3, (args, r.stderr)
        assert "no server is running" in r.stderr
    r = prepl("status", st, "--json", check=False)
    assert r.returncode == 3 and json.loads(r.stdout)["running"] is False
    assert digest_tree(tmp_path) == before


def test_second_server_refused(primary, make_server, tmp_path):
    srv = primary()
    r = prepl("serve", srv.state, "--unix", tmp_path / "other.sock", check=False)
    assert r.returncode == 4 and "in use by another server" in r.stderr
    # bypassing the CLI's check: the plugin's own lock refuses too
    r = subprocess.run([NBDKIT, "-f", "-U", str(tmp_path / "o2.sock"), "python",
                        os.path.join(REPO, "nbdplugin", "plugin.py"), f"state={srv.state}"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 4 and "in use by another server" in r.stderr
    assert srv.connect().pread(512, 0) == bytes(512)     # the first one still serves


def test_corrupt_and_newer_metadata(tmp_path):
    st = tmp_path / "st"
    prepl("init", st, "--volume", tmp_path / "v.img", "--size", "1M")
    meta = st / "meta.json"
    good = meta.read_bytes()
    doc = json.loads(good)
    doc["body"]["size"] = 2 * MiB                       # checksum no longer matches
    cases = [(json.dumps(doc).encode(), "checksum mismatch"),
             (good[:len(good) // 2], "corrupt"),
             (json.dumps(dict(json.loads(good), format=99)).encode(), "newer than this prepl")]
    for content, msg in cases:
        meta.write_bytes(content)
        before = digest_tree(tmp_path)
        for args in (["serve", st, "--unix", tmp_path / "s.sock"], ["status", st]):
            r = prepl(*args, check=False)
            assert r.returncode == 4 and msg in r.stderr, (args, r.stderr)
        assert digest_tree(tmp_path) == before
    meta.write_bytes(good)


def test_volume_of_wrong_size(tmp_path):
    st = tmp_path / "st"
    vol = tmp_path / "v.img"
    prepl("init", st, "--volume", vol, "--size", "1M")
    with open(vol, "r+b") as f:
        f.truncate(2 * MiB)
    before = digest_tree(tmp_path)
    r = prepl("serve", st, "--unix", tmp_path / "s.sock", check=False)
    assert r.returncode == 4 and "2097152 bytes" in r.stderr and "1048576" in r.stderr
    assert digest_tree(tmp_path) == before


def test_unknown_plugin_parameter(tmp_path):
    r = subprocess.run([NBDKIT, "-f", "-U", str(tmp_path / "s.sock"), "python",
                        os.path.join(REPO, "nbdplugin", "plugin.py"), "bogus=1"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2 and "unknown parameter 'bogus'" in r.stderr


def test_delete_refuses_a_links_base(tmp_path, make_server):
    st = tmp_path / "st"
    prepl("init", st, "--volume", tmp_path / "v.img", "--size", "1M")
    srv = make_server(st).start()
    srv.ctl("snappoint_create", name="base", dataless=True)
    srv.stop()
    sd = StateDir(st)
    body = sd.read_meta()
    body.links = {"dr": Link(cursor="base")}     # as an agent's cycle leaves it
    sd.write_meta(body)
    srv = make_server(st).start()
    r = prepl("snappoint", "delete", st, "base", check=False)
    assert r.returncode == 5 and "base of link(s) dr" in r.stderr
    assert [s["name"] for s in srv.ctl("status")["snappoints"]] == ["base"]


def test_off_loopback_refused_without_tls(tmp_path):
    st = tmp_path / "st"
    prepl("init", st, "--volume", tmp_path / "v.img", "--size", "1M")
    r = prepl("serve", st, "--port", "10809", "--bind", "0.0.0.0", check=False)
    assert r.returncode == 2 and "without TLS" in r.stderr


def test_help_is_clear():
    r = subprocess.run(PREPL + ["--help"], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert r.returncode == 0
    for word in ("init", "serve", "stop", "status", "snappoint", "Exit codes"):
        assert word in r.stdout
