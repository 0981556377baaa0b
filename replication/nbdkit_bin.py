"""Which nbdkit prepl runs: decided here, and only here.

Every nbdkit that prepl, its tests, scripts/bench and scripts/soak start is
`binary()`; its plugins and filters are the ones that binary was built with
(its own plugindir and filterdir, `nbdkit --dump-config`).

nbdkit 1.32.5 (Debian 12) aborts (connections.c:402, raw_send_socket:
Assertion `sock >= 0') when a plaintext client dies with requests in flight,
which lets any client take a server down.  Upstream fixed it in 1.33.10
(commit 9d82aa4f, "server: Don't assert on send if client hangs up early").
So on a release whose nbdkit is older than that, scripts/bootstrap builds a
fixed nbdkit from source into PREFIX; elsewhere (Debian 13: 1.42) the
system's nbdkit is used and nothing is built.

Order:
  1. $PREPL_NBDKIT: the path of an nbdkit binary (to try another build; the
     client-kill test uses it to show the stock 1.32.5 abort);
  2. PREFIX/sbin/nbdkit, when scripts/bootstrap installed one;
  3. the system's nbdkit (/usr/bin/nbdkit on Debian; else the first on PATH).
"""
import os
import shutil
import subprocess

from .errors import PreplError

PREFIX = "/opt/prepl/nbdkit"
SYSTEM = "/usr/bin/nbdkit"
ENV_VAR = "PREPL_NBDKIT"
FIXED_IN = (1, 33, 10)
# the directories whose python3 is the system's, first on the PATH of any
# nbdkit running the Python plugin: its embedded interpreter finds its
# standard library (and numpy) through the first python3 on PATH, so a venv's
# or pyenv's python3 ahead of them breaks the plugin's imports
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class NbdkitMissing(PreplError):
    """No usable nbdkit (exit code 1, with the message)."""


def binary():
    """The absolute path of the nbdkit to run."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise NbdkitMissing(f"{ENV_VAR}={explicit} is not an executable file")
        return os.path.abspath(explicit)
    built = os.path.join(PREFIX, "sbin", "nbdkit")
    if os.access(built, os.X_OK):
        return built
    if os.access(SYSTEM, os.X_OK):
        return SYSTEM
    found = shutil.which("nbdkit")
    if found:
        return os.path.abspath(found)
    raise NbdkitMissing("nbdkit is not installed: run scripts/bootstrap")


def server_path(path=None):
    """PATH for an nbdkit that runs the Python plugin: the system's
    directories first (see SYSTEM_PATH), then `path` (default: ours)."""
    rest = os.environ.get("PATH", "") if path is None else path
    return SYSTEM_PATH + (":" + rest if rest else "")


def dump_config(nbdkit=None):
    """`nbdkit --dump-config` as a dict (version, plugindir, filterdir...)."""
    out = subprocess.run([nbdkit or binary(), "--dump-config"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def plugindir(nbdkit=None):
    """Where that nbdkit loads its plugins from (filters: "filterdir")."""
    return dump_config(nbdkit)["plugindir"]


def version(nbdkit=None):
    """(major, minor, micro) of an nbdkit binary (default: binary())."""
    return parse_version(dump_config(nbdkit)["version"])


def parse_version(text):
    parts = text.split("-", 1)[0].split(".")
    return tuple(int(p) for p in parts[:3])


def survives_client_death(nbdkit=None):
    """Whether this nbdkit has upstream's fix of the abort when a client dies
    with requests in flight (from 1.33.10 on)."""
    return version(nbdkit) >= FIXED_IN
