"""`prepl agent --bwlimit RATE` on a real transfer: the bytes on the wire
(counted by the proxy between the agent and the secondary, outside the
agent) between 10 % and 40 % of a 320 MiB initial sync follow 20 MiB/s
within 10 %, and `prepl link set --bwlimit 40M` on the running agent takes
effect within 2 s: from 2 s after the change to 95 % of the sync (about
2 s of transfer), 40 MiB/s within 10 %.  The windows are long next to the
bucket's one second and the pipeline's stalls (a staging checkpoint's
fdatasync): a window of a fraction of a second measures the stalls, not
the limit."""
import os
import subprocess
import threading
import time

import pytest

from tests.conftest import ENV, PREPL, REPO, meta_json, prepl, stop_process, wait_for
from tests.harness.proxy import CutProxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
SIZE = 320 * MiB


def rate_between(samples, lo, hi):
    """Bytes per second between the moments the count passed lo and hi."""
    t_lo = next(t for t, n in samples if n >= lo)
    t_hi = next(t for t, n in samples if n >= hi)
    n_lo = next(n for t, n in samples if n >= lo)
    n_hi = next(n for t, n in samples if n >= hi)
    return (n_hi - n_lo) / (t_hi - t_lo)


def test_bwlimit_and_changing_it_while_the_agent_runs(tmp_path, make_server):
    vol = tmp_path / "p.img"
    with open(vol, "wb") as f:
        f.write(os.urandom(SIZE))             # not created empty: the first cycle copies it all
    prepl("init", tmp_path / "p", "--volume", vol)
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    prim = make_server(tmp_path / "p").start()
    sec = make_server(tmp_path / "s").start()
    proxy = CutProxy(str(tmp_path / "px.sock"), str(sec.sock)).start()
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.monotonic(), proxy.bytes_up))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    agent = subprocess.Popen(PREPL + ["agent", str(tmp_path / "p"), "--secondary",
                                      f"nbd+unix:///?socket={proxy.listen}", "--interval",
                                      "3600", "--bwlimit", "20M"],
                             env=ENV, cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sampler.start()
        wait_for(lambda: proxy.bytes_up >= SIZE * 0.42, 60, "42 % of the transfer")
        r = prepl("link", "set", tmp_path / "p", "default", "--bwlimit", "40M")
        changed = time.monotonic()
        assert "40M" in r.stdout or "40.0M" in r.stdout, r.stdout
        wait_for(lambda: meta_json(tmp_path / "s")["applied"] is not None, 60,
                 "the sync to apply")
    finally:
        stop.set()
        stop_process(agent)
        proxy.stop()
    first = rate_between(samples, 0.10 * SIZE, 0.40 * SIZE)
    after = [(t, n) for t, n in samples if t >= changed + 2.0 and n < SIZE]
    assert len(after) > 10, "the transfer ended within 2 s of the change: no limit held it"
    second = rate_between(after, after[0][1], min(0.95 * SIZE, after[-1][1]))
    print(f"on the wire: {first / MiB:.2f} MiB/s at --bwlimit 20M, {second / MiB:.2f} MiB/s "
          "2 s after `link set --bwlimit 40M`")
    assert 0.9 * 20 * MiB <= first <= 1.1 * 20 * MiB
    assert 0.9 * 40 * MiB <= second <= 1.1 * 40 * MiB
    # the replica is the primary's image
    assert subprocess.run(["cmp", vol, tmp_path / "s.img"]).returncode == 0
    # no agent: link set says so
    r = prepl("link", "set", tmp_path / "p", "default", "--bwlimit", "1M", check=False)
    assert r.returncode == 3 and "no agent is running" in r.stderr
