"""replication/nbdkit_bin.py: which nbdkit prepl runs (the real binaries of
this machine; `nbdkit --dump-config` is run for real)."""
import os
import re

import pytest

from replication import nbdkit_bin


def test_the_chosen_nbdkit_survives_client_death(monkeypatch):
    """What scripts/bootstrap leaves: the nbdkit prepl runs has upstream's
    fix (1.33.10+): the system's where it has it (Debian 13), else the
    build in /opt/prepl/nbdkit (Debian 12)."""
    monkeypatch.delenv(nbdkit_bin.ENV_VAR, raising=False)
    b = nbdkit_bin.binary()
    assert os.path.isabs(b) and os.access(b, os.X_OK)
    assert nbdkit_bin.survives_client_death(b), (b, nbdkit_bin.version(b))
    if nbdkit_bin.version(nbdkit_bin.SYSTEM) < nbdkit_bin.FIXED_IN:
        assert b == os.path.join(nbdkit_bin.PREFIX, "sbin", "nbdkit")
    cfg = nbdkit_bin.dump_config(b)
    # its plugins and filters are its own build's, not another nbdkit's
    assert nbdkit_bin.plugindir(b) == cfg["plugindir"]
    for name in ("python", "file", "memory", "info"):
        assert os.path.exists(os.path.join(cfg["plugindir"], f"nbdkit-{name}-plugin.so")), name
    for name in filters_in_use():
        assert os.path.exists(os.path.join(cfg["filterdir"], f"nbdkit-{name}-filter.so")), name


def filters_in_use():
    """Every nbdkit filter the tests and scripts name (--filter=NAME): a
    filter the build leaves out would fail only the test that needs it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    names = set()
    for d in ("tests", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(root, d)):
            for f in files:
                if not f.endswith((".pyc", ".gz", ".so")):
                    with open(os.path.join(dirpath, f), errors="replace") as fh:
                        names |= set(re.findall(r"--filter=([a-z]+)", fh.read()))
    assert {"cow", "pause"} <= names       # the scan finds what is there
    return sorted(names)


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv(nbdkit_bin.ENV_VAR, nbdkit_bin.SYSTEM)
    assert nbdkit_bin.binary() == nbdkit_bin.SYSTEM
    monkeypatch.setenv(nbdkit_bin.ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(nbdkit_bin.NbdkitMissing, match="not an executable"):
        nbdkit_bin.binary()


def test_parse_version():
    assert nbdkit_bin.parse_version("1.42.3") == (1, 42, 3)
    assert nbdkit_bin.parse_version("1.32.5") < nbdkit_bin.FIXED_IN <= (1, 33, 10)
