"""scripts/install-units: the systemd units of prepl instances.

    scripts/install-units [--root DIR] [--prepl PATH] INSTANCE...

What it owns: the installed copies of scripts/systemd/*.service (in
ROOT/etc/systemd/system/, with PATH, the prepl to run, in place of the
templates' /usr/local/bin/prepl) and each instance's drop-ins, written from
its configuration file ROOT/etc/prepl/INSTANCE.toml (replication/config.py,
checked in full first: nothing is written for an instance whose file is
missing or bad):

* prepl-serve@INSTANCE.service.d/paths.conf: ReadWritePaths= for the state
  directory and a file volume, DeviceAllow= for a block-device volume (the
  units run under ProtectSystem=strict and DevicePolicy=closed), and for a
  unix socket the directory it lives in (RuntimeDirectory= under /run, which
  is emptied at boot; ReadWritePaths= elsewhere, which must exist);
* prepl-agent@INSTANCE.service.d/paths.conf, when the file has an [agent]
  table: ReadWritePaths= for the state directory (the link's lock and sync
  socket).

The paths the configuration names (the state directory, the volume its
metadata records) are looked up as they are, not under ROOT: install-units
runs on the host that serves them, after `prepl init`; ROOT only moves where
the configuration is read and the units are written (for tests and staging
trees).  Exit codes as prepl's: 2 bad usage or configuration, 4 a state
directory missing or corrupt.
"""
import argparse
import os
import shutil
import stat
import sys

from . import cli, config
from .errors import EXIT_OK, PreplError, UsageError
from .state import StateDir
from .units import check_name

TEMPLATES = os.path.join(cli.REPO, "scripts", "systemd")
UNIT_DIR = "etc/systemd/system"
CONF_DIR = "etc/prepl"
TEMPLATE_PREPL = "/usr/local/bin/prepl"
SERVE, AGENT = "prepl-serve@", "prepl-agent@"


def default_prepl():
    """This repository's .venv/bin/prepl if there is one, else prepl on PATH."""
    venv = os.path.join(cli.REPO, ".venv", "bin", "prepl")
    return venv if os.access(venv, os.X_OK) else shutil.which("prepl")


def unit_path(value):
    """value as a unit file spells a path ('%' doubled); no blanks or quotes."""
    if not os.path.isabs(value) or any(c.isspace() or c in "\"'\\" for c in value):
        raise UsageError(f"{value!r}: the units need an absolute path without blanks, quotes "
                         "or backslashes")
    return value.replace("%", "%%")


def serve_dropin(path, serve):
    """The lines of prepl-serve@INSTANCE.service.d/paths.conf."""
    state = os.path.abspath(serve["state"])
    volume = StateDir(state).read_meta().volume
    lines = [f"ReadWritePaths={unit_path(state)}"]
    try:
        block = stat.S_ISBLK(os.stat(volume).st_mode)
    except OSError as e:
        raise UsageError(f"the volume {volume} of {state} (from {path}): {e.strerror}")
    lines.append(f"DeviceAllow={unit_path(volume)} rw" if block else
                 f"ReadWritePaths={unit_path(os.path.abspath(volume))}")
    if serve.get("unix"):
        sockdir = os.path.dirname(os.path.abspath(serve["unix"]))
        if sockdir.startswith("/run/") and sockdir != "/run/":
            lines += [f"RuntimeDirectory={unit_path(sockdir)[len('/run/'):]}",
                      "RuntimeDirectoryPreserve=yes"]
        elif not os.path.isdir(sockdir):
            raise UsageError(f"{path}: serve.unix: the directory {sockdir} of the socket does "
                             "not exist (make it, or put the socket under /run/)")
        else:
            lines.append(f"ReadWritePaths={unit_path(sockdir)}")
    return lines


def instance(root, name):
    """{unit file name: drop-in lines} for instance name, from its config."""
    check_name(name)
    path = os.path.join(root, CONF_DIR, f"{name}.toml")
    commands = cli.parser().commands
    doc = config.read(path)
    wanted = ("serve", "agent") if "agent" in doc else ("serve",)
    got = config.check_file(path, doc, {c: commands[c] for c in wanted})
    for cmd, have in got.items():
        missing = config.lacking(have, cli.NEEDS[cmd])
        if missing:
            keys = " or ".join(k if k in config.SHARED else f"{cmd}.{k}" for k in missing)
            raise UsageError(f"{path}: prepl {cmd} needs {keys}")
    dropins = {f"{SERVE}{name}.service": serve_dropin(path, got["serve"])}
    if "agent" in got:
        state = os.path.abspath(got["agent"]["state"])
        dropins[f"{AGENT}{name}.service"] = [f"ReadWritePaths={unit_path(state)}"]
    return dropins


def write(path, text, say):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    say(f"wrote {path}")


def install(root, prepl, names, say=print):
    """Checks every instance's configuration, then writes the units and the
    drop-ins; returns {instance: [units to enable]}."""
    prepl = unit_path(prepl)
    plans = {name: instance(root, name) for name in names}      # all checked first
    unit_dir = os.path.join(root, UNIT_DIR)
    for t in sorted(os.listdir(TEMPLATES)):
        with open(os.path.join(TEMPLATES, t)) as f:
            write(os.path.join(unit_dir, t), f.read().replace(TEMPLATE_PREPL, prepl), say)
    for dropins in plans.values():
        for unit, lines in dropins.items():
            write(os.path.join(unit_dir, f"{unit}.d", "paths.conf"),
                  "# written by scripts/install-units from the instance's configuration\n"
                  "[Service]\n" + "".join(f"{line}\n" for line in lines), say)
    return {name: [u.removesuffix(".service") for u in d] for name, d in plans.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="install-units", description=(
        "Installs prepl's systemd units (prepl-serve@.service, prepl-agent@.service) and, "
        "for each INSTANCE, drop-ins written from /etc/prepl/INSTANCE.toml."))
    p.add_argument("instances", nargs="+", metavar="INSTANCE")
    p.add_argument("--root", default="/", help="install under this directory (default /)")
    p.add_argument("--prepl", default=default_prepl(),
                   help="the prepl the units run (default: this repository's .venv/bin/prepl, "
                        "else prepl on PATH)")
    args = p.parse_args(argv)
    try:
        if not args.prepl or not os.access(args.prepl, os.X_OK):
            raise UsageError(f"no executable prepl at {args.prepl!r}: give --prepl PATH "
                             "(run scripts/bootstrap to make .venv/bin/prepl)")
        plans = install(args.root, os.path.abspath(args.prepl), args.instances)
    except PreplError as e:
        print(f"install-units: error: {e}", file=sys.stderr)
        return e.exit_code
    units = " ".join(u for us in plans.values() for u in us)
    print(f"now: systemctl daemon-reload && systemctl enable --now {units}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
