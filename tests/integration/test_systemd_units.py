"""The systemd units (scripts/systemd/) as scripts/install-units installs them:
they pass `systemd-analyze verify`, their drop-ins admit what the instance's
configuration names, and their ExecStart/ExecStop command lines, read from
the installed files and run as spelled with the units' environment and a
stand-in $NOTIFY_SOCKET, serve, report READY=1 only once the control socket
answers, replicate and stop cleanly.  systemd is not PID 1 here: what runs
the units is the test."""
import os
import shlex
import signal
import socket
import subprocess
import time

import pytest

from replication import control
from replication.state import StateDir
from tests.conftest import REPO, prepl
from tests.harness.servers import pid_alive, stop_pid

INSTALL = os.path.join(REPO, "scripts", "install-units")
PREPL_BIN = os.path.join(REPO, ".venv", "bin", "prepl")
UNITS = "etc/systemd/system"
# systemd's environment for a service: its default PATH and nothing else
SYSTEMD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LANG": "C.UTF-8"}


def install(root, *instances, check=True):
    r = subprocess.run([INSTALL, "--root", root, "--prepl", PREPL_BIN, *instances],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def write_config(root, name, text):
    d = os.path.join(root, "etc", "prepl")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{name}.toml"), "w") as f:
        f.write(text)


def verify(root, *units):
    unit_dir = os.path.join(root, UNITS)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True,
                       text=True, timeout=120, cwd=unit_dir,
                       env=dict(os.environ, SYSTEMD_UNIT_PATH=unit_dir + ":"))
    ours = [line for line in r.stderr.splitlines() if "prepl" in line]
    assert r.returncode == 0 and not ours, r.stderr
    return r


def service_section(path, instance):
    """{key: [values]} of a unit file's [Service], %i and %% resolved."""
    out, section = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                value = value.replace("%i", instance).replace("%%", "%")
                out.setdefault(key, []).append(value)
    return out


def command(svc, key):
    argv = shlex.split(svc[key][0])
    assert os.path.isabs(argv[0]) and argv[0][0] not in "-@+!:", argv
    return argv


def unit_env(svc):
    env = dict(SYSTEMD_ENV)
    for value in svc.get("Environment", []):
        env.update(v.split("=", 1) for v in shlex.split(value))
    return env


def test_installed_units_pass_systemd_analyze_verify(tmp_path):
    root = str(tmp_path / "root")
    prepl("init", tmp_path / "st", "--volume", tmp_path / "v.img", "--size", "4M")
    write_config(root, "file", f'state = "{tmp_path}/st"\n[serve]\nunix = "/run/prepl/f.sock"\n'
                               '[agent]\nsecondary = "nbds://198.18.0.2:10809"\n'
                               'tls_psk = "/etc/prepl/pair.psk"\n')
    img = tmp_path / "blk.img"
    img.write_bytes(b"\0" * (4 << 20))
    loop = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        prepl("init", tmp_path / "bst", "--volume", loop, "--role", "secondary")
        write_config(root, "blk", f'state = "{tmp_path}/bst"\n[serve]\nport = 10809\n'
                                  'bind = "198.18.0.2"\ntls_psk = "/etc/prepl/pair.psk"\n')
        out = install(root, "file", "blk").stdout
        assert "systemctl enable --now prepl-serve@file prepl-agent@file prepl-serve@blk\n" \
            in out
        dropin = os.path.join(root, UNITS, "prepl-serve@{}.service.d", "paths.conf")
        with open(dropin.format("file")) as f:
            assert f.read().splitlines()[2:] == [
                f"ReadWritePaths={tmp_path}/st", f"ReadWritePaths={tmp_path}/v.img",
                "RuntimeDirectory=prepl", "RuntimeDirectoryPreserve=yes"]
        with open(dropin.format("blk")) as f:
            assert f.read().splitlines()[2:] == [f"ReadWritePaths={tmp_path}/bst",
                                                 f"DeviceAllow={loop} rw"]
        assert not os.path.exists(os.path.join(root, UNITS, "prepl-agent@blk.service.d"))
        verify(root, "prepl-serve@file.service", "prepl-agent@file.service",
               "prepl-serve@blk.service")
        # enabled, the agent is wanted by its server (and by multi-user.target)
        subprocess.run(["systemctl", f"--root={root}", "enable", "prepl-serve@file.service",
                        "prepl-agent@file.service"], check=True, capture_output=True, timeout=60)
        for wants in ("prepl-serve@file.service.wants", "multi-user.target.wants"):
            assert os.path.islink(os.path.join(root, UNITS, wants, "prepl-agent@file.service"))
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


@pytest.mark.parametrize("config,code,message", [
    (None, 2, "cannot read the configuration file"),
    ('state = "{st}"\n[serve]\nunix = "/run/p.sock"\nthreds = 2\n', 2, "serve.threds: unknown"),
    ('state = "{st}"\n[serve]\nunix = "/run/p.sock"\n[agent]\nname = "x"\n', 2,
     "prepl agent needs agent.secondary"),
    ('state = "{st}"\n[agent]\nsecondary = "nbd://h:1"\n', 2, "prepl serve needs serve.unix or "
                                                             "serve.port"),
    ('state = "{st}/nowhere"\n[serve]\nport = 1\n', 4, "nowhere"),
])
def test_install_units_refuses_a_bad_configuration(tmp_path, config, code, message):
    root = str(tmp_path / "root")
    prepl("init", tmp_path / "st", "--volume", tmp_path / "v.img", "--size", "4M")
    if config is not None:
        write_config(root, "bad", config.format(st=tmp_path / "st"))
    r = install(root, "bad", check=False)
    assert r.returncode == code and r.stderr.startswith("install-units: error: ") and \
        message in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(root, UNITS)), "nothing is written"


class Notify:
    """A stand-in for systemd's notification socket."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def wait(self, field, proc, timeout=60):
        """The first message holding field; fails if proc (unless None)
        exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc is None or proc.poll() is None, f"exited {proc.returncode} before {field}"
            self.sock.settimeout(0.2)
            try:
                msg = self.sock.recv(4096).decode().split("\n")
            except socket.timeout:
                continue
            if field in msg:
                return msg
        raise AssertionError(f"no {field} within {timeout} s")


def run_unit(svc, notify, log):
    env = dict(unit_env(svc), NOTIFY_SOCKET=notify.path)
    return subprocess.Popen(command(svc, "ExecStart"), env=env, cwd="/", stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log)


@pytest.fixture
def instance(tmp_path):
    """An instance name whose configuration is /etc/prepl/NAME.toml (the
    path the units spell), removed at the end."""
    name = f"pytest-{os.getpid()}"
    made = not os.path.isdir("/etc/prepl")
    os.makedirs("/etc/prepl", exist_ok=True)
    path = f"/etc/prepl/{name}.toml"
    yield name, path
    if os.path.exists(path):
        os.unlink(path)
    if made:
        os.rmdir("/etc/prepl")


def test_the_units_command_lines_serve_replicate_and_stop(tmp_path, make_server, instance):
    name, conf = instance
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img", "--size", "4M")
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", "4M",
          "--role", "secondary")
    sec = make_server(tmp_path / "s").start()
    text = (f'state = "{tmp_path}/p"\n[serve]\nunix = "{tmp_path}/p.sock"\n'
            f'[agent]\nsecondary = "nbd+unix:///?socket={sec.sock}"\ninterval = 3600\n')
    with open(conf, "w") as f:
        f.write(text)
    root = str(tmp_path / "root")
    write_config(root, name, text)
    install(root, name)
    serve = service_section(os.path.join(root, UNITS, "prepl-serve@.service"), name)
    agent = service_section(os.path.join(root, UNITS, "prepl-agent@.service"), name)
    ctl = StateDir(tmp_path / "p").control_socket
    procs = []
    try:
        with open(tmp_path / "units.log", "ab") as log:
            n = Notify(tmp_path / "notify-serve.sock")
            procs.append(run_unit(serve, n, log))
            ready = n.wait("READY=1", procs[0])
            # at READY=1 the control socket answers, in the unit's main process
            assert control.request(ctl, "status", timeout=5)["pid"] == procs[0].pid
            assert f"MAINPID={procs[0].pid}" in ready
            a = Notify(tmp_path / "notify-agent.sock")
            procs.append(run_unit(agent, a, log))
            a.wait("READY=1", procs[1])
            prepl("sync", tmp_path / "p")             # the agent's sync socket answers
            procs[1].send_signal(signal.SIGTERM)      # how systemd stops it (no ExecStop)
            assert procs[1].wait(30) in (0, -signal.SIGTERM)
            stop = subprocess.run(command(serve, "ExecStop"), capture_output=True, text=True,
                                  env=dict(unit_env(serve), MAINPID=str(procs[0].pid)),
                                  cwd="/", timeout=120)
            assert stop.returncode == 0, stop.stdout + stop.stderr
            assert procs[0].wait(30) == 0
            n.wait("STOPPING=1", None, 5)             # sent before it exited, queued
        assert not pid_alive(procs[0].pid) and StateDir(tmp_path / "p").read_meta().clean
    finally:
        for p in procs:
            if p.poll() is None:
                stop_pid(p.pid)
                p.wait(10)
