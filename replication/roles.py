"""Role changes of a node (ARCHITECTURE §4a): failover, supersession,
failback.

What it owns: the metadata transitions of a node's role.
What it promises:

* Failover is one durable record.  In it the replica becomes the volume;
  the last interval it applied becomes the divergence point, recorded with
  the old primary's volume UUID (Promotion); a dataless snappoint
  "failback" closes the open interval at that instant, so every write from
  then on lands in the intervals after it (the failback map); the
  generation goes up; an incomplete staging is gone.
* Before the record nothing has changed: a failure (ENOSPC, EIO, a crash)
  leaves a secondary that a second `prepl failover` promotes.  After it the
  node is a primary, whatever happens next (a crash before it serves: its
  next start serves it as one).
* Refused (RefusedError, exit 5): a node that is not a secondary, and a
  replica that never applied an interval (it is no image of anything).
* A superseded primary knows it: when its agent or `prepl serve`'s probe
  finds a link's secondary promoted from this volume, one durable record
  (Supersession) says so, and only then export "" refuses writes (EROFS,
  new connections read-only) until a failback, or `serve --force`.
* Failback turns a primary into the secondary of the node it diverged
  from (the old primary under the node promoted from it; or, with
  --discard-my-data, the promoted node under the old primary).  Its writes
  after the divergence point become the divergence map (a bit per block:
  every interval after that point, the open one, activity-log extents
  marked by a recovery), written and made durable before the one record
  that demotes it.  That record binds the replica to the peer and makes
  the peer's interval at the divergence its applied base, with the map
  pending (Failback): the peer's first cycle must overwrite every block in
  it, and the replica stays its own old image until that cycle applies.
* Split brain (both sides wrote after the failover): failback refuses
  unless --discard-my-data names this node the loser (the rule is in
  replication/divergence.py).
* A migration's fence: export "" refuses writes, in memory only, once no
  write is in flight.
What it asks of the other node is in replication/peers.py.
"""
import logging
import time

from . import divergence, faults, peers
from .chain import create_interval_files, geometry, new_interval, remove_files
from .errors import RefusedError
from .maps import KINDS, MapFile, file_digest
from .meta import Applied, Binding, Failback, Promotion, Supersession

log = logging.getLogger(__name__)

FAILBACK = "failback"       # the snappoint that opens the failback map
PROBE_TIMEOUT = 3.0         # seconds a server's start waits for a link's peer
QUIET = 0.1                 # seconds without a write that a migration waits for


def failover(replica, planned=None):
    """Promotes the secondary served by Replica `replica` (its server keeps
    running; the caller then serves it as a primary).  planned: (primary
    volume UUID, IntervalRef) of a migration, which the replica's binding
    and last applied interval must be.  Returns the new metadata body and
    the seconds it waited for a merge (None: none was running)."""
    r = replica
    with r.lock:
        t0 = time.monotonic()
        waited = time.monotonic() - t0 if r.quiesce() else None
        if waited is not None:
            log.info("failover: waited %.3f s for the merge of the last applied interval",
                     waited)
        old = r.body
        if planned is not None and old.role == "secondary" and (
                old.bound is None or old.applied is None
                or (old.bound.primary_uuid, old.applied.target) != planned):
            raise RefusedError(f"a migration from {planned[0]} at interval {planned[1].seq} "
                               f"asks to promote {r.sd}, but its replica holds "
                               f"{old.applied.target.seq if old.applied else 'nothing'} of "
                               f"{old.bound.primary_uuid if old.bound else 'no primary'}; "
                               "nothing was changed")
        if old.role != "secondary":
            raise RefusedError(f"{r.sd} is a {old.role}, not a secondary: nothing to fail "
                               "over")
        if old.failback is not None:
            raise RefusedError(f"{r.sd} is failing back onto {old.bound.primary_uuid}: its "
                               "replica holds its own writes until the first interval "
                               "applies, no image of any primary; let the new primary's "
                               "agent finish the failback first")
        if old.applied is None or old.bound is None:
            raise RefusedError(f"the replica of {r.sd} never applied an interval: it is no "
                               "image of any primary, so it cannot take over (replicate to "
                               "it first)")
        new = r.md.draft()
        now = time.time()
        # nothing wrote through the open maps (a secondary does not track);
        # their digests make the interval an ordinary closed one
        maps = new.open_interval.maps
        new.close_interval(FAILBACK, now, {k: file_digest(r.sd.p("maps", maps[k]))
                                           for k in KINDS})
        opened = new_interval(new.next_seq, new.take_file_id())
        paths = [r.sd.p("maps", f) for f in opened.maps.values()]
        try:
            remove_files(paths)     # left by an attempt whose record was never written
            create_interval_files(r.sd, new, opened.maps)
            new.append_interval(opened)
            new.role = "primary"
            new.generation += 1
            new.promoted = Promotion(old.bound.primary_uuid, old.applied.target, now,
                                     new.generation, planned=planned is not None)
            new.tracked_since_empty = False     # its chain starts here, not at creation
            new.staging = None
            new.clean = True                    # the tracker's start records it serving
            faults.point("secondary.failover.before_record")
            r.md.commit(new)
        except BaseException:
            remove_files(paths)
            raise
    log.warning("failover: %s is a primary now (generation %d), promoted from a replica of "
                "%s at interval %d (%s)", r.sd, new.generation, old.bound.primary_uuid,
                old.applied.target.seq, old.applied.target.name)
    return new, waited


def supersede(t, info, uri, learned_by, link=None):
    """Tracker t learned that info (a PrimaryInfo, at uri) was promoted
    from its volume: recorded durably, then export "" is fenced (unless the
    server runs with --force).  Returns the Supersession."""
    with t.lock:
        t.check_open()
        b = t.body
        if not peers.promoted_from(b, info):
            raise RefusedError(f"{uri} is no node promoted from volume {b.volume_uuid}; "
                               "nothing was changed")
        s = b.superseded
        if s is None or (s.by_volume_uuid, s.generation) != (info.volume_uuid,
                                                             info.generation):
            with t.md.change() as new:
                new.superseded = Supersession(info.volume_uuid, uri, info.generation,
                                              info.promoted.at, info.promoted.divergence,
                                              time.time(), learned_by, link)
            log.error("%s is superseded (learned by %s): %s", t.sd, learned_by,
                      t.superseded_remedy())
        if not t.force:
            t.fence()
        return t.body.superseded


def reinstate(t, info, uri):
    """Tracker t was superseded by the node whose replica info (a
    ReplicaInfo, at uri) says it failed back onto this volume (the promoted
    node took --discard-my-data): recorded, then writes are accepted again."""
    with t.lock:
        t.check_open()
        s = t.body.superseded
        if s is None:
            return None
        if not (info.replica_uuid == s.by_volume_uuid and info.failback is not None
                and info.bound and info.bound.primary_uuid == t.body.volume_uuid):
            raise RefusedError(f"{uri} is not the node that superseded {t.sd} failing back "
                               "onto it; nothing was changed")
        with t.md.change() as new:
            new.superseded = None
        if not t.force:
            t.unfence()
    log.warning("%s is the primary again: %s failed back onto it", t.sd, s.by_volume_uuid)
    return s


def fence_when_quiet(t, wait_quiet):
    """A migration's fence: waits up to wait_quiet seconds for a moment with
    no write in flight (the count of writes unchanged over QUIET seconds),
    then export "" refuses writes (in memory: a restart serves it again).
    Returns the count of writes; RefusedError if writes keep coming."""
    deadline = time.monotonic() + wait_quiet
    while True:
        with t.lock:
            t.check_open()
            if t.body.superseded is not None:
                raise RefusedError(f"{t.sd} is superseded: it cannot migrate")
            n = t.vol.writes_total
            if t.vol.writers == 0:
                time.sleep(QUIET)
                if t.vol.writes_total == n and t.vol.writers == 0:
                    t.fence()
                    return t.vol.writes_total
        if time.monotonic() > deadline:
            raise RefusedError(f"writes kept coming to {t.sd} for {wait_quiet:g} s: stop the "
                               "applications (or unmount the filesystem) first, or give a "
                               "longer --wait-quiet; nothing was changed")
        time.sleep(QUIET)


def probe_links(t, timeout=PROBE_TIMEOUT):
    """Before a primary serves: asks each link's secondary what it is; one
    promoted from this volume supersedes it.  A peer that does not answer
    within timeout seconds is skipped (logged): it does not block the start."""
    for name, link in sorted(t.body.links.items()):
        if not link.secondary:
            continue
        doc, why = peers.probe(link.secondary, link.tls_psk, timeout)
        if doc is None:
            log.warning("link %s: could not ask %s what it is (%s); serving anyway", name,
                        link.secondary, why)
            continue
        info = peers.primary_info(doc)
        if info is not None and peers.promoted_from(t.body, info):
            supersede(t, info, link.secondary, "probe", name)


# ---- failback ----------------------------------------------------------------

def _sides(body, peer):
    """(my divergence point, the peer's base, am I the promoted node) for
    this node's body and the peer's PrimaryInfo; RefusedError if the two
    did not diverge from each other."""
    if peers.promoted_from(body, peer):
        if peer.failback_base is None:
            raise RefusedError(f"the promoted node {peer.volume_uuid} no longer holds its "
                               f"{FAILBACK!r} snappoint (the start of its changes since the "
                               "failover); nothing was changed")
        return peer.promoted.divergence, peer.failback_base, False
    p = body.promoted
    if p is not None and p.from_volume_uuid == peer.volume_uuid:
        iv = body.closed_by(FAILBACK)
        if peer.role != "primary":
            raise RefusedError(f"the old primary {peer.volume_uuid} is a {peer.role} now: "
                               "nothing to fail back onto; nothing was changed")
        return (iv.ref() if iv else None), p.divergence, True
    if peer.role != "primary":
        raise RefusedError(f"the peer is a {peer.role}, not the primary to fail back onto; "
                           "nothing was changed")
    raise RefusedError(f"the peer {peer.volume_uuid} was never promoted from this volume "
                       f"{body.volume_uuid}, nor this node from it: no failback between them "
                       "(wrong --peer?); nothing was changed")


def failback(t, peer, uri, discard=False, migrating=False):
    """Tracker t's node becomes the secondary of peer (a PrimaryInfo at
    uri); returns (the new body, the report).  Writes are fenced first (the
    divergence map is then final); a refusal unfences them."""
    with t.lock:
        t.check_open()
        b = t.body
        if peer.geometry() != b.geometry():
            raise RefusedError(f"the peer's volume has geometry {peer.geometry()}, this one "
                               f"{b.geometry()}: no failback between them; nothing was changed")
        mine, base, promoted = _sides(b, peer)
        if not promoted:
            # the peer took over from this volume: that is recorded first,
            # so that no failure below lets this node accept writes again
            supersede(t, peer, uri, "failback")
        t.fence()
        try:
            # the record below says this node holds the divergence point's
            # image: its volume durable first, as no snappoint made it so
            # (replication/durability.py)
            t.vol.flush()
            bits, whole = divergence.written_after(t, mine)
            report = divergence.report(t, bits, whole, mine, peer, promoted)
            if migrating:
                # writes were fenced before the final interval closed: what
                # follows it is at most what a recovery counted as changed
                # after a crash of this node, resent by the first cycle
                if promoted or not peer.promoted.planned:
                    raise RefusedError(f"{uri} was not promoted by a migration from this node "
                                       "(fail back instead); nothing was changed")
                report["split_brain"] = False
            if report["split_brain"] and not discard:
                raise RefusedError(divergence.split_brain_message(t, report, uri))
            body = _demote(t, peer, base, bits, report)
        except BaseException:
            if not t.fenced:
                t.unfence()
            raise
    log.warning("failback: %s is the secondary of %s at %s now; %d bytes of its own writes "
                "after the divergence point will be overwritten by the first cycle", t.sd,
                peer.volume_uuid, uri, report["bytes"])
    return body, report


def _demote(t, peer, base, bits, report):
    """The divergence map written and durable, then one record: this node
    is the peer's secondary with a pending failback.  The old chain's files
    go after the record (a crash in between leaves files nobody names)."""
    b = t.body
    new = t.md.draft()
    fid = new.take_file_id()
    name = f"divergence-{fid}.map"
    opened = new_interval(0, new.take_file_id())
    created = [t.sd.p("maps", name)] + [t.sd.p("maps", f) for f in opened.maps.values()]
    try:
        remove_files(created)       # left by an attempt whose record was never written
        m = MapFile(created[0], geometry(b)[1], create=True)
        m.bits[:] = bits
        m.sync()
        create_interval_files(t.sd, new, opened.maps)
        now = time.time()
        new.role = "secondary"
        new.generation = max(b.generation, peer.generation)
        new.intervals, new.snappoints, new.links = [opened], [], {}
        new.next_seq = 1
        new.bound = Binding(peer.volume_uuid, now, *b.geometry())
        new.applied = Applied(base, None, now)
        new.failback = Failback(base, name, m.digest(), report["blocks"], now, report) \
            if report["blocks"] else None     # nothing diverged (a migration)
        new.receipts, new.staging = [], None
        new.promoted = new.superseded = None
        new.tracked_since_empty, new.chain_truncated = False, False
        new.clean = True
        faults.point("primary.failback.before_record")
        t.md.commit(new)
    except BaseException:
        remove_files(created)
        raise
    return new
