"""prepl check against real servers: one line, and the exit codes Nagios
expects (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)."""
import time

from tests.conftest import prepl, served_pair
from tests.integration.test_failover import failover

SIZE = 4 << 20


def check(state, *args):
    r = prepl("check", state, *args, check=False)
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("PREPL "), r.stdout + r.stderr
    return r.returncode, r.stdout


def test_exit_codes(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    assert check(prim.state)[1].startswith("PREPL OK - primary") and \
        "no replication link" in check(prim.state)[1]
    prim.connect().pwrite(b"a" * 4096, 0)
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once")
    code, out = check(prim.state)
    assert code == 0 and "worst RPO" in out and "| rpo_default=" in out
    # the link ages (no cycle runs): past warn, past crit (fractional seconds)
    time.sleep(0.3)
    code, out = check(prim.state, "--warn-rpo", "0.2", "--crit-rpo", "60")
    assert code == 1 and out.startswith("PREPL WARNING") and "link default: RPO" in out
    code, out = check(prim.state, "--warn-rpo", "0.1", "--crit-rpo", "0.2")
    assert code == 2 and "no agent running" in out
    # the secondary: the age of the interval it holds
    assert check(sec.state)[0] == 0
    assert check(sec.state, "--warn-rpo", "0.1", "--crit-rpo", "100")[0] == 1
    # usage errors and a missing state directory: UNKNOWN
    assert prepl("check", prim.state, "--warn-rpo", "x", check=False).returncode == 3
    assert check(prim.state, "--warn-rpo", "10", "--crit-rpo", "5")[0] == 3
    assert check(tmp_path / "nowhere")[0] == 3
    # corrupt metadata: CRITICAL
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text('{"format": 2, "body": {')
    assert check(tmp_path / "bad")[0] == 2
    # a server down: CRITICAL
    sec.stop()
    code, out = check(sec.state)
    assert code == 2 and "not running" in out


def test_a_superseded_primary_is_critical(tmp_path, make_server):
    prim, sec = served_pair(tmp_path, make_server, SIZE)
    prim.connect().pwrite(b"a" * 4096, 0)
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once")
    failover(sec)
    prepl("agent", prim.state, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once",
          check=False)                               # learns it is superseded
    code, out = check(prim.state)
    assert code == 2 and "superseded" in out and "fail back" in out
    assert check(sec.state)[0] == 0                  # the promoted node: a primary, no links
