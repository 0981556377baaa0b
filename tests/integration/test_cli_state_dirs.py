"""Every subcommand that takes an existing state directory, run against one
that is missing, empty, corrupt or not a directory at all: each exits 4
with a message that names the directory and what is wrong -- never a
traceback -- and creates nothing.  (`init` and `keygen` create things and
are exempt, and so is `check`, which answers monitoring in its own
exit codes.)  A subcommand added to the CLI without an entry here fails
the test: give it one."""
import argparse
import os

import pytest

from replication import cli
from tests.conftest import prepl

EXEMPT = {("init",), ("keygen",),
          ("check",)}      # Nagios exit codes: tests/integration/test_check.py
# what each subcommand needs besides its state directory (several variants)
ARGS = {
    ("serve",): [["--unix", "{tmp}/x.sock"], ["--unix", "{tmp}/x.sock", "--background"],
                 ["--port", "10999"], ["--unix", "{tmp}/x.sock", "--force"]],
    ("stop",): [[]],
    ("agent",): [["--secondary", "nbd+unix:///?socket={tmp}/s.sock", "--once", "--timeout", "5"],
                 ["--secondary", "nbd+unix:///?socket={tmp}/s.sock", "--interval", "1"]],
    ("sync",): [[], ["--no-wait"]],
    ("status",): [[], ["--json"]],
    ("snappoint", "create"): [["a"], ["a", "--dataless"]],
    ("snappoint", "list"): [[]],
    ("snappoint", "convert"): [["a", "--dataless"]],
    ("snappoint", "delete"): [["a"]],
    ("link", "resync"): [["default"], ["default", "--json"]],
    ("link", "set"): [["default", "--bwlimit", "20M"]],
    ("link", "list"): [[], ["--json"]],
    ("link", "pause"): [["default"]],
    ("link", "resume"): [["default"]],
    ("link", "remove"): [["default"]],
    ("exporter",): [["--listen", "127.0.0.1:0"]],
    ("seed", "export"): [["{tmp}/x.seed"], ["{tmp}/x.seed", "--snappoint", "a", "--json"]],
    ("seed", "import"): [["{tmp}/x.seed"], ["{tmp}/x.seed", "--json"]],
    ("failover",): [[], ["--force", "--json"]],
    ("failback",): [["--peer", "nbd+unix:///?socket={tmp}/s.sock"],
                    ["--peer", "nbd+unix:///?socket={tmp}/s.sock", "--discard-my-data",
                     "--json"]],
    ("migrate",): [["--peer", "nbd+unix:///?socket={tmp}/s.sock"],
                   ["--peer", "nbd+unix:///?socket={tmp}/s.sock", "--wait-quiet", "1", "--json"]],
}
KINDS = {"missing": "does not exist", "empty": "is not a prepl state directory",
         "corrupt": "is corrupt", "file": "is not a directory"}


def commands(parser, prefix=()):
    """Every command path of the CLI, e.g. ("snappoint", "create")."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
    for a in subs:
        for name, sub in a.choices.items():
            yield from commands(sub, prefix + (name,))


def test_every_subcommand_is_covered():
    assert set(commands(cli.parser())) == set(ARGS) | EXEMPT


def make(tmp_path, kind):
    st = tmp_path / "st"
    if kind == "empty":
        st.mkdir()
    elif kind == "corrupt":
        st.mkdir()
        (st / "meta.json").write_text('{"format": 1, "body": {"volume": ')
    elif kind == "file":
        st.write_text("not a state directory\n")
    return st


def snapshot(tmp_path):
    return sorted((d, tuple(sorted(fs))) for d, _, fs in os.walk(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_bad_state_directory_exits_4_with_the_message(tmp_path, kind):
    st = make(tmp_path, kind)
    before = snapshot(tmp_path)
    failures = []
    for cmd, variants in ARGS.items():
        for extra in variants:
            args = [*cmd, st, *(a.format(tmp=tmp_path) for a in extra)]
            r = prepl(*args, check=False)
            ok = (r.returncode == 4 and r.stderr.startswith("prepl: error: ")
                  and str(st) in r.stderr and KINDS[kind] in r.stderr
                  and "Traceback" not in r.stderr + r.stdout)
            if not ok:
                failures.append(f"prepl {' '.join(map(str, args))} -> {r.returncode}\n"
                                f"{r.stderr.strip()[-600:]}")
    assert not failures, "\n\n".join(failures)
    assert snapshot(tmp_path) == before, "a command created or removed something"
