"""Role changes of a node (ARCHITECTURE §4a): failover, supersession.

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
"""
import logging
import time

from . import faults
from .chain import create_interval_files, new_interval, remove_files
from .errors import RefusedError
from .maps import KINDS, file_digest
from .meta import PrimaryInfo, Promotion, RecordError, Supersession

log = logging.getLogger(__name__)

FAILBACK = "failback"       # the snappoint that opens the failback map
PROBE_TIMEOUT = 3.0         # seconds a server's start waits for a link's peer


def failover(replica):
    """Promotes the secondary served by Replica `replica` (its server keeps
    running; the caller then serves it as a primary).  Returns the new
    metadata body."""
    r = replica
    with r.lock:
        r.quiesce()
        old = r.body
        if old.role != "secondary":
            raise RefusedError(f"{r.sd} is a {old.role}, not a secondary: nothing to fail "
                               "over")
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
            create_interval_files(r.sd, new, opened)
            new.append_interval(opened)
            new.role = "primary"
            new.generation += 1
            new.promoted = Promotion(old.bound.primary_uuid, old.applied.target, now,
                                     new.generation)
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
    return new


def probe(uri, tls_psk_file=None, timeout=5.0):
    """What the node at NBD address uri says of itself (its export "info",
    a JSON object), or (None, why) if it cannot be reached within timeout
    seconds (nothing answers, or it serves no such export)."""
    import json

    import nbd

    from . import transport
    from .agent import PSK_USER
    from .transport import TransportError
    try:
        h = transport.open_nbd(uri, export="info", tls_psk_file=tls_psk_file,
                               tls_username=PSK_USER if tls_psk_file else None,
                               connect_timeout=timeout)
    except (TransportError, nbd.Error, OSError) as e:
        return None, str(e)
    try:
        doc = transport.read_document(h, timeout)
        return json.loads(doc), None
    except (TransportError, nbd.Error, ValueError) as e:
        return None, f"its info export could not be read: {e}"
    finally:
        transport.close_nbd(h)


def promoted_from(body, info):
    """Whether info (a PrimaryInfo) is a node promoted by a failover from
    the volume of body (a Body)."""
    return (info.role == "primary" and info.promoted is not None
            and info.promoted.from_volume_uuid == body.volume_uuid)


def primary_info(doc):
    """The PrimaryInfo in an info document (a dict), or None if it is no
    primary's."""
    if not isinstance(doc, dict) or doc.get("role") != "primary":
        return None
    try:
        return PrimaryInfo.from_json(doc)
    except RecordError:
        return None


def supersede(t, info, uri, learned_by, link=None):
    """Tracker t learned that info (a PrimaryInfo, at uri) was promoted
    from its volume: recorded durably, then export "" is fenced (unless the
    server runs with --force).  Returns the Supersession."""
    with t.lock:
        t.check_open()
        b = t.body
        if not promoted_from(b, info):
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


def probe_links(t, timeout=PROBE_TIMEOUT):
    """Before a primary serves: asks each link's secondary what it is; one
    promoted from this volume supersedes it.  A peer that does not answer
    within timeout seconds is skipped (logged): it does not block the start."""
    for name, link in sorted(t.body.links.items()):
        if not link.secondary:
            continue
        doc, why = probe(link.secondary, link.tls_psk, timeout)
        if doc is None:
            log.warning("link %s: could not ask %s what it is (%s); serving anyway", name,
                        link.secondary, why)
            continue
        info = primary_info(doc)
        if info is not None and promoted_from(t.body, info):
            supersede(t, info, link.secondary, "probe", name)
