"""prepl serve/agent --config FILE (replication/config.py): every option of
both commands set in the file parses as its flag does, a flag on the command
line wins, and bad files are refused with exit 2 naming file, key and reason."""
import pytest

from replication import cli, config

# every option of serve and agent: (flag argv, TOML value), values that are
# no defaults, so a key the file did not set would show
FLAGS = {
    "serve": {
        "unix": (["--unix", "/run/prepl/x.sock"], '"/run/prepl/x.sock"'),
        "port": (["--port", "10809"], "10809"),
        "bind": (["--bind", "0.0.0.0"], '"0.0.0.0"'),
        "background": (["--background"], "true"),
        "timeout": (["--timeout", "5.5"], "5.5"),
        "tls_psk": (["--tls-psk", "/etc/prepl/k.psk"], '"/etc/prepl/k.psk"'),
        "threads": (["--threads", "7"], "7"),
        "force": (["--force"], "true"),
        "sync_interval": (["--sync-interval", "2.5"], "2.5"),
    },
    "agent": {
        "secondary": (["--secondary", "nbds://h:10809"], '"nbds://h:10809"'),
        "name": (["--name", "l2"], '"l2"'),
        "primary": (["--primary", "nbd://p:2"], '"nbd://p:2"'),
        "interval": (["--interval", "30"], "30"),
        "max_dirty": (["--max-dirty", "256M"], '"256M"'),
        "max_writes": (["--max-writes", "1000"], "1000"),
        "once": (["--once"], "true"),
        "timeout": (["--timeout", "12.5"], "12.5"),
        "peer_timeout": (["--peer-timeout", "3"], "3"),
        "tls_psk": (["--tls-psk", "/etc/prepl/k.psk"], '"/etc/prepl/k.psk"'),
        "max_in_flight": (["--max-in-flight", "1M"], "1048576"),
        "bwlimit": (["--bwlimit", "20M"], '"20M"'),
        "nice": (["--nice", "3"], "3"),
        "whole_snapshot": (["--whole-snapshot"], "true"),
    },
}
# what each command needs besides the option under test
BASE = {"serve": (["--unix", "/run/s.sock"], 'unix = "/run/s.sock"'),
        "agent": (["--secondary", "nbd://s:1"], 'secondary = "nbd://s:1"')}


def parse(argv):
    args = cli.parser().parse_args(argv)
    return vars(config.apply(args, argv, cli.parser, cli.NEEDS))


def comparable(ns):
    return {k: v for k, v in ns.items() if k not in ("config", "func")}


def write(tmp_path, text):
    path = tmp_path / "prepl.toml"
    path.write_text(text)
    return str(path)


def test_the_table_names_every_option():
    subs = cli.parser().commands
    for cmd, flags in FLAGS.items():
        assert set(flags) | {"state"} == set(config.options(subs[cmd])), cmd


@pytest.mark.parametrize("cmd,key", [(c, k) for c in FLAGS for k in FLAGS[c]])
def test_every_option_in_the_file_parses_as_its_flag(tmp_path, cmd, key):
    flag, value = FLAGS[cmd][key]
    base_argv, base_line = BASE[cmd]
    if key in ("unix", "port", "secondary"):       # it is the needed one itself
        base_argv, base_line = [], ""
    by_flags = parse([cmd, "/var/lib/prepl/v"] + base_argv + flag)
    path = write(tmp_path, f'state = "/var/lib/prepl/v"\n[{cmd}]\n{base_line}\n{key} = {value}\n')
    by_file = parse([cmd, "--config", path])
    assert comparable(by_file) == comparable(by_flags)
    default = cli.parser().commands[cmd].get_default(key)
    assert by_file[key] != default, "the test's value must differ from the default"


def test_shared_keys_and_a_table_that_repeats_one(tmp_path):
    path = write(tmp_path, 'state = "/s"\ntls_psk = "/k"\n[serve]\nunix = "/u"\n'
                           '[agent]\nsecondary = "nbd://h:1"\ntls_psk = "/k2"\n')
    assert parse(["serve", "--config", path])["tls_psk"] == "/k"
    assert parse(["agent", "--config", path])["tls_psk"] == "/k2"
    assert parse(["stop", "--config", path])["state"] == "/s"


def test_a_flag_on_the_command_line_wins(tmp_path):
    path = write(tmp_path, 'state = "/from/file"\n[agent]\nsecondary = "nbd://h:1"\n'
                           'bwlimit = "20M"\ninterval = 30\nnice = 3\n'
                           '[serve]\nunix = "/u"\nthreads = 4\n')
    got = parse(["agent", "/from/cli", "--config", path, "--bwlimit", "1M", "--nice", "10"])
    # --nice 10 is the default: given on the command line, it still wins
    assert (got["state"], got["bwlimit"], got["nice"], got["interval"]) == \
        ("/from/cli", 1 << 20, 10, 30.0)
    got = parse(["serve", "--config", path, "--port", "10809"])   # the group goes with it
    assert (got["port"], got["unix"], got["threads"]) == (10809, None, 4)
    assert config.given(cli.parser, ["agent", "--config", path], "agent") == set()
    assert config.given(cli.parser, ["agent", "/s", "--nice", "10", "--once"], "agent") == \
        {"state", "nice", "once"}


BAD = [
    ('state = "/s"\nbwlimt = "2M"\n', "bwlimt: unknown key at the top level"),
    ('state = "/s"\n[agent]\nbwlimt = "2M"\n', "agent.bwlimt: unknown key"),
    ('state = "/s"\n[agent]\nmax-dirty = "2M"\n', "agent.max-dirty: unknown key; write max_dirty"),
    ('state = "/s"\nexporter = {}\n', "exporter: unknown key"),
    ('state = "/s"\n[agent]\ninterval = "30"\n', "agent.interval: wrong type: str '30' where "
                                                 "--interval takes a number"),
    ('state = "/s"\n[agent]\nmax_writes = 2.5\n', "agent.max_writes: wrong type"),
    ('state = "/s"\n[agent]\nonce = 1\n', "agent.once: wrong type: int 1 where --once takes "
                                          "true or false"),
    ('state = 5\n', "state: wrong type: int 5 where STATE takes a string"),
    ('agent = 3\n', "agent: must be a table"),
    ('state = "/s"\n[agent]\nbwlimit = "20X"\n', "agent.bwlimit: bad value '20X': invalid rate"),
    ('state = "/s"\n[agent]\nname = "a b"\n', "agent.name: bad value 'a b'"),
    ('state = "/s"\n[agent]\nnice = 40\n', "agent.nice: bad value 40: must be from 0 to 19"),
    ('state = "/s"\n[agent]\nsecondary = ["x"]\n', "agent.secondary: wrong type: list"),
    ('state = "/s"\n[serve]\nunix = "/u"\nport = 1\n', "serve.unix and serve.port: exclude "
                                                       "each other"),
    ('state = "/s"\n[agent\n', "invalid TOML: "),
    ('state = "/s"\nstate = "/t"\n', "invalid TOML: Cannot overwrite a value (at line 2"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_files_are_refused(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    cmd = "serve" if "serve" in text else "agent"
    assert cli.main([cmd, "--config", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepl: error: {path}: {message}"), err


@pytest.mark.parametrize("what", ["missing", "directory", "not utf-8"])
def test_unreadable_files_are_refused(tmp_path, capsys, what):
    path = tmp_path / "prepl.toml"
    if what == "directory":
        path.mkdir()
    elif what == "not utf-8":
        path.write_bytes(b'state = "\xff"\n')
    assert cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    reason = {"missing": "No such file or directory", "directory": "Is a directory",
              "not utf-8": "invalid TOML"}[what]
    assert str(path) in err and reason in err, err


def test_what_a_command_needs_may_come_from_either(tmp_path, capsys):
    path = write(tmp_path, '[serve]\nunix = "/u"\n')
    assert cli.main(["serve", "--config", path]) == 2
    assert "prepl serve needs STATE" in capsys.readouterr().err
    assert cli.main(["agent", "/s", "--config", path]) == 2
    assert "prepl agent needs --secondary" in capsys.readouterr().err
    assert cli.main(["serve", "/s"]) == 2
    assert "prepl serve needs --unix or --port" in capsys.readouterr().err
    assert parse(["serve", "/s", "--config", path])["unix"] == "/u"
