"""The scripts (scripts/bench, scripts/soak) run in the repository's venv,
whoever starts them: `python3` on PATH may be another Python (pyenv's,
say) that lacks what the bootstrap installed (xxhash, libnbd's binding)."""
import os
import sys


def reexec(repo):
    """Replaces this process with the same command under REPO/.venv's Python,
    unless it runs there already (or no venv exists: the caller then fails
    with its own message)."""
    venv = os.path.join(repo, ".venv")
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(python) and os.path.realpath(sys.prefix) != os.path.realpath(venv):
        os.execv(python, [python, *sys.argv])
