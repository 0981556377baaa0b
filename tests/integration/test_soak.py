"""The soak (scripts/soak) for two minutes: load on the primary, cycles and
random faults of at least three kinds; no divergence (the replica equals
snap/default.N after every applied interval and its stamps are a point in
time), no lost write, every fault recovered, and nothing it started is
left running afterwards."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ENV, REPO

pytestmark = pytest.mark.slow

SOAK = os.path.join(REPO, "scripts", "soak")


def processes_naming(text):
    """(pid, cmdline) of running processes whose command line contains text."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if text in cmd and not zombie and int(pid) != os.getpid():
            found.append((int(pid), cmd))
    return found


def test_soak_two_minutes(tmp_path):
    r = subprocess.run([sys.executable, SOAK, "--minutes", "2", "--json", "--seed", "1",
                        "--dir", str(tmp_path)],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=360)
    tail = r.stderr[-6000:]
    assert r.returncode == 0, f"soak failed ({r.returncode}):\n{tail}\n{r.stdout[-3000:]}"
    out = json.loads(r.stdout)
    assert out["divergences"] == 0, out["divergence_details"]
    assert out["lost_writes"] == 0, out["lost_details"]
    assert out["cycles_applied"] >= 10, out
    kinds = {k for k, n in out["faults"].items() if n > 0}
    assert len(kinds) >= 3, f"fault kinds injected: {out['faults']}"
    total = sum(out["faults"].values())
    assert out["recovered"] == total, \
        f"{out['recovered']} of {total} faults recovered; not: {out['unrecovered']}"
    # nothing it started is left: nbdkit (state=DIR), fio (socket in DIR), agents (DIR)
    left = processes_naming(str(tmp_path))
    assert not left, f"left running: {left}"
    assert os.listdir(tmp_path) == [], f"temp dir left behind: {os.listdir(tmp_path)}"
