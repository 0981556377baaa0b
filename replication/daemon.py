"""The agent as a daemon (`prepl agent`): one link, its schedule and its
sync socket.

What it owns: the link's lock (STATE/agent.NAME.lock, one agent per link),
its sync socket (STATE/agent.NAME.sock, mode 0600) and the schedule.  What
it promises: a cycle (replication/agent.py) runs every --interval seconds,
as soon as the open interval holds --max-dirty bytes, after --max-writes
writes, or when `prepl sync` asks; a failed cycle is retried with backoff
(0.5 s .. 30 s) and drops nothing; --once makes one cycle and exits (exit 6
after --timeout); a refused cycle (wrong peer, would lose data) stops it
with exit 5, never in a restart loop.
"""
import json
import logging
import os
import threading
import time

from . import control, notify
from .agent import Agent
from .errors import (DamagedMapError, InUseError, LinkPausedError, PreplError, RefusedError,
                     TimedOutError, UsageError)
from .state import StateDir, lock_exclusive
from .transport import TransportError

log = logging.getLogger(__name__)


def lock_link(sd, name):
    """One agent per link: an flock on STATE/agent.NAME.lock, held for life."""
    f = os.fdopen(os.open(sd.p(f"agent.{name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o600), "r+")
    try:
        lock_exclusive(f)
    except BlockingIOError:
        holder = f.read().strip() or "unknown"
        f.close()
        raise InUseError(f"another agent (pid {holder}) runs link {name!r} of {sd}; "
                         "stop it first")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class SyncServer:
    """STATE/agent.NAME.sock (0600): `prepl sync` asks for a cycle and, unless
    --no-wait, gets the receipt of the first cycle that started after it;
    `prepl link set` changes a setting of the running agent (op "set",
    answered by on_set(request) -> reply)."""

    def __init__(self, path, on_set=None):
        self.path = path
        self.on_set = on_set
        self.cond = threading.Condition()
        self.requested = threading.Event()
        self.started = 0          # cycles started
        self.results = {}         # cycle number -> receipt or error text
        self.sock = control.listen_private(path)   # we hold the link's lock
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn, conn.makefile("rwb") as f:
            req = json.loads(f.readline() or b"{}")
            if req.get("op") == "set":
                f.write(json.dumps(self.on_set(req)).encode() + b"\n")
                f.flush()
                return
            with self.cond:
                want = self.started + 1
                self.requested.set()
                if req.get("wait", True):
                    while want not in self.results:
                        self.cond.wait()
                    reply = self.results[want]
                else:
                    reply = {"ok": True, "queued": True}
            f.write(json.dumps(reply).encode() + b"\n")
            f.flush()

    def begin(self):
        with self.cond:
            self.started += 1
            self.requested.clear()
            return self.started

    def end(self, n, reply):
        with self.cond:
            self.results[n] = reply
            self.cond.notify_all()


def run(args):
    """`prepl agent`: --once, or cycles on the schedule: every --interval
    seconds, when the open interval holds --max-dirty bytes, after
    --max-writes writes, or on `prepl sync`.  A failed cycle is retried with backoff (0.5 s .. 30 s)."""
    if args.max_in_flight < 4096:
        raise UsageError(f"--max-in-flight {args.max_in_flight} is too small: at least 4K")
    if not args.peer_timeout > 0:
        raise UsageError(f"--peer-timeout {args.peer_timeout} must be more than 0 seconds")
    agent = Agent(args.state, args.secondary, args.name, args.primary, args.tls_psk,
                  args.max_in_flight, args.peer_timeout, args.bwlimit, args.whole_snapshot)
    agent.link_lock = lock_link(agent.sd, args.name)    # held while we run
    _renice(args.nice)
    sync = None if args.once else SyncServer(agent.sd.p(f"agent.{args.name}.sock"),
                                             lambda req: _set(agent, req))
    if sync:
        notify.send("READY=1", f"STATUS=link {args.name}: replicating {args.state} to "
                    f"{args.secondary}")
    deadline = time.monotonic() + args.timeout
    delay = 0.5
    next_due = time.monotonic()
    writes_at_cycle = 0
    while True:
        if not args.once:
            reached = (lambda: _thresholds_reached(agent, args, writes_at_cycle)) \
                if args.max_dirty or args.max_writes else None
            wait_due(next_due, sync.requested, reached)
            writes_at_cycle = _load(agent)[1]
        n = sync.begin() if sync else 0
        started = time.monotonic()
        try:
            receipt = agent.cycle()
            delay = 0.5
            if sync:
                sync.end(n, {"ok": True, "receipt": receipt.to_json()})
            if args.once:
                print(applied_message(receipt))
                return 0
            # every --interval seconds from start to start (a cycle longer
            # than that is followed at once): the RPO stays under about the
            # interval plus one cycle's time
            next_due = started + args.interval
        except LinkPausedError as e:
            if sync:
                sync.end(n, {"ok": False, "error": str(e), "code": e.code})
            if args.once:
                raise
            _wait_resumed(agent, e)
            next_due = time.monotonic()
        except (RefusedError, DamagedMapError) as e:
            if sync:
                sync.end(n, {"ok": False, "error": str(e), "code": e.code})
            if args.once or isinstance(e, RefusedError):
                raise
            # a damaged map needs the operator (prepl link resync): keep asking
            log.error("cycle failed: %s; retrying in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30)
            next_due = time.monotonic()
        except (TransportError, PreplError, OSError) as e:
            if sync:
                sync.end(n, {"ok": False, "error": str(e), "code": "failed"})
            try:
                agent.ctl("link_update", name=args.name,
                          fields={"state": "disconnected" if isinstance(e, TransportError)
                                  else "failing"})
            except PreplError:
                pass
            if args.once and time.monotonic() + delay > deadline:
                raise TimedOutError(f"timed out after {args.timeout} s; last error: {e}")
            log.warning("cycle failed (%s); retrying in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30)
            next_due = time.monotonic()


POLL_SECONDS = 0.2      # how often the thresholds are asked for while waiting


def wait_due(next_due, requested, reached=None, clock=time.monotonic):
    """Waits until the time.monotonic() instant next_due, until the Event
    requested is set, or until reached() (thresholds, asked every
    POLL_SECONDS) is true.  Never sleeps past next_due: a cycle starts on
    its due time, not at the next poll after it (which added up to
    POLL_SECONDS to every interval, and to the RPO)."""
    while not requested.is_set():
        left = next_due - clock()
        if left <= 0 or (reached is not None and reached()):
            return
        requested.wait(min(POLL_SECONDS, left))


def _renice(n):
    """Lowers the agent's CPU priority to niceness n (never raises it: a
    unit file's Nice= above n stays)."""
    cur = os.getpriority(os.PRIO_PROCESS, 0)
    if n > cur:
        os.setpriority(os.PRIO_PROCESS, 0, n)
        log.info("running at niceness %d", n)


def _wait_resumed(agent, why, poll=1.0):
    """A paused link: the daemon stays up and waits for `prepl link resume`."""
    log.warning("%s; waiting", why)
    while True:
        link = agent.sd.read_meta().links.get(agent.name)
        if link is None or not link.paused:
            log.warning("link %s resumed", agent.name)
            return
        time.sleep(poll)


def _set(agent, req):
    """`prepl link set` on the running agent: {"bwlimit": bytes per second}."""
    rate = req.get("bwlimit")
    try:
        agent.limiter.set_rate(rate)
    except ValueError as e:
        return {"ok": False, "error": str(e), "code": "refused"}
    log.warning("link %s: bandwidth limit %s", agent.name,
                f"{rate} bytes/s" if rate else "none (unlimited)")
    return {"ok": True, "bwlimit": rate}


def request_set(state, name, **settings):
    """`prepl link set`: changes settings of the running agent of link name."""
    sd = StateDir(state)
    reply = control.exchange(
        sd.p(f"agent.{name}.sock"), {"op": "set", **settings}, 10,
        f"no agent is running for link {name!r} of {sd}: give the setting to the agent when "
        "it starts (`prepl agent ... --bwlimit RATE`)") or {}
    if not reply.get("ok"):
        raise RefusedError(f"the agent refused: {reply.get('error')}")
    return reply


def _load(agent):
    """(bytes changed in the open interval, writes served so far)."""
    try:
        st = agent.ctl("status")
    except PreplError:
        return 0, 0
    return st["open_interval"]["changed_blocks"] * st["block_size"], st["writes_total"]


def _thresholds_reached(agent, args, writes_at_cycle):
    dirty, writes = _load(agent)
    if writes < writes_at_cycle:       # the server restarted: its counter too
        writes_at_cycle = 0
    return bool((args.max_dirty and dirty >= args.max_dirty) or
                (args.max_writes and writes - writes_at_cycle >= args.max_writes))


def applied_message(receipt):
    """What `agent --once` and `sync` print of a cycle's meta.Receipt."""
    return (f"applied {receipt.target.name} on replica {receipt.replica_uuid} "
            f"({receipt.bytes} bytes)")


def request_sync(state, name, wait=True, timeout=None):
    """`prepl sync`: asks the running agent of link `name` for a cycle."""
    sd = StateDir(state)
    reply = control.exchange(
        sd.p(f"agent.{name}.sock"), {"op": "sync", "wait": wait}, timeout,
        f"no agent is running for link {name!r} of {sd} "
        f"(start one with `prepl agent {sd} --secondary URI --name {name}`)") or {}
    if not reply.get("ok"):
        raise (RefusedError if reply.get("code") == "refused" else PreplError)(
            f"the cycle failed: {reply.get('error')}")
    return reply
