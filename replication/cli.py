"""The `prepl` command line.  Exit codes are in replication/errors.py:
0 ok, 1 failed, 2 bad usage, 3 no server running, 4 state directory
missing/corrupt/in use, 5 refused (the request would lose data)."""
import argparse
import json
import logging
import os
import secrets
import select
import signal
import socket
import stat
import sys
import time

from . import control, nbdkit_bin, state, status
from .meta import Receipt
from .errors import (EXIT_OK, NotRunningError, PreplError, RefusedError, StateError,
                     UsageError, InUseError)
from .peers import PSK_USER
from .durability import sync_interval
from .units import check_name, fmt_size, parse_pow2, parse_size

log = logging.getLogger("prepl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "nbdplugin", "plugin.py")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _size(what):
    return lambda text: _wrap(parse_size, text, what)


def _rate(text):
    """A bandwidth (bytes per second, K/M/G suffixes as powers of 1024); 0: unlimited."""
    return 0 if text.strip() == "0" else _wrap(parse_size, text, "rate")


def _pow2(what, lo, hi):
    return lambda text: _wrap(parse_pow2, text, what, lo, hi)


def _name(text):
    return _wrap(check_name, text)


def _wrap(f, *args):
    try:
        return f(*args)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e))


def _print_json(obj):
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _request(args, op, **kw):
    sd = state.StateDir(args.state)
    try:
        return control.request(sd.control_socket, op, **kw)
    except NotRunningError:
        sd.read_meta()          # a missing or damaged state directory says so (exit 4)
        raise


# ---- init ---------------------------------------------------------------

def cmd_init(args):
    sd, body = state.init(args.state, args.volume, size=args.size,
                          region_size=args.region_size, block_size=args.block_size,
                          role=args.role)
    if args.json:
        _print_json({"state_dir": sd.path, "volume": body.volume,
                     "volume_uuid": body.volume_uuid, "size": body.size, "role": body.role})
    else:
        print(f"initialised {sd.path}: {body.role} of {body.volume} "
              f"({fmt_size(body.size)}, region {fmt_size(body.region_size)}, "
              f"block {fmt_size(body.block_size)}), volume uuid {body.volume_uuid}")
    return EXIT_OK


# ---- serve / stop --------------------------------------------------------

def _precheck_serve(sd):
    body = sd.read_meta()
    if sd.is_locked():
        raise InUseError(f"state directory {sd.path} is in use by another server; "
                         f"stop it first (`prepl stop {sd.path}`)")
    have = state.volume_size(body.volume) if os.path.exists(body.volume) else None
    if have != body.size:
        raise StateError(f"volume {body.volume} is "
                         f"{'missing' if have is None else f'{have} bytes'} but {sd.path} "
                         f"tracks a volume of {body.size} bytes; nothing was changed")
    return body


def nbdkit_threads(role, asked=None):
    """nbdkit's worker threads per connection: asked, else nbdkit's 16 on a
    primary (its clients' I/O may block on the disk) and the number of CPUs
    (at least 2) on a secondary, whose one big client, the agent, sends
    requests that are CPU work in C.  Measured on 2 CPUs: a 10 % cycle took
    0.14-0.147 s with 2 threads on the secondary, 0.165 s with 16 (more
    threads only contend for the GIL and the socket)."""
    if asked is not None:
        return asked
    return 16 if role == "primary" else max(2, min(16, os.cpu_count() or 2))


def cmd_serve(args):
    if args.sync_interval is not None:
        sync_interval(args.sync_interval)       # a UsageError (exit 2) before anything
    sd = state.StateDir(args.state)
    body = _precheck_serve(sd)
    if args.port is not None and args.bind not in LOOPBACK and not args.tls_psk:
        raise UsageError(f"refusing to serve on {args.bind} without TLS: give --tls-psk FILE "
                         "(made by `prepl keygen FILE`), or --bind 127.0.0.1")
    nbdkit = nbdkit_bin.binary()
    cmd = [nbdkit, "--log=stderr", "-P", sd.pidfile,
           "-t", str(nbdkit_threads(body.role, args.threads))]
    scheme = "nbd"
    if args.tls_psk:
        _check_psk_file(args.tls_psk)
        cmd += ["--tls=require", f"--tls-psk={os.path.abspath(args.tls_psk)}"]
        scheme = "nbds"
    if args.unix:
        _remove_stale_socket(args.unix)
        cmd += ["-U", os.path.abspath(args.unix)]
        uri = f"{scheme}+unix:///?socket={os.path.abspath(args.unix)}"
    else:
        cmd += ["-p", str(args.port), "-i", args.bind]
        uri = f"{scheme}://{args.bind}:{args.port}"
    if args.verbose:
        cmd.append("-v")
    cmd += ["python", PLUGIN, f"state={sd.path}", f"uri={uri}"]
    if args.force:
        if body.role == "primary" and body.superseded:
            print(f"prepl: warning: --force: {sd.path} is superseded (its replica "
                  f"{body.superseded.by_volume_uuid} was promoted); serving it read-write "
                  "anyway: writes from now on are a split brain that a failback must resolve "
                  "with --discard-my-data on one side", file=sys.stderr)
        cmd.append("force=1")
    if args.sync_interval is not None:
        cmd.append(f"sync_interval={args.sync_interval:g}")
    # nbdkit embeds the system's Python, which finds its standard library
    # through the first python3 on PATH: keep the system's directories first
    # (nbdkit itself is an absolute path, so this PATH does not choose it)
    os.environ["PATH"] = nbdkit_bin.server_path()
    if not args.background:
        sys.stdout.flush()
        os.execv(nbdkit, [nbdkit, "-f"] + cmd[1:])
    # nbdkit's own daemon mode sends stderr to /dev/null, and a foreground
    # nbdkit that is our direct child stops when we exit: detach it
    # (_spawn_detached) so its log lands in STATE/server.log.  It inherits
    # the write end of a pipe: EOF on the read end means it has exited.
    logpath = sd.p("server.log")
    rfd, wfd = os.pipe()
    try:
        logfd = os.open(logpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(logfd, 0o600)     # a log from an older prepl may be 0644
            _spawn_detached([nbdkit, "-f"] + cmd[1:], logfd, wfd)
        finally:
            os.close(logfd)
        os.close(wfd)
        wfd = None
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                st = control.request(sd.control_socket, "status", timeout=5)
                break
            except NotRunningError:
                if select.select([rfd], [], [], 0.05)[0] and not os.read(rfd, 1):
                    raise PreplError(f"the server did not start; its log {logpath} ends "
                                     "with:\n" + _tail(logpath))
                if time.monotonic() > deadline:
                    raise PreplError(f"the server did not answer on {sd.control_socket} "
                                     f"within {args.timeout} s; its log:\n" + _tail(logpath))
    finally:
        os.close(rfd)
        if wfd is not None:
            os.close(wfd)
    where = args.unix or f"{args.bind}:{args.port}"
    print(f"serving {st['volume']} on {where} (pid {st['pid']}, log {logpath})")
    return EXIT_OK


def _spawn_detached(argv, logfd, keep_fd, reparent_timeout=30):
    """Runs argv in a session of its own, as a child of init (or of the
    nearest subreaper), never of a process that exits after it started:
    nbdkit 1.32 sets PR_SET_PDEATHSIG(SIGTERM) as it starts, so if its
    parent exits after that it is killed at once, before it logs anything.
    (`setsid -f nbdkit` did that once in 30-90 starts on a busy machine:
    setsid's parent exited after nbdkit's prctl.)  So: fork, setsid, fork
    again, and the grandchild execs argv only once its parent has exited
    and it has been reparented.  stdout and stderr go to logfd, keep_fd is
    inherited; a failure to exec is written to logfd."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)          # the middle process exits at once
        return
    code = 1
    try:                            # the middle process: a new session, a child, exit
        os.setsid()
        middle = os.getpid()
        if os.fork() == 0:
            deadline = time.monotonic() + reparent_timeout
            while os.getppid() == middle:
                if time.monotonic() > deadline:
                    raise OSError(f"{argv[0]} was not reparented within {reparent_timeout} s")
                time.sleep(0.001)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            os.set_inheritable(keep_fd, True)
            os.execvp(argv[0], argv)
        code = 0
    except BaseException as e:      # noqa: B036 -- in a forked child: report, never return
        try:
            os.write(logfd, f"prepl: error: cannot start {argv[0]}: {e}\n".encode())
        finally:
            os._exit(127)
    finally:
        os._exit(code)


def cmd_keygen(args):
    """A TLS pre-shared key file (psktool format, username prepl), 0600."""
    if os.path.exists(args.file):
        raise RefusedError(f"{args.file} exists; refusing to overwrite a key (remove it first)")
    fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{PSK_USER}:{secrets.token_hex(32)}\n")
        f.flush()
        os.fsync(f.fileno())
    print(f"wrote a TLS pre-shared key to {args.file}; copy it to the other node (mode 0600)")
    return EXIT_OK


def _check_psk_file(path):
    try:
        st = os.stat(path)
        with open(path) as f:
            line = f.readline().strip()
    except OSError as e:
        raise UsageError(f"cannot read the PSK file {path}: {e.strerror}")
    user, _, key = line.partition(":")
    if not user or not key or any(c not in "0123456789abcdefABCDEF" for c in key):
        raise UsageError(f"{path} is not a PSK file (USER:HEXKEY); make one with `prepl keygen`")
    if st.st_mode & 0o077:
        raise UsageError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); "
                         f"chmod 600 {path}")


def _remove_stale_socket(path):
    """nbdkit leaves its unix socket behind when it stops: remove it if
    nothing listens on it; refuse if something does."""
    if not os.path.exists(path):
        return
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise UsageError(f"{path} exists and is not a socket; choose another --unix path")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        s.close()
    raise InUseError(f"{path} is in use by another server; choose another --unix path")


def _tail(path, n=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _pid_alive(pid):
    """True while pid runs (a zombie that nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cmd_stop(args):
    sd = state.StateDir(args.state)
    sd.read_meta()
    try:
        with open(sd.pidfile) as f:
            pid = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        pid = None
    if pid is None or not _pid_alive(pid) or not sd.is_locked():
        raise NotRunningError(f"no server is running for {sd.path}")
    # First make the state final and durable through the control socket
    # (in-flight writes drain, later ones fail with ESHUTDOWN, the metadata
    # records a clean stop).  nbdkit 1.32 then waits for connected clients
    # to hang up before it exits: past a grace period it is killed, which
    # loses nothing because the state is already final.
    try:
        control.request(sd.control_socket, "shutdown", timeout=args.timeout)
    except NotRunningError:
        pass
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    grace = time.monotonic() + 2
    note = ""
    while _pid_alive(pid) or sd.is_locked():
        if time.monotonic() > grace and not note and sd.read_meta().clean:
            os.kill(pid, signal.SIGKILL)
            note = " (connected clients were disconnected)"
        if time.monotonic() > deadline:
            raise PreplError(f"server pid {pid} did not stop within {args.timeout} s")
        time.sleep(0.05)
    print(f"stopped server pid {pid} of {sd.path}{note}")
    return EXIT_OK


# ---- status -------------------------------------------------------------

def cmd_status(args):
    sd = state.StateDir(args.state)
    try:
        st = _request(args, "status")
        st["running"] = True
    except NotRunningError as e:
        st = status.stopped(sd.path, sd.read_meta())
        _show_status(args, st)
        print(str(e), file=sys.stderr)
        return e.exit_code
    _show_status(args, st)
    return EXIT_OK


def _show_status(args, st):
    if args.json:
        st["schema"] = "prepl.status/3"
        _print_json(st)
        return
    print(f"state dir:  {st['state_dir']}")
    print(f"role:       {st['role']} (generation {st['generation']})")
    print(f"volume:     {st['volume']} ({fmt_size(st['size'])}), uuid {st['volume_uuid']}")
    if not st["running"]:
        print(f"server:     not running (last stop {'clean' if st['clean_stop'] else 'UNCLEAN'})")
    elif st["role"] == "secondary":
        print(f"server:     running, pid {st['pid']}")
        bound = st["bound"]
        print(f"bound to:   {bound['primary_uuid'] if bound else 'nothing yet (first commit binds)'}")
        a = st["applied"]
        print(f"applied:    {'interval %s (%s)' % (a['target']['seq'], a['target'].get('name')) if a else 'nothing yet'}")
        if st["staging"]:
            print(f"staging:    {st['staging']['base']} -> {st['staging']['target']} "
                  f"({st['staging']['state']})")
        fb = st.get("failback")
        if fb:
            print(f"failback:   pending: the first interval from {bound['primary_uuid']} "
                  f"overwrites {fmt_size(fb['report']['bytes'])} of this node's own writes "
                  "after the divergence point; until then export \"\" is its own old image")
        return
    else:
        oi = st["open_interval"]
        print(f"server:     running, pid {st['pid']}")
        print(f"open interval {oi['seq']}: {oi['changed_regions']} regions / "
              f"{oi['changed_blocks']} blocks changed")
        p = st.get("promoted")
        if p:
            t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["at"]))
            print(f"promoted:   {t} by failover from a replica of {p['from_volume_uuid']}; "
                  f"divergence point interval {p['divergence']['seq']} "
                  f"({p['divergence'].get('name')})")
    sup = st.get("superseded")
    if sup:
        t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sup["promoted_at"]))
        print(f"SUPERSEDED: its replica {sup['by_volume_uuid']} at {sup['by_uri']} was "
              f"promoted at {t} (generation {sup['generation']}); export \"\" is "
              f"{'READ-WRITE (--force)' if st.get('read_only') is False else 'read-only'}; "
              f"remedy: `prepl failback {st['state_dir']} --peer URI`")
    for sp in st.get("snappoints", []):
        print(f"snappoint {sp['name']}: snapshot {sp['snapshot']}")
    for d in st.get("damaged_intervals") or []:
        print(f"DAMAGED interval {d['interval']}: {d['file']}; needed by link(s) "
              f"{', '.join(d['needed_by']) or 'none'}: `prepl link resync {st['state_dir']} "
              "LINK` for each")
    for name, ln in (st.get("links") or {}).items():
        if "agent_running" not in ln:
            continue
        last = ln.get("last_cycle") or {}
        rpo = ln.get("rpo_seconds")
        print(f"link {name}: {ln.get('state')} (agent {'running' if ln['agent_running'] else 'not running'}),"
              f" replica {ln.get('replica_uuid')}, last applied {ln.get('cursor')}, "
              f"RPO {'-' if rpo is None else f'{rpo:.1f} s'}, pending {fmt_size(ln['bytes_pending']) if ln['bytes_pending'] else 0} bytes, "
              f"last cycle {last.get('bytes', 0)} bytes in {last.get('seconds', 0):.2f} s")
        pr = ln.get("progress")
        if pr:
            print(f"  transferring {pr['snappoint']}: {pr['percent']}% ({pr['bytes_done']}/"
                  f"{pr['bytes_total']} bytes, {pr['rate_MBps']} MB/s, ETA {pr['eta_seconds']} s)")


# ---- snappoints -----------------------------------------------------------

def cmd_snap_create(args):
    info = _request(args, "snappoint_create", name=args.name, dataless=args.dataless)
    if args.json:
        _print_json(info)
    else:
        print(f"snappoint {info['name']} created (interval {info['interval']} closed, "
              f"{'export ' + info['export'] if info['export'] else 'dataless'})")
    return EXIT_OK


def cmd_snap_list(args):
    sps = _request(args, "snappoint_list")
    if args.json:
        _print_json(sps)
        return EXIT_OK
    print(f"{'NAME':20} {'INTERVAL':>8} {'CREATED':19} {'SNAPSHOT':8} {'CHANGED':>10}")
    for sp in sps:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sp["created"]))
        print(f"{sp['name']:20} {sp['interval']:>8} {created:19} {sp['snapshot']:8} "
              f"{sp['changed_blocks']:>10}")
    return EXIT_OK


def cmd_snap_convert(args):
    _request(args, "snappoint_convert", name=args.name)
    print(f"snappoint {args.name} is dataless now")
    return EXIT_OK


def cmd_snap_delete(args):
    _request(args, "snappoint_delete", name=args.name)
    print(f"snappoint {args.name} deleted (its changes merged into the next interval)")
    return EXIT_OK


# ---- links -------------------------------------------------------------------

def cmd_seed_export(args):
    from . import seed
    h = seed.export(args.state, args.file, snappoint=args.snappoint, tls_psk=args.tls_psk)
    print(json.dumps(h, indent=2, sort_keys=True) if args.json else
          f"wrote {args.file}: {seed.describe(h)}")
    return EXIT_OK


def cmd_seed_import(args):
    from . import seed
    h = seed.import_(args.state, args.file)
    print(json.dumps(h, indent=2, sort_keys=True) if args.json else
          f"imported {seed.describe(h)} into {args.state}: the link's first cycle sends the "
          "changes since that snappoint")
    return EXIT_OK


def cmd_link_set(args):
    from . import daemon
    state.StateDir(args.state).read_meta()
    daemon.request_set(args.state, args.name, bwlimit=args.bwlimit)
    print(f"link {args.name}: bandwidth limit " + (f"{fmt_size(args.bwlimit)}/s" if
                                                  args.bwlimit else "none (unlimited)"))
    return EXIT_OK


def cmd_link_list(args):
    st = _request(args, "status")
    links = st.get("links") or {}
    if args.json:
        _print_json(links)
        return EXIT_OK
    if not links:
        print("no links")
    for name, ln in sorted(links.items()):
        rpo = ln.get("rpo_seconds")
        print(f"{name}: {'PAUSED, ' if ln.get('paused') else ''}{ln.get('state') or 'idle'}, "
              f"agent {'running' if ln['agent_running'] else 'not running'}, replica "
              f"{ln.get('replica_uuid')} at {ln.get('secondary')}, RPO "
              f"{'-' if rpo is None else f'{rpo:.1f} s'}, pending "
              f"{fmt_size(ln['bytes_pending'])}")
    return EXIT_OK


def cmd_link_pause(args):
    _request(args, "link_pause", name=args.name)
    print(f"link {args.name}: paused (changes are tracked; its agent makes no cycle until "
          f"`prepl link resume {args.state} {args.name}`)")
    return EXIT_OK


def cmd_link_resume(args):
    _request(args, "link_resume", name=args.name)
    print(f"link {args.name}: resumed")
    return EXIT_OK


def cmd_link_remove(args):
    res = _request(args, "link_remove", name=args.name)
    print(f"link {args.name}: removed; snappoints freed: "
          f"{', '.join(res['snappoints_freed']) or 'none'}")
    return EXIT_OK


def cmd_link_resync(args):
    info = _request(args, "link_resync", name=args.name)
    if args.json:
        _print_json(info)
    else:
        print(f"link {args.name}: its next cycle replicates the whole volume (a full resync); "
              "the replica keeps its current image until that cycle applies")
    return EXIT_OK


# ---- agent ------------------------------------------------------------------

def cmd_agent(args):
    from . import daemon
    state.StateDir(args.state).read_meta()     # exit 4 at once if it is no state directory
    return daemon.run(args)


def cmd_sync(args):
    from . import daemon
    try:
        reply = daemon.request_sync(args.state, args.name, wait=not args.no_wait)
    except NotRunningError:
        state.StateDir(args.state).read_meta()     # a missing or damaged one says so (exit 4)
        raise
    if args.no_wait:
        print(f"cycle requested from the agent of link {args.name}")
    else:
        print(daemon.applied_message(Receipt.from_json(reply["receipt"])))
    return EXIT_OK


# ---- roles ---------------------------------------------------------------------

def cmd_failover(args):
    from . import peers
    sd = state.StateDir(args.state)
    body = sd.read_meta()
    if args.peer:
        info, why = peers.probe(args.peer, args.tls_psk)
        old = body.bound.primary_uuid if body.bound else None
        if info is None:
            print(f"prepl: warning: the old primary at {args.peer} does not answer ({why}); "
                  "failing over without checking it", file=sys.stderr)
        elif old and info.get("volume_uuid") != old:
            raise RefusedError(f"{args.peer} serves volume {info.get('volume_uuid')}, not {old} "
                               f"(the primary {sd.path} replicates): wrong --peer; nothing "
                               "was changed")
        elif info.get("role") == "primary" and not args.force:
            raise RefusedError(f"the old primary at {args.peer} still serves volume {old} as a "
                               f"primary (generation {info.get('generation')}): stop it first "
                               f"(`prepl stop STATE` on its host), or give --force to fail over "
                               "anyway (both sides then accept writes: split brain); nothing "
                               "was changed")
        elif info.get("role") == "primary":
            print(f"prepl: warning: --force: the old primary at {args.peer} still serves; both "
                  "sides accept writes from now on (split brain)", file=sys.stderr)
    else:
        print("prepl: warning: no --peer: whether the old primary still serves was not "
              "checked (if it does, both sides accept writes: split brain)", file=sys.stderr)
    res = _request(args, "failover", timeout=args.timeout)
    if args.json:
        _print_json(res)
    else:
        d = res["divergence"]
        print(f"{sd.path} is a primary now (generation {res['generation']}): export \"\" is "
              f"read-write at {res['uri']}; divergence point: interval {d['seq']} "
              f"({d.get('name')}) of volume {res['promoted_from']}; writes from now on are "
              f"tracked after snappoint {res['failback_snappoint']}")
    return EXIT_OK


def cmd_failback(args):
    from . import peers
    sd = state.StateDir(args.state)
    sd.read_meta()
    doc, why = peers.probe(args.peer, args.tls_psk)
    if doc is None:
        raise PreplError(f"the node to fail back onto, at {args.peer}, does not answer ({why}); "
                         "it must be running (and --tls-psk given if it requires TLS); "
                         "nothing was changed")
    res = _request(args, "failback", timeout=args.timeout, info=doc, uri=args.peer,
                   peer_uuid=doc.get("volume_uuid"), discard_my_data=args.discard_my_data)
    if args.json:
        _print_json(res)
        return EXIT_OK
    from .divergence import when
    print(f"{sd.path} is the secondary of volume {doc.get('volume_uuid')} at {args.peer} now"
          + (" (already)" if res.get("again") else "") + "; export \"\" is read-only.")
    if res["blocks"]:
        what = (f"{fmt_size(res['bytes'])} of this node's own writes after the divergence "
                f"point (intervals {', '.join(map(str, res['intervals'])) or 'none'}, "
                f"{when(res['first'])} .. {when(res['last_write'])} by its clock"
                + (f", with {res['activity_log_extents']} activity-log extents of an unclean "
                   "stop" if res["activity_log_extents"] else "") + ")")
        if res["whole_volume"]:
            what = f"the whole volume ({res['whole_volume']})"
        print(f"to be overwritten by the new primary's image: {what}")
    else:
        print("this node wrote nothing after the divergence point: nothing of its own is lost")
    print(f"next: on the new primary, `prepl agent STATE --secondary URI-OF-THIS-SERVER` "
          f"(this server listens at {res.get('uri')}); its first cycle sends the changes since "
          "the failover and these blocks")
    return EXIT_OK


def cmd_migrate(args):
    from . import migrate
    sd = state.StateDir(args.state)
    sd.read_meta()

    def said(receipt, reply):
        if not args.json:
            print(f"final interval {receipt.target.seq} ({receipt.target.name}) applied; "
                  f"{args.peer} is a primary now (generation {reply['generation']})")
    res, doc, final = migrate.migrate(sd, args.peer, args.tls_psk, args.name, args.wait_quiet,
                                      lambda op, **kw: _request(args, op, **kw), said)
    if args.json:
        _print_json(dict(res, promoted=doc, final=final))
    else:
        print(f"{sd.path} is the secondary of {doc.get('volume_uuid')} at {args.peer} now"
              + (" (already)" if res.get("again") else "") + ": both volumes hold the same "
              "image; next, on the new primary: `prepl agent STATE --secondary "
              f"{res.get('uri')}`")
    return EXIT_OK


def cmd_check(args):
    """A Nagios-style check: one line, exit 0/1/2/3 (replication/health.py)."""
    from . import health
    sd = state.StateDir(args.state)
    if not 0 <= args.warn_rpo <= args.crit_rpo:
        print(health.line(health.UNKNOWN, f"--warn-rpo {args.warn_rpo:g} must be at least 0 "
                          f"and at most --crit-rpo {args.crit_rpo:g}", []))
        return health.UNKNOWN
    try:
        body = sd.read_meta()
        st = control.request(sd.control_socket, "status", timeout=args.timeout)
        code, text, perf = health.evaluate(st, args.warn_rpo, args.crit_rpo)
    except NotRunningError:
        code, text, perf = health.CRITICAL, (
            f"{body.role} {sd.path}: its server is not running (last stop "
            f"{'clean' if body.clean else 'UNCLEAN'})"), []
    except StateError as e:
        code = health.CRITICAL if "corrupt" in str(e) else health.UNKNOWN
        text, perf = str(e), []
    except PreplError as e:       # no answer in time, a refused request
        code, text, perf = health.CRITICAL, f"{sd.path}: its server does not answer ({e})", []
    print(health.line(code, text, perf))
    return code


def cmd_exporter(args):
    from . import exporter
    for st in args.state:
        state.StateDir(st).read_meta()     # a missing or damaged one: exit 4 before serving
    addr, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen {args.listen!r}: give ADDR:PORT, e.g. 127.0.0.1:9942 or "
                         "[::1]:9942")
    exporter.serve([os.path.abspath(s) for s in args.state], args.listen)
    return EXIT_OK


# ---- parser ---------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(prog="prepl", description=(
        "Periodic block-level replication of a volume served over NBD. "
        "Exit codes: 0 ok, 1 failed, 2 usage, 3 no server running, "
        "4 state directory missing/corrupt/in use, 5 refused, 6 timed out."))
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a state directory for a volume")
    s.add_argument("state", help="state directory to create (new or empty)")
    s.add_argument("--volume", required=True, help="the volume: a file or block device")
    s.add_argument("--size", type=_size("size"),
                   help="create VOLUME as a new zero-filled file of SIZE (e.g. 10G)")
    s.add_argument("--region-size", type=_pow2("region size", 4096, 64 << 20),
                   default=state.DEFAULT_REGION,
                   help="copy-on-write and change-map granularity (default 64K)")
    s.add_argument("--block-size", type=_pow2("block size", 512, 64 << 20),
                   default=state.DEFAULT_BLOCK,
                   help="block-map granularity (default 4K)")
    s.add_argument("--role", choices=state.ROLES, default="primary")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", help="serve the volume over NBD (nbdkit, foreground)",
                       description="Serves the volume of STATE over NBD (nbdkit with prepl's "
                       "plugin), in the foreground unless --background. Needs STATE and one of "
                       "--unix or --port, on the command line or in the file of --config. "
                       "Under systemd (Type=notify, $NOTIFY_SOCKET set) it reports READY=1 "
                       "once its control socket answers.")
    _state_and_config(s)
    where = s.add_mutually_exclusive_group()
    where.add_argument("--unix", metavar="SOCKET", help="listen on a unix socket")
    where.add_argument("--port", type=int, help="listen on a TCP port")
    s.add_argument("--bind", default="127.0.0.1", help="address for --port (default 127.0.0.1)")
    s.add_argument("--background", action="store_true",
                   help="detach; return once the server answers (log in STATE/server.log)")
    s.add_argument("--timeout", type=float, default=60, help="seconds to wait with --background")
    s.add_argument("--tls-psk", metavar="FILE",
                   help="require TLS with this pre-shared key file (see `prepl keygen`)")
    s.add_argument("--threads", type=int, choices=range(1, 1025), metavar="N",
                   help="nbdkit worker threads per connection (default: 16 on a primary, "
                        "the number of CPUs, at least 2, on a secondary)")
    s.add_argument("--force", action="store_true",
                   help="serve a superseded primary (its replica was promoted) read-write "
                        "anyway: split brain, to be resolved by a failback")
    s.add_argument("--sync-interval", type=float, metavar="SECONDS",
                   help="a primary makes its volume durable (fdatasync) this often while "
                        "snappoints are taken (default 5; 0.05 to 3600); a snappoint itself "
                        "does not wait for it. After a power loss the next cycle resends the "
                        "activity-log extents written since the last durable point")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("keygen", help="write a new TLS pre-shared key file (mode 0600)")
    s.add_argument("file")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("stop", help="stop the server of a state directory (clean stop)")
    _state_and_config(s, "stop reads only its `state`")
    s.add_argument("--timeout", type=float, default=60)
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("agent", help="replicate a primary to a secondary (one link)",
                       description="Runs the replication agent of one link: cycles of "
                       "snappoint, transfer of the changed blocks, commit on the secondary. "
                       "Exit codes: 0 applied (--once), 5 refused (retrying will not help: "
                       "wrong peer or geometry), 6 timed out (--once; retrying may help). "
                       "Under systemd (Type=notify) it reports READY=1 once its sync socket "
                       "is up.")
    _state_and_config(s)
    s.add_argument("--secondary", metavar="URI",
                   help="the secondary: nbd[s]://HOST:PORT or nbd[s]+unix:///?socket=PATH "
                        "(needed: here or in the file of --config)")
    s.add_argument("--name", type=_name, default="default", help="link name (default: default)")
    s.add_argument("--primary", metavar="URI",
                   help="the primary server's NBD URI (default: what its status says)")
    s.add_argument("--interval", type=float, default=60, help="seconds between cycles")
    s.add_argument("--max-dirty", type=_size("size"), default=None,
                   help="also start a cycle once the open interval holds this much (e.g. 256M)")
    s.add_argument("--max-writes", type=int, default=None,
                   help="also start a cycle after this many writes since the last one")
    s.add_argument("--once", action="store_true",
                   help="bring the secondary up to date once (initial sync if needed), then exit")
    s.add_argument("--timeout", type=float, default=600, help="with --once: give up after this")
    s.add_argument("--peer-timeout", type=float, default=10, metavar="SECONDS",
                   help="declare a connection dead once nothing has progressed on it for "
                        "this long (no reply, no byte moved; like DRBD's timeout): every "
                        "connect and request to the secondary and to the primary's server; "
                        "the cycle then fails and is retried with backoff (default 10)")
    s.add_argument("--tls-psk", metavar="FILE",
                   help="PSK file (`prepl keygen`) for a secondary served with --tls-psk")
    s.add_argument("--max-in-flight", type=_size("size"), default=16 << 20, metavar="SIZE",
                   help="data the transfer keeps in flight (its buffer memory; default 16M, "
                        "enough for 1 Gbit/s at 100 ms round trip); at least 4K")
    s.add_argument("--bwlimit", type=_rate, default=0, metavar="RATE",
                   help="at most RATE bytes per second to the secondary (K/M/G suffixes as "
                        "powers of 1024: 20M is 20 MiB/s; 0, the default: unlimited); "
                        "changed while it runs by `prepl link set STATE NAME --bwlimit RATE`")
    s.add_argument("--nice", type=int, default=10, choices=range(0, 20), metavar="N",
                   help="run at CPU niceness N (0-19, default 10), so that on a busy CPU the "
                        "volume's clients are served before the transfer; 0: normal priority")
    s.add_argument("--whole-snapshot", action="store_true",
                   help="each cycle's snappoint keeps a whole image of the volume, readable as "
                        "snap/LINK.N until the next cycle (to compare with the replica); by "
                        "default it keeps only the blocks the cycle sends, so a write during a "
                        "cycle copies old data only if it overwrites one of them")
    s.set_defaults(func=cmd_agent)

    s = sub.add_parser("sync", help="ask the running agent of a link for a cycle now")
    s.add_argument("state")
    s.add_argument("--name", type=_name, default="default")
    s.add_argument("--no-wait", action="store_true", help="return once the cycle is requested")
    s.set_defaults(func=cmd_sync)

    s = sub.add_parser("failover", help="make this secondary (its server running) a primary",
                       description="Promotes the replica of a running secondary in place: "
                       "export \"\" becomes the read-write, tracked volume at the same address "
                       "(the image of the last applied interval), the generation goes up and "
                       "writes from now on are tracked for a later failback. Refused (exit 5) "
                       "on a primary, on a replica that never applied an interval, and while "
                       "the old primary at --peer still serves (unless --force).")
    s.add_argument("state")
    s.add_argument("--peer", metavar="URI",
                   help="the old primary's NBD address: checked first (it must not serve "
                        "as a primary any more)")
    s.add_argument("--tls-psk", metavar="FILE", help="PSK file for a --peer served with TLS")
    s.add_argument("--force", action="store_true",
                   help="fail over although the old primary still serves (split brain)")
    s.add_argument("--timeout", type=float, default=600,
                   help="seconds to wait for the server (a merge in progress ends first)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_failover)

    s = sub.add_parser("failback", help="make this primary the secondary of the node it "
                       "diverged from (its server running)",
                       description="Easy failback: the old primary (or, with "
                       "--discard-my-data, the promoted node) becomes the secondary of the "
                       "node at --peer. Its own writes after the divergence point are reported "
                       "and will be overwritten by the peer's next cycle, which sends only "
                       "them and the peer's changes since the failover. Refused (exit 5) if "
                       "the peer was not promoted from this volume (nor this node from it), "
                       "and in a split brain (both sides wrote after the failover) unless "
                       "--discard-my-data names this node the loser.")
    s.add_argument("state")
    s.add_argument("--peer", required=True, metavar="URI",
                   help="the node to follow (the new primary): its NBD address")
    s.add_argument("--tls-psk", metavar="FILE", help="PSK file for a --peer served with TLS")
    s.add_argument("--discard-my-data", action="store_true",
                   help="split brain: this node's writes after the divergence point are the "
                        "ones to lose")
    s.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_failback)

    s = sub.add_parser("migrate", help="planned role swap: make the secondary at --peer the "
                       "primary and this primary its secondary, nothing lost",
                       description="Planned migration (the application stopped): waits for a "
                       "moment with no write in flight, makes export \"\" refuse writes, "
                       "runs a final cycle, promotes the peer (through its export "
                       "\"promote\") and makes this node its secondary with the final interval "
                       "as the common point: both volumes identical, no resync. Refused (exit "
                       "5) if writes keep coming for --wait-quiet seconds, if the peer is no "
                       "secondary of this volume, or while the link's agent runs. Running it "
                       "again finishes an interrupted one.")
    s.add_argument("state")
    s.add_argument("--peer", required=True, metavar="URI", help="the secondary to promote")
    s.add_argument("--tls-psk", metavar="FILE", help="PSK file for a --peer served with TLS")
    s.add_argument("--name", type=_name, default="default",
                   help="the link to the peer, if none is recorded yet (default: default)")
    s.add_argument("--wait-quiet", type=float, default=10, metavar="SECONDS",
                   help="wait this long for a moment with no write in flight (default 10)")
    s.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("check", help="health check for monitoring (Nagios-style exit codes)",
                       description="Prints one line, PREPL OK|WARNING|CRITICAL|UNKNOWN - what "
                       "| perfdata, and exits 0 (OK: every link's RPO under --warn-rpo), 1 "
                       "(WARNING), 2 (CRITICAL: RPO past --crit-rpo, the server down, corrupt "
                       "metadata, a damaged map or invalid snapshot a link needs, a failed "
                       "volume flush, a superseded primary) or 3 (UNKNOWN: it cannot tell, "
                       "including usage errors). On a secondary the RPO is the age of the "
                       "interval its replica holds.")
    s.add_argument("state")
    s.add_argument("--warn-rpo", type=float, default=300, metavar="SECONDS",
                   help="WARNING from this RPO on (default 300)")
    s.add_argument("--crit-rpo", type=float, default=900, metavar="SECONDS",
                   help="CRITICAL from this RPO on (default 900)")
    s.add_argument("--timeout", type=float, default=10, metavar="SECONDS",
                   help="CRITICAL if the server does not answer within this (default 10)")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("exporter", help="serve Prometheus metrics of state directories",
                       description="Serves /metrics (Prometheus text format) on --listen "
                       "until killed: per state directory prepl_up (0 when its server does not "
                       "answer within 2 s), the node's role and generation, a primary's "
                       "writes, snapshots, copy-on-write bytes and per link RPO, bytes "
                       "pending, cycles applied and failed, bytes sent, sync progress; a "
                       "secondary's applied interval and its age. Run it as its own process "
                       "(unit), like node_exporter.")
    s.add_argument("state", nargs="+", help="state directories (primaries or secondaries)")
    s.add_argument("--listen", required=True, metavar="ADDR:PORT",
                   help="where to serve /metrics, e.g. 127.0.0.1:9942")
    s.set_defaults(func=cmd_exporter)

    s = sub.add_parser("status", help="show the state of a volume and its server")
    s.add_argument("state")
    s.add_argument("--json", action="store_true", help="one JSON object (schema prepl.status/3)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("snappoint", help="create, list, convert or delete snappoints")
    ssub = s.add_subparsers(dest="snapcmd", required=True, metavar="ACTION")
    c = ssub.add_parser("create", help="close the open interval at a new snappoint")
    c.add_argument("state")
    c.add_argument("name", type=_name)
    c.add_argument("--dataless", action="store_true", help="no snapshot, change map only")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_snap_create)
    c = ssub.add_parser("list", help="list snappoints")
    c.add_argument("state")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_snap_list)
    c = ssub.add_parser("convert", help="free a snappoint's snapshot, keep its map")
    c.add_argument("state")
    c.add_argument("name", type=_name)
    c.add_argument("--dataless", action="store_true", required=True,
                   help="required: the only conversion there is")
    c.set_defaults(func=cmd_snap_convert)
    c = ssub.add_parser("delete", help="delete a snappoint, merging its changes forward")
    c.add_argument("state")
    c.add_argument("name", type=_name)
    c.set_defaults(func=cmd_snap_delete)

    s = sub.add_parser("seed", help="carry a replica's first image as a file (offline "
                       "seeding)", description="export writes the image of a dataful "
                       "snappoint of a running primary to FILE; import, with the "
                       "secondary's server stopped, verifies FILE whole and makes it the "
                       "replica's image, after which the link's first cycle sends only "
                       "the changes since the seed's snappoint")
    ssub = s.add_subparsers(dest="seedcmd", required=True, metavar="ACTION")
    c = ssub.add_parser("export", help="write a seed of the primary (its server running)")
    c.add_argument("state")
    c.add_argument("file")
    c.add_argument("--snappoint", type=_name, help="an existing dataful snappoint (default: "
                   "a new one, seed.TIME, made dataless by the first cycle after the seed)")
    c.add_argument("--tls-psk", help="the key, if the primary is served with --tls-psk")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_seed_export)
    c = ssub.add_parser("import", help="make a seed the secondary's replica (its server "
                        "stopped)")
    c.add_argument("state")
    c.add_argument("file")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_seed_import)

    s = sub.add_parser("link", help="manage a replication link of a primary")
    lsub = s.add_subparsers(dest="linkcmd", required=True, metavar="ACTION")
    c = lsub.add_parser("resync", help="make the link's next cycle send the whole volume "
                        "(after a damaged closed map, or a replica that is no image of this "
                        "primary's chain)")
    c.add_argument("state")
    c.add_argument("name", type=_name, help="the link's name (agent --name, default 'default')")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_link_resync)
    c = lsub.add_parser("list", help="the links of a primary, with their state and RPO")
    c.add_argument("state")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_link_list)
    for verb, f, text in (("pause", cmd_link_pause, "stop the link's cycles (changes are "
                           "still tracked; the RPO grows) until resume"),
                          ("resume", cmd_link_resume, "let a paused link's agent cycle again"),
                          ("remove", cmd_link_remove, "forget the link and free the "
                           "snappoints only it needed (refused while its agent runs)")):
        c = lsub.add_parser(verb, help=text)
        c.add_argument("state")
        c.add_argument("name", type=_name, help="the link's name")
        c.set_defaults(func=f)
    c = lsub.add_parser("set", help="change a setting of the link's running agent")
    c.add_argument("state")
    c.add_argument("name", type=_name, help="the link's name (agent --name, default 'default')")
    c.add_argument("--bwlimit", type=_rate, required=True, metavar="RATE",
                   help="bytes per second to the secondary (K/M/G: powers of 1024; 0: "
                        "unlimited), from the next request on")
    c.set_defaults(func=cmd_link_set)
    p.commands = sub.choices       # name -> subparser (replication/config.py reads them)
    return p


def _state_and_config(s, what=None):
    s.add_argument("state", nargs="?",
                   help="the state directory (or `state` in the file of --config)")
    s.add_argument("--config", metavar="FILE",
                   help="TOML file holding what the flags hold (keys: the flags' names with "
                        "underscores; shared keys at the top level, the rest under [serve] or "
                        "[agent]); a flag given here wins over the file"
                        + (f"; {what}" if what else ""))


# what serve, agent and stop need once --config is merged (argparse cannot
# require them: they may come from the file): tuples of alternatives
NEEDS = {"serve": (("state",), ("unix", "port")), "agent": (("state",), ("secondary",)),
         "stop": (("state",),)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:       # `check` is read by monitoring: usage errors are UNKNOWN
        if e.code == 2 and next((a for a in argv if not a.startswith("-")), None) == "check":
            raise SystemExit(3)
        raise
    logging.basicConfig(level=logging.DEBUG if args.verbose else
                        logging.INFO if args.cmd in ("agent", "seed") else logging.WARNING,
                        format="prepl: %(message)s")
    try:
        from . import config
        return args.func(config.apply(args, argv, parser, NEEDS))
    except PreplError as e:
        print(f"prepl: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
