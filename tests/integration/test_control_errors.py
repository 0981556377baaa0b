"""An operation of the control socket that fails in the operating system
(here ENOSPC: the state directory's filesystem is full) is reported as
that operation's failure, with its errno and strerror and what to do --
never as an "internal error" with a traceback -- and the CLI exits 1 with
that message.  Once there is space again, the same operations succeed."""
import errno
import os

import pytest

from replication.errors import OSFailedError
from tests.conftest import prepl


def fill(path):
    """Fills the filesystem of path with the file path (until ENOSPC)."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 512):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError as e:
                assert e.errno == errno.ENOSPC, e


def test_os_errors_are_the_operations_failure(tmp_path, small_fs, make_server):
    st = small_fs / "st"
    prepl("init", st, "--volume", tmp_path / "vol.img", "--size", "8M")
    srv = make_server(st).start()
    srv.ctl("snappoint_create", name="a")
    log_before = len(srv.output())
    fill(small_fs / "filler")
    try:
        # the CLI: exit 1, the errno and its text, what to do; no internal error
        r = prepl("snappoint", "create", st, "b", "--dataless", check=False)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert "No space left on device (ENOSPC)" in r.stderr, r.stderr
        assert "free space" in r.stderr and "snappoint create failed" in r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr
        # the failed create removed the files it had taken or made (spare
        # maps: replication/spares.py), which frees a few blocks: full again
        fill(small_fs / "filler2")
        # a metadata save (a link's durable field) through the control socket
        with pytest.raises(OSFailedError, match=r"link update failed: .*No space left") as e:
            srv.ctl("link_update", name="l", fields={"secondary": "nbd://x"})
        assert e.value.errno == errno.ENOSPC and e.value.exit_code == 1
    finally:
        for f in ("filler", "filler2"):
            if os.path.exists(small_fs / f):
                os.unlink(small_fs / f)
    log = srv.output()[log_before:]
    assert "Traceback" not in log and "internal error" not in log, log
    assert "No space left on device" in log          # the server says what failed
    # the server is up, and with space the operations succeed
    srv.ctl("link_update", name="l", fields={"secondary": "nbd://x"})
    prepl("snappoint", "create", st, "c", "--dataless")
    assert "c" in [s["name"] for s in srv.ctl("status")["snappoints"]]
