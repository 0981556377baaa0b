"""A receiving staging is checkpointed (made durable, its held blocks
recorded: what an interrupted transfer resumes from) every
secondary.CHECKPOINT_SECONDS while writes arrive, the first time that long
after the staging opened: a cycle's transfer of a fraction of a second
never pays an fdatasync midway.  On real servers, a 24 MiB sync at
--bwlimit 2M (12 s): nothing held in its first 4 s, something held before
it ends, and the replica is the primary's image.  The test polls the
secondary's status every 50 ms throughout: the housekeeping tick that
checkpoints runs every second however often clients connect (it used to
run only when no connection came for a whole second)."""
import os
import subprocess
import time

import pytest

from replication.secondary import CHECKPOINT_SECONDS
from tests.conftest import ENV, PREPL, REPO, prepl, stop_process

MiB = 1 << 20
SIZE = 24 * MiB


@pytest.mark.slow
def test_first_checkpoint_comes_checkpoint_seconds_after_the_staging_opened(tmp_path,
                                                                            make_server):
    vol = tmp_path / "p.img"
    with open(vol, "wb") as f:
        f.write(os.urandom(SIZE))
    prepl("init", tmp_path / "p", "--volume", vol)
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", str(SIZE),
          "--role", "secondary")
    prim = make_server(tmp_path / "p").start()
    sec = make_server(tmp_path / "s").start()
    agent = subprocess.Popen(PREPL + ["agent", str(prim.state), "--secondary",
                                      f"nbd+unix:///?socket={sec.sock}", "--once",
                                      "--bwlimit", "2M"],
                             env=ENV, cwd=REPO, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples, opened = [], None        # (seconds since the staging opened, bytes held)
    try:
        while agent.poll() is None:
            st = sec.ctl("status")
            now = time.monotonic()
            if st["staging"] is not None and st["applied"] is None:
                opened = opened or now
                samples.append((now - opened, st["staging_held_bytes"]))
            time.sleep(0.05)
        assert agent.wait() == 0, agent.stderr.read()
    finally:
        stop_process(agent)
    early = [held for t, held in samples if t < CHECKPOINT_SECONDS - 1]
    assert len(early) > 20 and set(early) == {0}, samples[:5]
    assert any(held > 0 for _, held in samples), samples[-5:]
    with open(vol, "rb") as a, open(tmp_path / "s.img", "rb") as b:
        assert a.read() == b.read()
