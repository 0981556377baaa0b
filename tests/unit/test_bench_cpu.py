"""scripts/bench's CPU accounting of the steady phases (CpuMeter): a process
that spins for the whole window counts as about one core, a sleeping one as
none, and the machine's total holds at least what the processes used."""
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_bench():
    loader = importlib.machinery.SourceFileLoader("prepl_bench",
                                                  os.path.join(ROOT, "scripts", "bench"))
    spec = importlib.util.spec_from_loader("prepl_bench", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


SPIN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


def test_cpu_meter_counts_a_spinning_tree_as_one_core_and_a_sleeping_one_as_none():
    bench = load_bench()
    # the spinner is a grandchild: the tree's descendants count
    spinner = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run("
                                f"[sys.executable, '-c', {SPIN.format(s=3)!r}])"])
    sleeper = subprocess.Popen(["sleep", "3"])
    try:
        time.sleep(0.5)              # the interpreters are up and spinning
        with bench.CpuMeter({"spin": spinner.pid}) as cpu:
            cpu.track("sleep", sleeper.pid)
            time.sleep(1.5)
            cpu.untrack("sleep")
        cores = cpu.cores(0.25 * cpu.wall)
    finally:
        for p in (spinner, sleeper):
            p.kill()
            p.wait()
    assert 0.7 <= cores["spin"] <= 1.1, cores
    assert cores["sleep"] <= 0.05, cores
    assert cores["fio"] == 0.25
    assert cores["machine"] >= cores["spin"] - 0.05, cores
    assert abs(cores["other"] - (cores["machine"] - cores["spin"] - cores["sleep"] - 0.25)) \
        < 0.002, cores
