"""The lock of a state directory (and of a link's agent): testing it
(`flocked`, as `prepl status`, `prepl stop` and `prepl serve`'s check do)
never takes it, so a probe at the wrong moment never makes a starting
server or agent fail with a false "in use"; and the lock still excludes a
second holder, in another process or through another open file."""
import os
import subprocess
import sys
import threading

import pytest

from replication.errors import InUseError
from replication.state import StateDir, flocked
from tests.conftest import ENV, REPO

# a process that takes and releases the lock N times, as a starting server
# does (StateDir.lock: LOCK_NB, "in use" at once if it is held); prints how
# many times it was refused
LOCKER = r"""
import sys
from replication.daemon import lock_link
from replication.errors import InUseError
from replication.state import StateDir
sd, n, which = StateDir(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
refused = 0
print("ready", flush=True)
sys.stdin.readline()
for i in range(n):
    try:
        f = sd.lock() if which == "server" else lock_link(sd, "default")
    except InUseError:
        refused += 1
        continue
    f.close()
print(refused, flush=True)
"""

N = 5000                 # lock attempts (before the fix, a third to two thirds were refused)

HOLDER = r"""
import sys
from replication.state import StateDir
f = StateDir(sys.argv[1]).lock()
print("locked", flush=True)
sys.stdin.readline()
"""


def python(script, *args):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=ENV, cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("which,lockname", [("server", "lock"),
                                             ("agent", "agent.default.lock")])
def test_probing_the_lock_never_refuses_its_taker(tmp_path, which, lockname):
    path = tmp_path / lockname
    path.touch()
    stop = threading.Event()
    probes = [0, 0]          # probes, probes that saw the lock held

    def hammer():
        while not stop.is_set():
            probes[1] += flocked(str(path))
            probes[0] += 1
    proc = python(LOCKER, tmp_path, N, which)
    try:
        assert proc.stdout.readline() == "ready\n"
        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        refused = int(proc.stdout.readline())
    finally:
        stop.set()
        for t in threads:
            t.join()
        proc.kill()
        proc.wait()
    assert probes[0] > 1000 and probes[1] > 0, probes   # the probes ran, and saw it
    assert refused == 0, f"{refused} of {N} lock attempts refused by mere probes"


def test_the_lock_excludes_and_probes_see_it(tmp_path):
    sd = StateDir(tmp_path)
    assert not flocked(sd.p("lock"))                     # no lock file yet
    holder = python(HOLDER, tmp_path)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert flocked(sd.p("lock")) and sd.is_locked()
        with pytest.raises(InUseError, match=rf"in use by another server \(pid {holder.pid}\)"):
            sd.lock()
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert not sd.is_locked()
    f = sd.lock()                 # held here: another open file of ours is refused too
    try:
        assert sd.is_locked()
        with pytest.raises(InUseError):
            sd.lock()
        r = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], env=ENV, cwd=REPO,
                           input="", capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "in use by another server" in r.stderr
    finally:
        f.close()
    assert not sd.is_locked()
    with open(sd.p("lock")) as f:
        assert f.read().strip() == str(os.getpid())
