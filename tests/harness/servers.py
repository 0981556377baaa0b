"""Starting and stopping prepl servers and other processes, for the tests,
scripts/soak and scripts/bench alike.

* Foreground: `prepl serve` as our child (it execs nbdkit -f, so the child's
  pid is nbdkit's); ready once its control socket answers (ARCHITECTURE §9:
  the unix socket exists before the plugin's control thread runs).  The
  tests use it: a finalizer kills it by pid.
* Background: `prepl serve --background`, known by STATE/server.pid; killed
  or stopped only after checking that the pid is still this state
  directory's nbdkit (pids are reused).  The soak and the bench use it.

Every process is stopped by pid; nothing here waits without a deadline.
"""
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ServerError(Exception):
    pass


# ---- processes --------------------------------------------------------------

def pid_alive(pid):
    """True while pid runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def pid_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_pid(pid, timeout=15.0, log=None):
    """SIGTERM a process that is not our child, wait for it to go, SIGKILL
    if it does not."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    if log:
        log(f"pid {pid} ignored SIGTERM for {timeout}s, sending SIGKILL")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def system_python_path():
    """(PATH, dropped): PATH with /usr/sbin:/usr/bin:/sbin:/bin first and
    without directories whose python3 is not the system one.  nbdkit's
    python plugin embeds the system libpython, which takes its prefix (and
    so its sys.path, where numpy lives) from the first python3 on PATH:
    under pyenv its shim would come first, and prepl serve would fail with
    "No module named 'numpy'"."""
    system = os.path.realpath("/usr/bin/python3")
    from replication.nbdkit_bin import SYSTEM_PATH
    keep, dropped = SYSTEM_PATH.split(os.pathsep), []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or d in keep:
            continue
        py = os.path.join(d, "python3")
        (dropped if os.path.exists(py) and os.path.realpath(py) != system else keep).append(d)
    return os.pathsep.join(keep), dropped


def prepl_command(explicit=None):
    """The prepl CLI as an argv prefix: explicit (None if not executable),
    else the venv's, else this interpreter's `-m replication.cli`."""
    if explicit:
        return [explicit] if os.access(explicit, os.X_OK) else None
    exe = os.path.join(REPO, ".venv", "bin", "prepl")
    if os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "replication.cli"]


def log_tail(path, nbytes=3000):
    """The end of a log file ("" if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - nbytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- servers ----------------------------------------------------------------

class ForegroundServer:
    """A real `prepl serve STATE --unix SOCK` (nbdkit + our plugin) as our
    child, logging to log."""

    def __init__(self, state, sock, log, prepl=None, env=None, cwd=REPO):
        self.state = str(state)
        self.sock = str(sock)
        self.log = log
        self.proc = None
        self.logf = None
        self.extra = []           # more `prepl serve` arguments
        self.env = {}             # more environment (e.g. PREPL_FAULT)
        self.prepl = prepl or [sys.executable, "-m", "replication.cli"]
        self.base_env = env if env is not None else dict(os.environ)
        self.cwd = cwd

    def start(self):
        from replication import control
        from replication.state import StateDir
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.prepl + ["serve", self.state, "--unix", self.sock]
                                     + self.extra, env=dict(self.base_env, **self.env),
                                     cwd=self.cwd, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=self.logf)
        ctl = StateDir(self.state).control_socket

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n"
                                     + open(self.log).read())
            try:
                return control.request(ctl, "status", timeout=5)
            except Exception:     # noqa: BLE001 -- not up yet: asked again
                return None
        wait_for(up, 30, "the server's control socket")
        return self

    @property
    def pid(self):
        return self.proc.pid

    def ctl(self, op, **kw):
        from replication import control
        from replication.state import StateDir
        return control.request(StateDir(self.state).control_socket, op, **kw)

    def connect(self, export="", meta=False):
        import nbd
        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.set_export_name(export)
        h.connect_unix(self.sock)
        return h

    def stop(self):
        """Clean stop, as `prepl stop` does it: the state is made final
        through the control socket, then nbdkit is signalled (and killed if
        idle clients keep it up)."""
        from replication.errors import PreplError
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ctl("shutdown")
        except (PreplError, OSError, ValueError):
            pass                  # already stopping: the signal ends it
        self._signal(signal.SIGTERM, 3)

    def kill(self):
        """An unclean stop: SIGKILL."""
        self._signal(signal.SIGKILL, 10)

    def _signal(self, sig, timeout):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.logf.close()

    def output(self):
        with open(self.log, errors="replace") as f:
            return f.read()


class BackgroundServer:
    """`prepl serve STATE --unix SOCK --background`, known by the pid in
    STATE/server.pid; killed or stopped only while that pid is still this
    state directory's nbdkit."""

    def __init__(self, name, state, sock, prepl, env):
        self.name, self.state, self.sock = name, state, sock
        self.prepl, self.env = prepl, env
        self.pid = None
        self.log_path = os.path.join(state, "server.log")
        self.log_off = 0

    def start(self, env=None, timeout=60):
        """Raises ServerError with the command's output and the log's end."""
        r = subprocess.run(self.prepl + ["serve", self.state, "--unix", self.sock,
                                         "--background", "--timeout", str(timeout)],
                           env=dict(self.env, **(env or {})), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout * 2)
        if r.returncode != 0:
            err = r.stderr if len(r.stderr) < 2500 else r.stderr[:1000] + " [...] " + \
                r.stderr[-1500:]
            raise ServerError(f"prepl serve {self.name} failed ({r.returncode}): "
                              f"{r.stdout[-500:]}{err}")
        self.pid = self.read_pid()
        return self

    def read_pid(self):
        try:
            with open(os.path.join(self.state, "server.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def ours(self, pid):
        return pid is not None and pid_alive(pid) and f"state={self.state}" in pid_cmdline(pid)

    def alive(self):
        """The server's process runs (and is still this state dir's nbdkit)."""
        return self.ours(self.pid)

    def others(self):
        """Processes other than self.pid still serving this state dir."""
        return [f"{pid}: {pid_cmdline(pid)}" for pid in map(int, filter(
            str.isdigit, os.listdir("/proc"))) if pid != self.pid and self.ours(pid)]

    def wait_gone(self, timeout):
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def kill(self):
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        if not self.wait_gone(30):
            raise ServerError(f"{self.name} server pid {self.pid} survived SIGKILL")

    def stop(self, log=None):
        """Clean stop (prepl stop), SIGKILL if that fails or does not end it."""
        self.pid = self.pid or self.read_pid()
        if not self.alive():
            return
        try:
            r = subprocess.run(self.prepl + ["stop", self.state, "--timeout", "30"],
                               env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=60)
            if r.returncode not in (0, 3) and log:     # 3: no server running
                log(f"prepl stop {self.name} failed ({r.returncode}): "
                    f"{r.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            if log:
                log(f"prepl stop {self.name} timed out")
        self.kill()

    def log_tail(self, n=3000):
        return log_tail(self.log_path, n)

    def new_log(self):
        """What the log gained since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_off)
                data = f.read()
        except OSError:
            return ""
        self.log_off += len(data)
        return data.decode(errors="replace")
