"""The configuration file of `prepl serve` and `prepl agent` (`--config
FILE`): TOML, read with tomllib, holding what their flags hold.

What it owns: the file's layout and the mapping of its keys onto the
argparse namespace of a command.  One file per instance serves both commands
(the systemd units read /etc/prepl/INSTANCE.toml):

    state = "/var/lib/prepl/vol"             # shared: STATE of serve, agent and stop
    tls_psk = "/etc/prepl/pair.psk"          # shared: --tls-psk of serve and agent

    [serve]
    port = 10809
    bind = "198.18.0.1"

    [agent]
    secondary = "nbds://198.18.0.2:10809"
    bwlimit = "20M"
    interval = 30

Keys are the flags' names with underscores (`--max-dirty` is `max_dirty`).
The top level holds only the shared keys (SHARED) and the tables [serve] and
[agent]; a table may repeat a shared key, and then its value wins for that
command.  `prepl stop --config FILE` reads only `state`.

What it promises: every value goes through the converter and the choices of
its flag, so `bwlimit = "20M"` is checked exactly as `--bwlimit 20M` (a
switch such as `force` takes true or false); a flag given on the command
line wins over the file, the whole of its mutually exclusive group with it
(`--port` on the command line drops the file's `unix`), known by parsing the
command line again with every default suppressed, never by comparing with
defaults; an unreadable file, invalid TOML, an unknown key, a value of the
wrong type or a bad value is a UsageError (exit 2) naming the file, the key
and the reason.  A command reads the top level and its own table;
`check_file` (scripts/install-units) checks every table.
"""
import argparse
import tomllib

from .errors import UsageError

COMMANDS = ("serve", "agent")         # the commands with a table of their own
SHARED = ("state", "tls_psk")         # top-level keys, shared by the commands that take them
NOT_IN_FILE = ("help", "config")


def read(path):
    """The file's TOML as a dict."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read the configuration file {path}: {e.strerror or e}")
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML: {e}")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: invalid TOML: not UTF-8 ({e.reason} at byte {e.start})")


def options(sub):
    """key -> argparse action: what the file may set for subparser sub."""
    return {a.dest: a for a in sub._actions if a.dest not in NOT_IN_FILE}


def _bad(path, key, reason):
    return UsageError(f"{path}: {key}: {reason}")


def _flag(action):
    return action.option_strings[-1] if action.option_strings else action.dest.upper()


def _type_error(path, key, action, value, wanted):
    return _bad(path, key, f"wrong type: {type(value).__name__} {value!r} where "
                           f"{_flag(action)} takes {wanted}")


def convert(path, key, action, value):
    """value (from TOML) as the flag of action would parse it."""
    if action.nargs == 0:                     # a switch: --force, --once
        if not isinstance(value, bool):
            raise _type_error(path, key, action, value, "true or false")
        return action.const if value else action.default
    conv = action.type
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _type_error(path, key, action, value, "a string" if conv is None else "a value")
    if conv is None and not isinstance(value, str):
        raise _type_error(path, key, action, value, "a string")
    if conv in (int, float) and (isinstance(value, str) or
                                 (conv is int and isinstance(value, float))):
        raise _type_error(path, key, action, value,
                          "an integer" if conv is int else "a number")
    if conv not in (None, int, float) and isinstance(value, float):
        raise _type_error(path, key, action, value, "a string or an integer")
    try:
        v = value if conv is None else conv(value if conv in (int, float) else str(value))
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise _bad(path, key, f"bad value {value!r}: {e}")
    c = action.choices
    if c is not None and v not in c:
        allowed = (f"from {c.start} to {c.stop - 1}" if isinstance(c, range)
                   else ", ".join(map(str, c)))
        raise _bad(path, key, f"bad value {value!r}: must be {allowed}")
    return v


def _table(path, doc, name):
    t = doc.get(name, {})
    if not isinstance(t, dict):
        raise _bad(path, name, f"must be a table ([{name}]), not {type(t).__name__}")
    return t


def _check_top(path, doc):
    for key in doc:
        if key in SHARED or key in COMMANDS:
            continue
        hint = f"; write {key.replace('-', '_')}" if "-" in key else ""
        raise _bad(path, key, f"unknown key at the top level{hint} (it holds "
                   f"{', '.join(SHARED)} and the tables {', '.join(f'[{c}]' for c in COMMANDS)}; "
                   "a command's other settings go into its table)")


def values(path, doc, cmd, sub):
    """dest -> converted value: what the file sets for command cmd (the
    shared top-level keys it takes, then its table, which wins)."""
    _check_top(path, doc)
    opts = options(sub)
    items = [(k, k, doc[k]) for k in SHARED if k in doc and k in opts]
    if cmd in COMMANDS:
        items += [(f"{cmd}.{k}", k, v) for k, v in _table(path, doc, cmd).items()]
    got, where = {}, {}
    for shown, key, value in items:
        if key not in opts:
            hint = f"; write {key.replace('-', '_')}" if key.replace("-", "_") in opts else ""
            raise _bad(path, shown, f"unknown key{hint} (keys of [{cmd}]: "
                       f"{', '.join(sorted(opts))})")
        got[key], where[key] = convert(path, shown, opts[key], value), shown
    for group in sub._mutually_exclusive_groups:
        both = [where[a.dest] for a in group._group_actions if a.dest in got]
        if len(both) > 1:
            raise _bad(path, " and ".join(both), "exclude each other (as "
                       f"{' and '.join(_flag(a) for a in group._group_actions)} do)")
    return got


def check_file(path, doc, commands):
    """doc (read from path) checked for every command of commands {name:
    subparser}; returns {name: values}."""
    return {cmd: values(path, doc, cmd, sub) for cmd, sub in commands.items()}


def given(make_parser, argv, cmd):
    """The dests of cmd that argv gives explicitly: argv parsed again with
    every default of cmd's subparser suppressed."""
    p = make_parser()
    sub = p.commands[cmd]
    for a in sub._actions:
        a.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv))) & set(options(sub))


def apply(args, argv, make_parser, needs):
    """args (parsed from argv by make_parser()) with the values of
    args.config merged in where argv gave no flag; then checks that what
    the command needs (needs[cmd]: tuples of alternative dests) is there."""
    if getattr(args, "config", None):
        sub = make_parser().commands[args.cmd]
        flags = given(make_parser, argv, args.cmd)
        for group in sub._mutually_exclusive_groups:    # a flag wins for its whole group
            dests = {a.dest for a in group._group_actions}
            if dests & flags:
                flags |= dests
        from_file = values(args.config, read(args.config), args.cmd, sub)
        for dest, v in from_file.items():
            if dest not in flags:
                setattr(args, dest, v)
    missing = lacking(vars(args), needs.get(args.cmd, ()))
    if missing:
        flags = " or ".join(d.upper() if d == "state" else "--" + d.replace("_", "-")
                            for d in missing)
        raise UsageError(f"prepl {args.cmd} needs {flags}: on the command line, or as "
                         f"{' or '.join(missing)} in the file of --config")
    return args


def lacking(have, needs):
    """The first tuple of alternative dests of needs of which have (dest ->
    value) holds none, or None."""
    return next((alt for alt in needs if all(have.get(d) is None for d in alt)), None)
