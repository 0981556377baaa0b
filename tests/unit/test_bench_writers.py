"""scripts/bench's writers phase helper (SECONDARY_WRITES): it holds its
rate into both files, makes them durable every second, writes the replica
stand-in whole first and appends to the sparse staging stand-in, and
reports its counts when SIGTERM ends it."""
import os
import signal
import subprocess
import sys
import time

from tests.unit.test_bench_cpu import load_bench

SIZE = 32 << 20     # not filled in the test: the appends do not wrap
RATE = 1000        # writes a second into each file


def test_writers_helper_holds_its_rate_and_reports_it(tmp_path):
    bench = load_bench()
    sparse, whole = str(tmp_path / "staging.img"), str(tmp_path / "replica.img")
    proc = subprocess.Popen([sys.executable, "-c", bench.SECONDARY_WRITES, sparse, whole,
                             str(SIZE), str(RATE)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        # the replica stand-in is allocated whole before the timed part
        assert os.stat(whole).st_blocks * 512 >= SIZE
        assert os.stat(whole).st_size == os.stat(sparse).st_size == SIZE
        time.sleep(2.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    counts = dict(zip(*[iter(out.split())] * 2))
    secs, writes = float(counts["seconds"]), int(counts["writes"])
    assert 2.4 <= secs <= 4.0, counts
    # both files, RATE a second each, on a 10 ms schedule
    assert abs(writes - 2 * RATE * secs) <= 2 * RATE * 0.15, counts
    assert abs(int(counts["syncs"]) - secs) <= 1, counts
    # the staging stand-in is appended to: exactly its writes' blocks, in order
    assert os.stat(sparse).st_blocks * 512 == (writes // 2) * 4096, counts
