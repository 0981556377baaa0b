"""The replication agent of one link: primary state directory -> secondary.
One cycle, as Agent.cycle() reads; the daemon that schedules cycles is
replication/daemon.py.

One cycle (ARCHITECTURE §4):
  1. snappoint: ask the primary's server for snappoint LINK.N (with a
     snapshot) over the control socket; it closes the open interval and
     makes its maps durable before we read anything (the volume's data
     later: replication/durability.py).  Unless the cycle is a full sync
     (or the agent runs with --whole-snapshot), the snapshot is one of
     changes: it holds only the blocks this cycle sends, so a write copies
     its old data only if it overwrites one of them
     (replication/snappoints.py);
  2. transfer: the union of the closed intervals after the link's cursor up
     to LINK.N, restricted by the block maps (replication/chain.py), read
     from snap/LINK.N and written into the secondary's staging export
     stage/PRIMARY/BASE/TARGET; zeroed ranges go as NBD zero requests;
  3. commit: the manifest (replication/manifest.py) written to
     commit/TARGET; its receipt means the interval is applied;
  4. advance: only then the link's cursor moves to LINK.N (recorded by the
     server); the previous cursor's snappoint is deleted (its map merges
     forward).  LINK.N keeps its snapshot until the next cycle's snappoint
     (with --whole-snapshot, snap/LINK.N is then the image the replica
     holds; a snapshot of changes reads only the blocks the cycle sent,
     others fail with EIO).  A failed cycle drops nothing: the next one
     sends the union from the unchanged cursor.

Once the next snappoint is taken, the link's older snappoints become
dataless (ARCHITECTURE §4: their maps stay, their snapshots go): the
transfer reads only the new snapshot, and a write during it copies its old
data into one snapshot, not two.

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

from . import (control, faults, linkroles, manifest, native, pack, resume, roles, seed,
               transport)
from .bwlimit import TokenBucket
from .chain import union_runs, verify_interval
from .errors import PreplError, RefusedError, StateError
from .meta import Receipt, RecordError, ReplicaInfo
from .peers import PSK_USER
from .state import StateDir
from .transport import (DEFAULT_MAX_BYTES_IN_FLIGHT, DEFAULT_PEER_TIMEOUT, NbdSource,
                        NbdTarget, TransportError, copy_extents, copy_requests, open_nbd)

log = logging.getLogger(__name__)


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
    The joins are bounded: open_fn has a connect timeout.  (Also the
    release of a cycle's older snapshots, whose result is None.)"""

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


class _Plan:
    """What a cycle sends: from base (the interval the replica holds, None:
    nothing), in full or as the union of changes, up to snappoint snap_name;
    divergence: a failback's divergence map (bits over blocks), sent too;
    resume: a full transfer resumed into the secondary's staging at an
    existing snappoint (replication/resume.py), whose pieces `held` the
    secondary holds already."""

    def __init__(self, base, full, snap_name, divergence=None, resume=False):
        self.base, self.full, self.snap_name = base, full, snap_name
        self.divergence = divergence
        self.resume = resume
        self.held = []


class _Phases:
    """The seconds of a cycle's phases (last_cycle.phases in the status)."""

    def __init__(self):
        self.t0 = time.time()
        self.phases = {}
        self._mark = time.monotonic()

    def mark(self, name):
        now = time.monotonic()
        self.phases[name] = round(now - self._mark, 4)
        self._mark = now

    def seconds(self):
        return time.time() - self.t0


def _abspath(path):
    return os.path.abspath(path) if path else None


def parse_replica_info(uri, doc):
    """The meta.ReplicaInfo in the info export's bytes doc of the node at
    uri; RefusedError if that node is a primary, or no prepl secondary."""
    try:
        doc = json.loads(doc)
        if isinstance(doc, dict) and doc.get("role") == "primary":
            promoted = doc.get("promoted") or {}
            raise RefusedError(
                f"{uri} is a primary (generation {doc.get('generation')}"
                + (f", promoted by a failover from volume {promoted.get('from_volume_uuid')}"
                   if promoted else "") + "), not a secondary: this link cannot replicate "
                "to it (after a failover the old primary must fail back)")
        return ReplicaInfo.from_json(doc)
    except (ValueError, RecordError) as e:
        raise RefusedError(f"{uri} answers no prepl replica's info ({e}): is it a prepl "
                           "secondary of a compatible version?") from None


class Agent:
    def __init__(self, state, secondary_uri, name="default", primary_uri=None,
                 tls_psk_file=None, max_in_flight=DEFAULT_MAX_BYTES_IN_FLIGHT,
                 peer_timeout=DEFAULT_PEER_TIMEOUT, bwlimit=0, whole_snapshot=False):
        self.sd = StateDir(state)
        self.name = name
        self.secondary_uri = secondary_uri
        self.tls_psk_file = tls_psk_file
        self._primary_uri = primary_uri
        self.max_in_flight = max_in_flight
        # every connect and NBD exchange of a cycle, with either server, fails
        # once nothing has progressed for this long (ARCHITECTURE §6a)
        self.peer_timeout = peer_timeout
        # bytes per second to the secondary (0: unlimited), changed by `prepl link set`
        self.limiter = TokenBucket(bwlimit)
        # False: a cycle's snapshot holds only what the cycle sends (snapshot
        # of changes); True: the whole image, readable as snap/LINK.N
        self.whole_snapshot = whole_snapshot
        self.n = 0

    # ---- the two servers ------------------------------------------------
    def ctl(self, op, **kw):
        return control.request(self.sd.control_socket, op, **kw)

    def _primary_tls(self, uri):
        """A primary served with TLS (a node that may become the target of
        the other's agent listens on TCP with the pair's key) is read with
        the link's key, unless its URI names one."""
        if self.tls_psk_file and uri.startswith("nbds") and "tls-psk-file=" not in uri:
            return {"tls_psk_file": self.tls_psk_file, "tls_username": PSK_USER}
        return {}

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

    def replica_info(self, body=None):
        """What the secondary says of its replica (a meta.ReplicaInfo).  A
        node promoted from this primary supersedes it (replication/
        linkroles.py): RefusedError."""
        h = self.secondary("info")
        try:
            doc = transport.read_document(h, self.peer_timeout)
        except TransportError as e:
            raise TransportError(f"reading the replica's info failed: {e}", errno=e.errno)
        finally:
            _close(h)
        linkroles.check_peer_promoted(self, body or self.sd.read_meta(), doc)
        return parse_replica_info(self.secondary_uri, doc)

    # ---- one cycle (ARCHITECTURE §4) ------------------------------------------
    def cycle(self):
        """Brings the secondary up to a new snappoint; returns the receipt:
        plan what to send, take the snappoint, transfer, commit, advance."""
        body = self.sd.read_meta()
        linkroles.before_cycle(self, body)
        info = self.replica_info(body)
        if body.superseded is not None:
            body = linkroles.reinstate(self, body, info)
        plan = self._plan(body, info)
        self.ctl("link_update", name=self.name,
                 fields={"replica_uuid": info.replica_uuid, "secondary": self.secondary_uri,
                         "tls_psk": _abspath(self.tls_psk_file),
                         "state": "syncing" if plan.full else "transferring"})
        primary_uri = self.primary_uri()      # asked before the timed part starts
        if plan.divergence is not None:       # sent as changes of this cycle's interval
            starts, lengths = native.bm_runs(plan.divergence, linkroles.nblocks(body))
            self.ctl("mark_changed", runs=[[s, n] for s, n in zip(starts.tolist(),
                                                                  lengths.tolist())])
        clock = _Phases()
        body, target = self._snappoint(plan)
        clock.mark("snappoint")
        # the older snapshots are released while the cycle goes on (they are
        # not read by it), and the commit's connection opened meanwhile
        released = _Opening(lambda: self._release_older(plan.snap_name))
        commit = None
        try:
            runs = self._runs(body, plan, target)
            clock.mark("plan")
            commit = _Opening(lambda: self.secondary(f"commit/{target.seq}"))
            digest, stats = self._transfer(primary_uri, body, plan, target, runs)
            clock.mark("transfer")
            clock.phases["transfer_copy"] = round(stats["seconds"], 4)
            released.result()
            receipt = self._commit(manifest.build(body, info.replica_uuid, plan.base, target,
                                                  digest), commit)
        finally:
            released.discard()
            if commit is not None:
                commit.discard()
        clock.mark("commit")
        faults.point("agent.after_receipt")
        self._advance(plan, digest, receipt, clock)
        return receipt

    def _plan(self, body, info):
        """What this cycle sends (before anything is taken): the base is the
        interval the replica applied, which must be this very primary's; a
        full sync when nothing was applied (unless both sides were tracked
        since empty) or a resync was asked for; the closed maps the union
        needs are verified first."""
        self._check_peer(body, info)
        base = info.applied.target if info.applied else None
        link = body.links.get(self.name)
        resync = bool(link and link.resync)
        # the replica's interval must be this primary's very interval: same
        # number, closed by the same snappoint at the same time (a stale copy
        # of this primary has intervals of the same numbers, not the same ones)
        if base and not resync and not any(iv.ref() == base for iv in body.intervals):
            if info.applied.seed:
                raise RefusedError(f"the replica was seeded from snappoint "
                                   f"{info.applied.seed} (interval {base.seq}), which this "
                                   "primary no longer holds: export a new seed (`prepl seed "
                                   f"export {self.sd} FILE`) and import it, or resync "
                                   f"(`prepl link resync {self.sd} {self.name}`)")
            raise RefusedError(f"the replica applied interval {base.seq} "
                               f"({base.name}), which this primary does not hold (a "
                               "stale copy of the primary, or the snappoint was deleted); a "
                               f"full resync is needed: `prepl link resync {self.sd} "
                               f"{self.name}`")
        full = resync or (base is None and not self._can_skip_initial_sync(body, info))
        divergence = None if full or info.failback is None else \
            linkroles.divergence(self, body, info)
        if resync:
            log.warning("link %s: replicating the whole volume (resync requested)", self.name)
        elif not full:      # before a snappoint is taken for a cycle that cannot work
            for iv in body.closed_intervals:
                if base is None or iv.seq > base.seq:
                    verify_interval(self.sd, iv)
        again = resume.resumable(self.name, body, info, base) if full else None
        return _Plan(base, full, again or f"{self.name}.{body.next_seq}", divergence,
                     resume=again is not None)

    def _snappoint(self, plan):
        """Step 1: the snappoint closes the interval (the server makes it
        durable before it answers; a resumed transfer has its snappoint);
        returns the metadata and its interval."""
        if not plan.resume:
            scope = {} if plan.full or self.whole_snapshot else \
                {"changes_after": plan.base.seq if plan.base else -1}
            self.ctl("snappoint_create", name=plan.snap_name, **scope)
        body = self.sd.read_meta()
        return body, body.closed_by(plan.snap_name)

    def _release_older(self, current):
        """This link's snappoints other than current lose their snapshots
        (the cursor's included: the transfer needs only its map)."""
        for sp in self.ctl("snappoint_list"):
            if sp["snapshot"] == "valid" and sp["name"] != current and self._mine(sp["name"]):
                try:
                    self.ctl("snappoint_convert", name=sp["name"])
                except PreplError as e:
                    log.info("kept the snapshot of snappoint %s: %s", sp["name"], e)

    def _mine(self, name):
        """A snappoint of this link's cycles (not link "NAME.x"'s)."""
        return re.fullmatch(rf"{re.escape(self.name)}\.[0-9]+", name) is not None

    def _runs(self, body, plan, target):
        """Step 2's set: the union of the change maps since the base (a full
        sync is one data run over the whole volume)."""
        if plan.resume:
            runs, plan.held = resume.runs_to_send(self, body, plan.base, plan.snap_name, target)
            return runs
        if plan.full:
            return [(0, body.size, False)]
        return union_runs(self.sd, body, plan.base.seq if plan.base else None, target.seq)

    def _advance(self, plan, digest, receipt, clock):
        """Step 4, only after the receipt: the link's cursor moves; LINK.N
        keeps its snapshot until the next cycle's snappoint (snap/LINK.N is
        then the image the replica holds, for checks); the previous cursor
        goes, and so do snappoints of this link left by cycles that failed."""
        self.ctl("link_update", name=self.name, fields={
            "cursor": plan.snap_name, "state": "idle", "progress": None, "resync": False,
            "last_cycle": {"snappoint": plan.snap_name, "bytes": digest.data_bytes,
                           "zero_bytes": digest.zero_bytes, "seconds": clock.seconds(),
                           "applied_at": receipt.applied_at, "full": plan.full,
                           "phases": clock.phases}})
        stale = [sp["name"] for sp in self.ctl("snappoint_list")
                 if self._mine(sp["name"]) and sp["name"] != plan.snap_name
                 # a failback's start, once the failback applied
                 or (plan.divergence is not None and sp["name"] == roles.FAILBACK)]
        for name in stale:
            try:
                self.ctl("snappoint_delete", name=name)
            except PreplError as e:          # e.g. another link still needs it
                log.info("kept snappoint %s: %s", name, e)
        seed.release(self, plan.base)
        log.info("cycle %s applied: %d bytes, %d zeroed, %.3f s", plan.snap_name,
                 digest.data_bytes, digest.zero_bytes, clock.seconds())

    def _check_peer(self, body, info):
        if info.geometry() != body.geometry():
            names = ("size", "region_size", "block_size")
            raise RefusedError(f"the secondary's replica has geometry "
                               f"{dict(zip(names, info.geometry()))}, the primary "
                               f"{dict(zip(names, body.geometry()))}; re-create the replica "
                               "with the primary's geometry")
        if info.bound and info.bound.primary_uuid != body.volume_uuid:
            raise RefusedError(f"the secondary's replica {info.replica_uuid} is bound to "
                               f"another volume ({info.bound.primary_uuid})")
        link = body.links.get(self.name)
        if link and link.replica_uuid not in (None, info.replica_uuid):
            raise RefusedError(f"link {self.name!r} replicates to replica "
                               f"{link.replica_uuid}, but {self.secondary_uri} serves "
                               f"{info.replica_uuid}")

    @staticmethod
    def _can_skip_initial_sync(body, info):
        # nothing drops an interval's changes (deleting a snappoint merges
        # its interval forward, recovery keeps every map): the chain holds
        # every change since creation, unless a damaged map was merged away
        # (chain_truncated, replication/tracker.py)
        return body.tracked_since_empty and info.tracked_since_empty \
            and not body.chain_truncated

    def _transfer(self, primary_uri, body, plan, target, runs):
        """Streams the runs with the AIO engine (replication/transport.py),
        hashing each data piece as its read completes: an initial sync from
        snap/NAME into stage/... (the pieces the secondary holds, of a
        resumed one, hashed from snap/NAME too), a cycle packed
        (replication/pack.py) from pack/NAME/BASE/FP into batch/..."""
        snap_name, base, full, kept = plan.snap_name, plan.base, plan.full, plan.held
        d = manifest.Digest()
        for off, n, z in runs:
            if z:
                d.add(off, n, True)
        base_key = manifest.base_key(base)
        stage = f"{body.volume_uuid}/{base_key}/{target.seq}"
        if full:
            src_export, dst_export, batches = f"snap/{snap_name}", f"stage/{stage}", None
        else:
            batches = pack.batches(runs, batch_bytes=min(pack.BATCH_BYTES, self.max_in_flight))
            src_export = f"pack/{snap_name}/{base_key}/{pack.fingerprint(runs)}"
            dst_export = f"batch/{stage}"
        src_h, dst_h = self._connect(primary_uri, src_export, dst_export)
        t0 = time.monotonic()

        held = sum(n for _, n in kept)

        def progress(done, total):
            rate = done / max(time.monotonic() - t0, 1e-6)
            eta = (total - done) / max(rate, 1)
            percent = 100 * (held + done) / max(held + total, 1)
            log.info("transfer %s: %.1f%% %d/%d bytes, %.1f MB/s, ETA %.0f s", snap_name,
                     percent, done, total, rate / 1e6, eta)
            try:        # for `prepl status` (percent, bytes, rate, ETA)
                self.ctl("link_update", name=self.name, fields={"progress": {
                    "snappoint": snap_name, "percent": round(percent, 1),
                    "bytes_done": done, "bytes_total": total, "held_bytes": held,
                    "rate_MBps": round(rate / 1e6, 1), "eta_seconds": round(eta, 1)}})
            except PreplError:
                pass
        # no flush: the commit makes the staging durable before it applies
        opts = {"progress": progress, "progress_interval": 2.0, "flush": False,
                "max_bytes_in_flight": self.max_in_flight, "stall_timeout": self.peer_timeout,
                "limiter": self.limiter}
        try:
            if batches is None:
                stats = copy_extents(_Hashing(NbdSource(src_h), d), NbdTarget(dst_h), runs,
                                     max_request=manifest.PIECE, **opts)
                resume.hash_held(src_h, kept, d, self.peer_timeout)
            else:
                want = sum(b.data_bytes for b in batches)
                if src_h.get_size() != want:
                    raise TransportError(f"{src_export} has {src_h.get_size()} bytes, the "
                                         f"interval's data {want}")
                reqs = [(b.stream_offset, b.data_bytes, False, b.stream_offset,
                         pack.encode_header(b.entries)) for b in batches]
                stats = copy_requests(_PackHashing(NbdSource(src_h), d, batches),
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
            src_h = open_nbd(primary_uri, export=src_export, connect_timeout=self.peer_timeout,
                             **self._primary_tls(primary_uri))
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
                h = self.secondary(f"commit/{m.target.seq}")
            try:
                transport.pwrite(h, json.dumps(m.to_json(), sort_keys=True).encode(), 0,
                                 self.peer_timeout)
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
                raise TransportError(f"commit of interval {m.target.seq} "
                                     f"interrupted: {e}", errno=e.errno)
            finally:
                _close(h)
                h = None
        if not reply.get("ok"):
            raise RefusedError(f"the secondary refused the commit: {reply.get('error')}")
        try:
            return Receipt.from_json(reply.get("receipt"))
        except RecordError as e:
            raise RefusedError(f"the secondary's receipt is malformed ({e})") from None
