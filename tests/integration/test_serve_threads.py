"""nbdkit's worker threads per connection, chosen by role (replication/cli.py
nbdkit_threads), read back from the running server's command line."""
import os

from tests.conftest import prepl, served_pair


def test_nbdkit_threads_per_role(tmp_path, make_server):
    """A secondary serves with as many nbdkit threads per connection as CPUs
    (at least 2), a primary with nbdkit's 16; --threads overrides both."""
    prim, sec = served_pair(tmp_path, make_server, "8M")

    def threads(srv):
        argv = open(f"/proc/{srv.proc.pid}/cmdline", "rb").read().split(b"\0")
        return int(argv[argv.index(b"-t") + 1])
    assert threads(prim) == 16
    assert threads(sec) == max(2, min(16, os.cpu_count()))
    sec.stop()
    sec.extra = ["--threads", "5"]
    sec.start()
    assert threads(sec) == 5
    r = prepl("serve", sec.state, "--unix", str(tmp_path / "x.sock"), "--threads", "0",
              check=False)
    assert r.returncode == 2 and "--threads" in r.stderr
