"""The role changes a running server makes (ARCHITECTURE §4a), as its
control socket's operations and a secondary's export "promote": failover,
promote (a migration), supersede, reinstate, failback, fence and unfence.
The metadata transitions are replication/roles.py's; here the server swaps
what serves its state directory without a restart.

A promotion (failover, promote): once its record is written, a Tracker
takes over the state directory's lock and the volume, and new connections
get the primary's exports (connections opened before keep reading the
volume).  A demotion (failback, and a migration's end): once its record is
written, a Replica takes over and new connections get the secondary's
exports (writes on connections opened before fail).  If what serves next
cannot start after the record, the server stops (fail-stop): its next
start serves the new role.
"""
import json
import logging

from . import faults, peers, roles
from .errors import RefusedError
from .exports import RequestHandle
from .meta import IntervalRef, RecordError, ReplicaInfo
from .secondary import Replica
from .tracker import Tracker

log = logging.getLogger(__name__)


class RoleChanges:
    def __init__(self, server):
        self.server = server

    def handlers(self):
        return {"failover": self.failover, "supersede": self.supersede,
                "failback": self.failback, "reinstate": self.reinstate,
                "fence": self.fence, "unfence": self.unfence}

    def reinstate(self, req):
        """The control socket's "reinstate": the node that superseded this
        primary failed back onto it (replication/roles.py)."""
        t = self._primary("reinstate")
        try:
            info = ReplicaInfo.from_json(req.get("info"))
        except RecordError as e:
            raise RefusedError(f"reinstate needs the peer's replica info ({e})") from None
        was = roles.reinstate(t, info, req.get("uri"))
        return {"reinstated": was is not None, "read_only": t.writes_refused}

    def failback(self, req):
        """The control socket's "failback": this primary becomes the
        secondary of the peer whose info the request carries
        (replication/roles.py) and is served as one from now on."""
        s = self.server
        if s.tracker is None:
            b = s.replica.body
            if b.bound is not None and req.get("peer_uuid") == b.bound.primary_uuid:
                report = b.failback.report if b.failback else {"blocks": 0, "bytes": 0}
                return dict(report, role="secondary", uri=s.uri, again=True)
            raise RefusedError(f"{s.state} is a secondary already (of "
                               f"{b.bound.primary_uuid if b.bound else 'no primary yet'}); "
                               "failback turns a primary into the secondary of the node it "
                               "diverged from")
        peer = peers.primary_info(req.get("info"))
        if peer is None:
            raise RefusedError("the peer is no prepl primary (failback needs the node to "
                               "follow serving as a primary); nothing was changed")
        t = s.tracker
        _, report = roles.failback(t, peer, req.get("uri"), bool(req.get("discard_my_data")),
                                   migrating=bool(req.get("migrate")))
        faults.point("primary.failback.recorded")
        try:
            r = Replica(s.state, lockfile=t.retire())
            r.uri = s.uri
            r.md.fail_stop = s.fail_stop
            r.start()
        except BaseException as e:      # the record says secondary: a restart serves it
            s.fail_stop(f"the failback is recorded but the secondary could not start: {e!r}")
        s.serve(r)
        r.remove_unnamed_files()        # the old chain's maps and snapshots go now
        return dict(report, role="secondary", uri=s.uri, again=False)

    def supersede(self, req):
        """The control socket's "supersede": an agent met the node promoted
        from this primary (replication/roles.py)."""
        t = self._primary("supersede")
        info = peers.primary_info(req.get("info"))
        if info is None:
            raise RefusedError("supersede needs the promoted node's info document")
        sup = roles.supersede(t, info, req.get("uri"), "agent", req.get("link"))
        return {"superseded": sup.to_json(), "read_only": t.writes_refused,
                "remedy": t.superseded_remedy()}

    def failover(self, req):
        """The control socket's "failover": this secondary becomes a primary
        (replication/roles.py) and is served as one from now on."""
        return self._promote()

    def promote(self, req):
        """Export "promote" (a migration's primary asks): as failover, if
        the replica holds exactly the interval the request names of the
        primary it names; asking again once promoted answers the same."""
        s = self.server
        try:
            planned = (req["primary_uuid"], IntervalRef.from_json(req["target"]))
        except (KeyError, TypeError, RecordError) as e:
            raise RefusedError(f"malformed promote request ({e})") from None
        p = s.tracker.body.promoted if s.tracker else None
        if p is not None and (p.from_volume_uuid, p.divergence) == planned:
            return self._promoted(s.tracker.body)
        return self._promote(planned)

    def _promote(self, planned=None):
        s = self.server
        if s.replica is None:
            raise RefusedError(f"{s.state} is a primary already"
                               + (f" (promoted by a failover at generation "
                                  f"{s.tracker.body.promoted.generation})"
                                  if s.tracker.body.promoted else "")
                               + "; failover turns a secondary into a primary")
        body, waited = roles.failover(s.replica, planned)
        faults.point("secondary.failover.recorded")
        old = s.replica
        try:
            old.close()
            t = Tracker(s.state, lockfile=old.hand_over_lock(), sync_interval=s.sync_interval)
            t.md.fail_stop = s.fail_stop
            t.uri = s.uri
            t.start()
        except BaseException as e:      # the record says primary: a restart serves it
            s.fail_stop(f"the failover is recorded but the primary could not start: {e!r}")
        s.serve(t)
        return dict(self._promoted(body), merge_waited_seconds=waited)

    def _promoted(self, body):
        s = self.server
        p = body.promoted
        return {"role": "primary", "generation": body.generation,
                "promoted_from": p.from_volume_uuid, "divergence": p.divergence.to_json(),
                "failback_snappoint": roles.FAILBACK, "uri": s.uri}

    def fence(self, req):
        """The control socket's "fence" (a migration): once no write is in
        flight (waiting up to wait_quiet seconds), export "" refuses writes
        until "unfence" or a restart; nothing is recorded."""
        t = self._primary("fence")
        wait = req.get("wait_quiet", 10)
        if type(wait) not in (int, float) or not 0 <= wait <= 86400:
            raise RefusedError(f"wait_quiet must be seconds (0..86400), not {wait!r}")
        return {"fenced": True, "writes_total": roles.fence_when_quiet(t, wait)}

    def unfence(self, req):
        t = self._primary("unfence")
        with t.lock:
            if not t.fenced:
                t.unfence()
        return {"fenced": t.fenced}

    def _primary(self, op):
        s = self.server
        if s.tracker is None:
            raise RefusedError(f"{s.state} is a secondary: {op} is for a primary")
        return s.tracker


class PromoteHandle(RequestHandle):
    """Export "promote" of a secondary (not listed): a migration's primary
    writes {"primary_uuid", "target"} and flushes; the reply says what the
    node is now (RoleChanges.promote)."""

    def __init__(self, roles):
        super().__init__()
        self.roles = roles

    def answer(self, text):
        try:
            req = json.loads(text)
        except ValueError as e:
            raise RefusedError(f"malformed promote request ({e})") from None
        if not isinstance(req, dict):
            raise RefusedError("malformed promote request (not a JSON object)")
        return self.roles.promote(req)
