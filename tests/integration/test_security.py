"""Security with real servers and clients: off loopback nothing is served
without TLS; with --tls-psk every export of a secondary needs the key
(plaintext, a wrong key and a raw client ignoring the TLS requirement are
refused), and a TLS client dying with requests in flight cannot take the
server down; state files, sockets and keys are private, and another user
can read or use none of them; no export name or manifest makes a server
open or create a file outside its state directory (checked with strace)."""
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import nbd
import pytest

from replication import control
from replication.state import StateDir
from tests.conftest import ENV, PREPL, REPO, prepl, served_pair, stop_process, wait_for
from tests.harness.rawnbd import OPT_EXPORT_NAME, RawNbd
from tests.integration.test_hostile import NBDKIT_ABORT, read_doc, run_prepl, ship, tree

MiB = 1 << 20


def off_loopback_address():
    """An IPv4 address of this machine that is not loopback, or None."""
    r = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                       capture_output=True, text=True, env=ENV)
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", r.stdout)
    return m.group(1) if m else None


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_tcp(tmp_path, state, port, *extra):
    """`prepl serve STATE --port PORT ...` in the foreground (it execs
    nbdkit); returns the Popen once the control socket answers."""
    log = open(tmp_path / "tcp-server.log", "ab")
    proc = subprocess.Popen(PREPL + ["serve", str(state), "--port", str(port)]
                            + [str(a) for a in extra], env=ENV, cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()

    def up():
        assert proc.poll() is None, open(tmp_path / "tcp-server.log").read()
        try:
            return control.request(StateDir(state).control_socket, "status", timeout=5)
        except Exception:
            return None
    try:
        wait_for(up, 30, "the TCP server")
    except BaseException:
        stop_process(proc)
        raise
    return proc


def tls_connect(host, port, export, key=None):
    """libnbd over TCP; key None: plaintext."""
    h = nbd.NBD()
    h.set_export_name(export)
    if key is None:
        h.set_tls(nbd.TLS_DISABLE)
    else:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(str(key))
        h.set_tls_username("prepl")
    h.connect_tcp(host, str(port))
    return h


def test_off_loopback_needs_tls(tmp_path):
    """`serve --port` with a bind address off loopback (any, ::, "0", "",
    this machine's address) and no --tls-psk is refused (exit 2) before
    anything starts or changes; with the default bind it serves on
    127.0.0.1 only: this machine's other address refuses the connection."""
    st = tmp_path / "s"
    prepl("init", st, "--volume", tmp_path / "s.img", "--size", "4M", "--role", "secondary")
    off = off_loopback_address()
    port = free_port("127.0.0.1")
    before = tree(tmp_path)
    for bind in ("0.0.0.0", "::", "0", "", off or "0.0.0.0"):
        r = run_prepl("serve", st, "--port", port, "--bind", bind)
        assert r.returncode == 2 and "without TLS" in r.stderr, (bind, r.stderr)
        if off:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((off, port), timeout=5)
    assert tree(tmp_path) == before and not os.path.exists(st / "server.pid")
    proc = serve_tcp(tmp_path, st, port)
    try:
        if off:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((off, port), timeout=5)
        h = tls_connect("127.0.0.1", port, "")
        assert h.pread(4096, 0) == bytes(4096)
        h.shutdown()
    finally:
        stop_process(proc)


def test_tls_psk_guards_every_export(tmp_path):
    """A secondary served off loopback with --tls-psk: for every export
    ("", info, stage/..., commit/..., an unknown one) plaintext libnbd gets
    ENOTSUP "requires TLS", a wrong key fails the TLS handshake, a raw
    client that ignores the requirement gets NBD_REP_ERR_TLS_REQD for
    NBD_OPT_GO and NBD_OPT_LIST and a closed connection for
    NBD_OPT_EXPORT_NAME -- and nothing changes.  The right key opens every
    export, and staging with it works."""
    key, other = tmp_path / "link.psk", tmp_path / "other.psk"
    prepl("keygen", key)
    prepl("keygen", other)
    st = tmp_path / "s"
    prepl("init", st, "--volume", tmp_path / "s.img", "--size", "4M", "--role", "secondary")
    host = off_loopback_address() or "127.0.0.1"
    port = free_port(host)
    primary_uuid = str(uuid.uuid4())
    exports = ["", "info", f"stage/{primary_uuid}/none/0", "commit/0", "nope"]
    proc = serve_tcp(tmp_path, st, port, "--bind", host, "--tls-psk", key)
    try:
        before = tree(tmp_path)
        for export in exports:
            with pytest.raises(nbd.Error) as e:
                tls_connect(host, port, export)
            assert e.value.errno == "ENOTSUP" and "requires TLS" in str(e.value), export
            with pytest.raises(nbd.Error) as e:
                tls_connect(host, port, export, key=other)
            assert "gnutls_handshake" in str(e.value), (export, e.value)
            with RawNbd((host, port)) as c:
                assert c.go(export) == ("error", "TLS_REQD"), export
                assert c.list() == (None, "TLS_REQD"), export
            with RawNbd((host, port)) as c:
                c.option(OPT_EXPORT_NAME, export.encode())
                with pytest.raises((EOFError, ConnectionResetError)):
                    c.recv(1)
        assert tree(tmp_path) == before
        assert "gnutls_handshake" in open(tmp_path / "tcp-server.log").read()
        assert proc.poll() is None
        for export in exports[:-1]:
            tls_connect(host, port, export, key=key).shutdown()
        with pytest.raises(nbd.Error):
            tls_connect(host, port, "nope", key=key)
        h = tls_connect(host, port, exports[2], key=key)
        h.pwrite(b"k" * 4096, 0)
        h.flush()
        h.shutdown()
        h = tls_connect(host, port, "info", key=key)
        info = json.loads(h.pread(4096, 0).split(b"\0", 1)[0])
        h.shutdown()                    # nbdkit 1.32 waits for its clients on SIGTERM
        assert info["staging"]["primary_uuid"] == primary_uuid
    finally:
        stop_process(proc)


DYING_TLS_CLIENT = """
import nbd, os, sys
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_psk_file(sys.argv[2])
h.set_tls_username("prepl")
h.connect_uri("nbds+unix:///?socket=" + sys.argv[1])
for i in range(32):
    h.aio_pread(nbd.Buffer(1 << 20), i << 20)
h.poll(0)
os._exit(0)                 # dies with 32 reads in flight
"""


@pytest.mark.slow
def test_dying_tls_client_cannot_take_the_secondary_down(tmp_path, make_server):
    """A TLS client dying with 32 reads in flight, three times, leaves the
    secondary up and serving.  (In plaintext, stock nbdkit 1.32.5 aborted
    here in every one of 60 tries: connections.c:402, see
    test_client_kill.py; its TLS path did not.)"""
    key = tmp_path / "link.psk"
    prepl("keygen", key)
    prepl("init", tmp_path / "s", "--volume", tmp_path / "s.img", "--size", "64M",
          "--role", "secondary")
    sec = make_server(tmp_path / "s")
    sec.extra = ["--tls-psk", str(key)]
    sec.start()
    for _ in range(3):
        subprocess.run([sys.executable, "-c", DYING_TLS_CLIENT, sec.sock, str(key)], env=ENV,
                       check=True, timeout=30)
        time.sleep(0.3)
        assert sec.proc.poll() is None and NBDKIT_ABORT not in sec.output(), sec.output()
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(key))
    h.set_tls_username("prepl")
    h.connect_uri(f"nbds+unix:///?socket={sec.sock}")
    assert h.pread(MiB, 5 * MiB) == bytes(MiB)


AS_OTHER_USER = """
import json, os, socket, sys
out = {}
for p in sys.argv[1:]:
    try:
        if p.endswith(".sock"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(p)
            out[p] = "connected"
        elif os.path.isdir(p):
            os.listdir(p)
            out[p] = "listed"
        else:
            open(p, "rb").read(1)
            out[p] = "read"
    except PermissionError:
        out[p] = "denied"
    except Exception as e:
        out[p] = repr(e)
print(json.dumps(out))
"""


def as_nobody(paths):
    r = subprocess.run(["/usr/bin/python3", "-c", AS_OTHER_USER] + [str(p) for p in paths],
                       capture_output=True, text=True, user=65534, group=65534, cwd="/",
                       env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_state_files_are_private(tmp_path, make_server):
    """After a replication cycle, a snappoint and a staging in progress,
    with the primary served in the background: state directories and
    their subdirectories are 0700, every file and socket in them (meta,
    maps, snapshots, al, lock, staging, server.log -- also one an older
    prepl left 0644 --, server.pid, control.sock, agent lock) is private
    to its owner, and so are the PSK file and the volumes `init --size`
    created; nobody else may write to (connect to) the NBD sockets.
    Another user (nobody) can read, list or connect to none of them --
    not even when the state directory itself is opened up to 0711."""
    base = tempfile.mkdtemp(prefix="prepl-security-", dir="/tmp")
    pstate = os.path.join(base, "p")
    pid = None
    try:
        os.chmod(base, 0o711)                  # only our own modes keep others out
        key = os.path.join(base, "link.psk")
        prepl("keygen", key)
        prepl("init", pstate, "--volume", os.path.join(base, "p.img"), "--size", "8M")
        prepl("init", os.path.join(base, "s"), "--volume", os.path.join(base, "s.img"),
              "--size", "8M", "--role", "secondary")
        with open(os.path.join(pstate, "server.log"), "w") as f:
            f.write("a log from an older prepl\n")
        os.chmod(os.path.join(pstate, "server.log"), 0o644)
        sec = make_server(os.path.join(base, "s"), sock=os.path.join(base, "s.sock")).start()
        psock = os.path.join(base, "p.sock")
        prepl("serve", pstate, "--unix", psock, "--background")
        pid = int(open(os.path.join(pstate, "server.pid")).read())
        h = nbd.NBD()
        h.connect_unix(psock)
        h.pwrite(b"p" * MiB, 0)
        h.shutdown()
        prepl("agent", pstate, "--secondary", f"nbd+unix:///?socket={sec.sock}", "--once")
        prepl("snappoint", "create", pstate, "extra")
        applied = read_doc(sec, "info")["applied"]["target"]["seq"]
        uuid_ = StateDir(pstate).read_meta().volume_uuid
        st = sec.connect(f"stage/{uuid_}/{applied}/{applied + 1}")
        st.pwrite(b"s" * 4096, 0)
        st.flush()
        st.shutdown()

        paths = []
        for state in (pstate, sec.state):
            assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
            for d, dirs, files in os.walk(state):
                for n in dirs:
                    p = os.path.join(d, n)
                    assert stat.S_IMODE(os.stat(p).st_mode) == 0o700, p
                    paths.append(p)
                for n in files:
                    p = os.path.join(d, n)
                    assert stat.S_IMODE(os.lstat(p).st_mode) & 0o077 == 0, \
                        (p, oct(os.lstat(p).st_mode))
                    paths.append(p)
        names = {os.path.relpath(p, base) for p in paths}
        for want in ("p/meta.json", "p/al", "p/lock", "p/server.log", "p/server.pid",
                     "p/control.sock", "p/agent.default.lock", "p/maps", "p/snaps",
                     "s/meta.json", "s/control.sock", "s/server.pid", "s/staging",
                     "s/staging/data.log", "s/staging/data.bmap", "s/staging/zero.bmap"):
            assert want in names, want
        assert any(n.startswith("p/snaps/") for n in names)
        assert any(n.endswith(".vmap") for n in names)
        for state in (pstate, sec.state):
            assert stat.S_IMODE(os.stat(os.path.join(state, "control.sock")).st_mode) == 0o600
        for p in (key, os.path.join(base, "p.img"), os.path.join(base, "s.img")):
            assert stat.S_IMODE(os.stat(p).st_mode) & 0o077 == 0, (p, oct(os.stat(p).st_mode))
        for p in (psock, sec.sock):     # nbdkit's (umask 022): connecting needs write
            assert stat.S_IMODE(os.stat(p).st_mode) & 0o022 == 0, (p, oct(os.stat(p).st_mode))

        targets = [pstate, sec.state, key, psock, sec.sock, os.path.join(base, "p.img")]
        assert set(as_nobody(targets).values()) == {"denied"}
        for state in (pstate, sec.state):
            os.chmod(state, 0o711)             # the files' own modes, alone
        try:
            got = as_nobody(paths)
        finally:
            for state in (pstate, sec.state):
                os.chmod(state, 0o700)
        assert {p for p, v in got.items() if v != "denied"} == set(), got
    finally:
        if pid is not None:
            r = prepl("stop", pstate, check=False)
            if r.returncode not in (0, 3):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(base, ignore_errors=True)


WRITES = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND")
MUTATING = ("creat", "mkdir", "mkdirat", "unlink", "unlinkat", "rename", "renameat",
            "renameat2", "link", "linkat", "symlink", "symlinkat", "truncate", "chmod",
            "fchmodat", "chown", "fchownat", "lchown", "mknod", "mknodat", "utimensat",
            "rmdir")


def traced_files(trace):
    """[(syscall, path, writes?)] of a strace -e trace=%file output."""
    out = []
    for line in open(trace, errors="replace"):
        m = re.match(r"\d+\s+(\w+)\((.*)", line)
        if not m:
            continue
        call, args = m.groups()
        for path in re.findall(r'"((?:[^"\\]|\\.)*)"', args):
            path = os.path.normpath(path)      # "STATE/staging/../../x" is not in STATE
            writes = call in MUTATING or (call in ("open", "openat", "openat2")
                                          and bool(WRITES.search(args)))
            out.append((call, path, writes))
    return out


def test_no_export_name_or_manifest_escapes_the_state_directory(tmp_path, make_server):
    """With strace on both servers (every thread) while hostile clients
    open path-like export names and commit manifests full of paths
    (primary UUID, digest, replica UUID, interval name): every file either
    server creates, writes, renames or removes is in its own state
    directory or its volume, no traced path names the canary etc/passwd or
    /etc/passwd, and nothing outside the state directories changes.  (The
    trace sees the staging's own writes, so it did watch the plugin.)"""
    prim, sec = served_pair(tmp_path, make_server, 4 * MiB)
    prim.connect().pwrite(b"0" * 100000, 0)
    prim.ctl("snappoint_create", name="s0")
    m0, reply = ship(prim, sec, None, "s0")
    assert reply["ok"], reply
    prim.connect().pwrite(b"1" * 100000, 50000)
    prim.ctl("snappoint_create", name="s1")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("canary\n")
    outside = {k: v for k, v in tree(tmp_path).items()
               if not k.startswith(("p/", "s/", "p.img", "s.img"))}
    trace = tmp_path / "strace.out"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(trace),
                               "-p", str(prim.pid), "-p", str(sec.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def attached():
            for pid in (prim.pid, sec.pid):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/status") as f:
                        if f"TracerPid:\t{tracer.pid}\n" not in f.read():
                            return False
            return True
        wait_for(attached, 20, "strace to attach to every thread")
        etc = str(tmp_path / "etc" / "passwd")
        names = ["/etc/passwd", etc, "../../etc/passwd", "snap/../../etc/passwd",
                 f"snap/..{etc}", "stage/../../etc/passwd", "stage/../../0",
                 f"stage/{etc[1:]}/none/0", "stage/../s/none/0", "commit/../../etc/passwd",
                 "info/../../etc/passwd", "../s/meta.json", "../p.img"]
        for srv in (prim, sec):
            for name in names:
                with pytest.raises(nbd.Error):
                    srv.connect(name)
            for raw in (b"/etc/passwd\0", b"../../etc/passwd\xff"):
                with RawNbd(srv.sock) as c:
                    assert c.go(raw)[0] == "error"
        for tamper in (lambda m: m.update(primary_uuid="../../etc/passwd"),
                       lambda m: m.update(primary_uuid=etc),
                       lambda m: m.update(replica_uuid=etc),
                       lambda m: m.update(digest=etc)):
            assert ship(prim, sec, m0["target"], "s1", tamper)[1]["ok"] is False
        m1, reply = ship(prim, sec, m0["target"], "s1",
                         lambda m: m["target"].update(name="../../../../etc/passwd"))
        assert reply["ok"], reply               # a label, applied as one
        wait_for(lambda: read_doc(sec, "info")["staging"] is None, 10, "the merge")
    finally:
        tracer.send_signal(signal.SIGINT)       # detaches
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    files = traced_files(trace)
    allowed = (prim.state + "/", sec.state + "/", str(tmp_path / "p.img"),
               str(tmp_path / "s.img"))
    wrote = [(c, p) for c, p, w in files if w]
    assert any(p.startswith(sec.state + "/staging/") for _, p in wrote), \
        "the trace saw no staging write: it did not watch the plugin"
    assert [(c, p) for c, p in wrote if not p.startswith(allowed)] == []
    assert [(c, p) for c, p, _ in files if "passwd" in p or p.startswith(str(tmp_path / "etc"))] \
        == []
    assert {k: v for k, v in tree(tmp_path).items()
            if not k.startswith(("p/", "s/", "p.img", "s.img", "strace.out"))} == outside
    assert sec.connect().pread(4 * MiB, 0) == prim.connect("snap/s1").pread(4 * MiB, 0)
