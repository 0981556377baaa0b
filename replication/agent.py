"""The replication agent of one link: primary state directory -> secondary.

One cycle (ARCHITECTURE §4):
  1. snappoint: ask the primary's server for snappoint LINK.N (with a
     snapshot) over the control socket; it closes the open interval and
     makes volume and maps durable before we read anything;
  2. transfer: the union of the closed intervals after the link's cursor up
     to LINK.N, restricted by the block maps (replication/chain.py), read
     from snap/LINK.N and written into the secondary's staging export
     stage/PRIMARY/BASE/TARGET; zeroed ranges go as NBD zero requests;
  3. commit: the manifest (replication/manifest.py) written to
     commit/TARGET; its receipt means the interval is applied;
  4. advance: only then the link's cursor moves to LINK.N (recorded by the
     server); the previous cursor's snappoint is deleted (its map merges
     forward, its snapshot is freed).  LINK.N keeps its snapshot until the
     next cycle: snap/LINK.N is the image the replica holds.  A failed cycle drops nothing:
     the next one sends the union from the unchanged cursor.

Initial sync: when the replica has applied nothing, the whole snapshot is
sent, unless both sides were created empty (`init --size`) and the primary
still holds every interval since its creation: then the chain from the
start is the exact difference.
"""
import errno
import json
import logging
import os
import re
import threading
import time

import nbd

from . import control, faults, manifest, pack, transport
from .chain import union_runs, verify_interval
from .errors import (DamagedMapError, InUseError, PreplError, RefusedError, StateError,
                     TimedOutError, UsageError)
from .state import StateDir, lock_exclusive
from .transport import (DEFAULT_MAX_BYTES_IN_FLIGHT, DEFAULT_PEER_TIMEOUT, NbdSource,
                        NbdTarget, TransportError, copy_extents, copy_requests, open_nbd)

log = logging.getLogger(__name__)
PSK_USER = "prepl"     # the username `prepl keygen` writes


def _close(h):
    """Polite disconnect if the peer answers within a moment, else just
    closed (never waits on a silent peer); a connection already gone is fine."""
    transport.close_nbd(h)


class _Hashing:
    """A source that adds each completed data read to the transfer digest
    (the engine's requests are the manifest's pieces: max_request=PIECE)."""

    def __init__(self, src, digest):
        self.src, self.digest = src, digest
        self.handles = src.handles

    def size(self):
        return self.src.size()

    def close(self):
        self.src.close()

    def start_read(self, buf, offset, done):
        def hashed(err):
            if not err:
                self.digest.add(offset, len(buf), False, buf)
            done(err)
        self.src.start_read(buf, offset, hashed)


class _PackHashing(_Hashing):
    """The same for reads of a pack export: a read is one batch's data,
    hashed piece by piece at the pieces' volume offsets."""

    def __init__(self, src, digest, batches):
        super().__init__(src, digest)
        self.entries = {b.stream_offset: b.entries for b in batches}

    def start_read(self, buf, offset, done):
        def hashed(err):
            if not err:
                pos = 0
                for off, n, zero in self.entries[offset]:
                    if not zero:
                        self.digest.add(off, n, False, buf[pos:pos + n])
                        pos += n
            done(err)
        self.src.start_read(buf, offset, hashed)


class _Opening:
    """A connection being opened in a thread, so that handshakes overlap
    (each is a few round trips; libnbd releases the GIL while it waits).
    The joins are bounded: open_fn has a connect timeout."""

    def __init__(self, open_fn):
        self._box = {}

        def run():
            try:
                self._box["h"] = open_fn()
            except BaseException as e:      # noqa: BLE001 (raised by result())
                self._box["e"] = e
        self._thread = threading.Thread(target=run, name="prepl-connect", daemon=True)
        self._thread.start()

    def result(self):
        """The handle (now the caller's), or the opening's exception."""
        self._thread.join()
        if "e" in self._box:
            raise self._box.pop("e")
        return self._box.pop("h")

    def discard(self):
        """Closes the handle unless result() took it."""
        self._thread.join()
        h = self._box.pop("h", None)
        if h is not None:
            _close(h)


class Agent:
    def __init__(self, state, secondary_uri, name="default", primary_uri=None,
                 tls_psk_file=None, max_in_flight=DEFAULT_MAX_BYTES_IN_FLIGHT,
                 peer_timeout=DEFAULT_PEER_TIMEOUT):
        self.sd = StateDir(state)
        self.name = name
        self.secondary_uri = secondary_uri
        self.tls_psk_file = tls_psk_file
        self._primary_uri = primary_uri
        self.max_in_flight = max_in_flight
        # every connect and NBD exchange of a cycle, with either server, fails
        # once nothing has progressed for this long (ARCHITECTURE §6a)
        self.peer_timeout = peer_timeout
        self.n = 0

    # ---- the two servers ------------------------------------------------
    def ctl(self, op, **kw):
        return control.request(self.sd.control_socket, op, **kw)

    def primary_uri(self):
        if self._primary_uri:
            return self._primary_uri
        uri = self.ctl("status").get("uri")
        if not uri:
            raise StateError("the primary's server does not say where it listens; "
                             "give --primary URI")
        return uri

    def secondary(self, export):
        try:
            return open_nbd(self.secondary_uri, export=export, tls_psk_file=self.tls_psk_file,
                            tls_username=PSK_USER if self.tls_psk_file else None,
                            connect_timeout=self.peer_timeout)
        except TransportError as e:
            # a TLS mismatch does not heal by retrying: say so, with the remedy
            if self.tls_psk_file and e.errno != errno.ETIMEDOUT and "tls" in str(e).lower():
                raise RefusedError(f"{e}\nthe TLS handshake failed: the key in "
                                   f"{self.tls_psk_file} is not the secondary's key")
            if not self.tls_psk_file and e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise RefusedError(f"{e}\nthe secondary requires TLS: give --tls-psk FILE "
                                   "(its key) and an nbds:// URI")
            raise

    def replica_info(self):
        h = self.secondary("info")
        try:
            return json.loads(transport.pread(h, h.get_size(), 0, self.peer_timeout)
                              .split(b"\0", 1)[0])
        except TransportError as e:
            raise TransportError(f"reading the replica's info failed: {e}", errno=e.errno)
        finally:
            _close(h)

    # ---- one cycle --------------------------------------------------------
    def cycle(self):
        """Brings the secondary up to a new snappoint; returns the receipt."""
        body = self.sd.read_meta()
        info = self.replica_info()
        self._check_peer(body, info)
        applied = info["applied"]
        base = applied["target"] if applied else None
        # the replica's interval must be this primary's very interval: same
        # number, closed by the same snappoint at the same time (a stale copy
        # of this primary has intervals of the same numbers, not the same ones)
        resync = bool((body["links"].get(self.name) or {}).get("resync"))
        if base and not resync and not any(
                iv["seq"] == base["seq"] and iv["closed_by"] == base.get("name")
                and iv.get("closed_at") == base.get("time") for iv in body["intervals"]):
            raise RefusedError(f"the replica applied interval {base['seq']} "
                               f"({base.get('name')}), which this primary does not hold (a "
                               "stale copy of the primary, or the snappoint was deleted); a "
                               f"full resync is needed: `prepl link resync {self.sd} "
                               f"{self.name}`")
        full = resync or (base is None and not self._can_skip_initial_sync(body, info))
        if resync:
            log.warning("link %s: replicating the whole volume (resync requested)", self.name)
        elif not full:      # before a snappoint is taken for a cycle that cannot work
            for iv in body["intervals"][:-1]:
                if base is None or iv["seq"] > base["seq"]:
                    verify_interval(self.sd, iv)
        self.ctl("link_update", name=self.name,
                 fields={"replica_uuid": info["replica_uuid"], "secondary": self.secondary_uri,
                         "state": "syncing" if full else "transferring"})
        snap_name = f"{self.name}.{body['next_seq']}"
        primary_uri = self.primary_uri()      # asked before the timed part starts
        t0 = time.time()
        phases = {}
        mark = [time.monotonic()]

        def phase(name):
            now = time.monotonic()
            phases[name] = round(now - mark[0], 4)
            mark[0] = now
        self.ctl("snappoint_create", name=snap_name)
        phase("snappoint")
        body = self.sd.read_meta()
        target = next(iv for iv in body["intervals"] if iv["closed_by"] == snap_name)
        # a full sync is one data run over the whole volume
        runs = [(0, body["size"], False)] if full else \
            union_runs(self.sd, body, base["seq"] if base else None, target["seq"])
        phase("plan")
        # the commit's connection is opened while the transfer runs
        commit = _Opening(lambda: self.secondary(f"commit/{target['seq']}"))
        try:
            digest, stats = self._transfer(primary_uri, body, snap_name, base, target, runs,
                                           full)
            phase("transfer")
            phases["transfer_copy"] = round(stats["seconds"], 4)
            receipt = self._commit(manifest.build(body, info["replica_uuid"], base, target,
                                                  snap_name, digest), commit)
        finally:
            commit.discard()
        phase("commit")
        faults.point("agent.after_receipt")
        # advance: only after the receipt
        self.ctl("link_update", name=self.name, fields={
            "cursor": snap_name, "state": "idle", "progress": None, "resync": False,
            "last_cycle": {"snappoint": snap_name, "bytes": digest.data_bytes,
                           "zero_bytes": digest.zero_bytes, "seconds": time.time() - t0,
                           "applied_at": receipt["applied_at"], "full": full,
                           "phases": phases}})
        # LINK.N keeps its snapshot until the next cycle (snap/LINK.N is then
        # the image the replica holds, for checks); the previous cursor goes,
        # and so do snappoints of this link left by cycles that failed
        mine = re.compile(rf"{re.escape(self.name)}\.[0-9]+")   # not link "NAME.x"'s
        stale = [sp["name"] for sp in self.ctl("snappoint_list")
                 if mine.fullmatch(sp["name"]) and sp["name"] != snap_name]
        for name in stale:
            try:
                self.ctl("snappoint_delete", name=name)
            except PreplError as e:          # e.g. another link still needs it
                log.info("kept snappoint %s: %s", name, e)
        log.info("cycle %s applied: %d bytes, %d zeroed, %.3f s", snap_name, digest.data_bytes,
                 digest.zero_bytes, time.time() - t0)
        return receipt

    def _check_peer(self, body, info):
        geometry = {k: body[k] for k in ("size", "region_size", "block_size")}
        theirs = {k: info[k] for k in geometry}
        if theirs != geometry:
            raise RefusedError(f"the secondary's replica has geometry {theirs}, the primary "
                               f"{geometry}; re-create the replica with the primary's geometry")
        if info["bound"] and info["bound"]["primary_uuid"] != body["volume_uuid"]:
            raise RefusedError(f"the secondary's replica {info['replica_uuid']} is bound to "
                               f"another volume ({info['bound']['primary_uuid']})")
        link = body["links"].get(self.name)
        if link and link.get("replica_uuid") not in (None, info["replica_uuid"]):
            raise RefusedError(f"link {self.name!r} replicates to replica "
                               f"{link['replica_uuid']}, but {self.secondary_uri} serves "
                               f"{info['replica_uuid']}")

    @staticmethod
    def _can_skip_initial_sync(body, info):
        # nothing drops an interval's changes (deleting a snappoint merges
        # its interval forward, recovery keeps every map): the chain holds
        # every change since creation, unless a damaged map was merged away
        # (chain_truncated, replication/tracker.py)
        return (body["tracked_since_empty"] and info["tracked_since_empty"]
                and not body.get("chain_truncated"))

    def _transfer(self, primary_uri, body, snap_name, base, target, runs, full):
        """Streams the runs with the AIO engine (replication/transport.py),
        hashing each data piece as its read completes: an initial sync from
        snap/NAME into stage/..., a cycle packed (replication/pack.py) from
        pack/NAME/BASE/FP into batch/..."""
        d = manifest.Digest()
        for off, n, z in runs:
            if z:
                d.add(off, n, True)
        stage = f"{body['volume_uuid']}/{base['seq'] if base else 'none'}/{target['seq']}"
        if full:
            src_export, dst_export, plan = f"snap/{snap_name}", f"stage/{stage}", None
        else:
            plan = pack.batches(runs, batch_bytes=min(pack.BATCH_BYTES, self.max_in_flight))
            src_export = (f"pack/{snap_name}/{base['seq'] if base else 'none'}/"
                          f"{pack.fingerprint(runs)}")
            dst_export = f"batch/{stage}"
        src_h, dst_h = self._connect(primary_uri, src_export, dst_export)
        t0 = time.monotonic()

        def progress(done, total):
            rate = done / max(time.monotonic() - t0, 1e-6)
            eta = (total - done) / max(rate, 1)
            log.info("transfer %s: %.1f%% %d/%d bytes, %.1f MB/s, ETA %.0f s", snap_name,
                     100 * done / max(total, 1), done, total, rate / 1e6, eta)
            try:        # for `prepl status` (percent, bytes, rate, ETA)
                self.ctl("link_update", name=self.name, fields={"progress": {
                    "snappoint": snap_name, "percent": round(100 * done / max(total, 1), 1),
                    "bytes_done": done, "bytes_total": total,
                    "rate_MBps": round(rate / 1e6, 1), "eta_seconds": round(eta, 1)}})
            except PreplError:
                pass
        # no flush: the commit makes the staging durable before it applies
        opts = {"progress": progress, "progress_interval": 2.0, "flush": False,
                "max_bytes_in_flight": self.max_in_flight, "stall_timeout": self.peer_timeout}
        try:
            if plan is None:
                stats = copy_extents(_Hashing(NbdSource(src_h), d), NbdTarget(dst_h), runs,
                                     max_request=manifest.PIECE, **opts)
            else:
                want = sum(b.data_bytes for b in plan)
                if src_h.get_size() != want:
                    raise TransportError(f"{src_export} has {src_h.get_size()} bytes, the "
                                         f"interval's data {want}")
                reqs = [(b.stream_offset, b.data_bytes, False, b.stream_offset,
                         pack.encode_header(b.entries)) for b in plan]
                stats = copy_requests(_PackHashing(NbdSource(src_h), d, plan),
                                      NbdTarget(dst_h), reqs, **opts)
            if not runs:
                transport.flush(dst_h, self.peer_timeout)   # stages an empty interval too
        except nbd.Error as e:
            raise TransportError(f"transfer of {snap_name} failed: {e}")
        finally:
            _close(src_h)
            _close(dst_h)
        return d, stats

    def _connect(self, primary_uri, src_export, dst_export):
        """(source, target) handles, the two handshakes at once."""
        dst = _Opening(lambda: self.secondary(dst_export))
        try:
            src_h = open_nbd(primary_uri, export=src_export, connect_timeout=self.peer_timeout)
        except BaseException:
            dst.discard()
            raise
        try:
            return src_h, dst.result()
        except TransportError as e:
            _close(src_h)
            if e.errno == errno.ENOENT and dst_export.startswith("batch/"):
                raise RefusedError(f"{e}\nthe secondary does not know batch exports: it runs "
                                   "an older prepl; upgrade it") from None
            raise
        except BaseException:
            _close(src_h)
            raise

    def _commit(self, m, opening):
        """Writes manifest m to the commit export, through the connection
        `opening` (an _Opening) or, if that one failed, a new one (commits
        are idempotent: sending the manifest again is safe); returns the
        receipt."""
        self.ctl("link_update", name=self.name, fields={"state": "applying"})
        try:
            h = opening.result()
        except TransportError as e:
            log.info("commit connection failed (%s); opening another", e)
            h = None
        for retry in (h is not None, False):
            if h is None:
                h = self.secondary(f"commit/{m['target']['seq']}")
            try:
                transport.pwrite(h, json.dumps(m, sort_keys=True).encode(), 0, self.peer_timeout)
                transport.flush(h, self.peer_timeout)
                reply = json.loads(transport.pread(h, 65536, 0, self.peer_timeout)
                                   .split(b"\0", 1)[0])
                break
            except TransportError as e:
                if retry:       # the connection opened during the transfer broke since
                    log.info("commit on the early connection failed (%s); again on a "
                             "new one", e)
                    continue
                # the outcome is unknown; the next cycle learns it from the
                # replica's applied interval (commits are idempotent)
                raise TransportError(f"commit of interval {m['target']['seq']} "
                                     f"interrupted: {e}", errno=e.errno)
            finally:
                _close(h)
                h = None
        if not reply.get("ok"):
            raise RefusedError(f"the secondary refused the commit: {reply.get('error')}")
        return reply["receipt"]


def _lock_link(sd, name):
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
    --no-wait, gets the receipt of the first cycle that started after it."""

    def __init__(self, path):
        self.path = path
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
                  args.max_in_flight, args.peer_timeout)
    lock = _lock_link(agent.sd, args.name)  # noqa: F841 (held while we run)
    _renice(args.nice)
    sync = None if args.once else SyncServer(agent.sd.p(f"agent.{args.name}.sock"))
    deadline = time.monotonic() + args.timeout
    delay = 0.5
    next_due = time.monotonic()
    writes_at_cycle = 0
    while True:
        if not args.once:
            while time.monotonic() < next_due and not sync.requested.is_set():
                if (args.max_dirty or args.max_writes) and \
                        _thresholds_reached(agent, args, writes_at_cycle):
                    break
                sync.requested.wait(0.2)
            writes_at_cycle = _load(agent)[1]
        n = sync.begin() if sync else 0
        try:
            receipt = agent.cycle()
            delay = 0.5
            if sync:
                sync.end(n, {"ok": True, "receipt": receipt})
            if args.once:
                print(f"applied {receipt['target']['name']} on replica {receipt['replica_uuid']}"
                      f" ({receipt['bytes']} bytes)")
                return 0
            next_due = time.monotonic() + args.interval
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


def _renice(n):
    """Lowers the agent's CPU priority to niceness n (never raises it: a
    unit file's Nice= above n stays)."""
    cur = os.getpriority(os.PRIO_PROCESS, 0)
    if n > cur:
        os.setpriority(os.PRIO_PROCESS, 0, n)
        log.info("running at niceness %d", n)


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
