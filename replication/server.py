"""What the nbdkit plugin does, without nbdkit: configuration, the role's
exports and the server's lifecycle.  nbdplugin/plugin.py forwards nbdkit's
callbacks here and turns OSError into nbdkit.set_error(errno).

A server serves one state directory: a primary (replication/tracker.py,
exports in replication/exports_primary.py) or a secondary
(replication/secondary.py, exports in replication/exports_secondary.py).
Its control socket (replication/control.py) starts in after_fork.

A failover (replication/roles.py) turns a served secondary into a primary
without a restart: once its record is written, a Tracker takes over the
state directory's lock and the volume, and new connections get the
primary's exports (connections opened before keep reading the volume).
If the Tracker cannot start after the record, the server stops (its next
start serves the primary).
"""
import json
import logging
import os

from . import exports_primary, exports_secondary, faults, roles
from .control import ControlServer
from .errors import (EXIT_STATE, PreplError, RefusedError, StateError,  # noqa: F401 (plugin.py: PreplError)
                     UsageError)
from .exports import RequestHandle
from .meta import IntervalRef, RecordError, ReplicaInfo
from .secondary import Replica
from .state import StateDir
from .tracker import Tracker

log = logging.getLogger(__name__)


class Server:
    def __init__(self):
        self.state = None
        self.tracker = None
        self.replica = None
        self.control = None
        self.uri = None
        self.force = False

    def config(self, key, value):
        if key == "state":
            self.state = value
        elif key == "uri":
            self.uri = value          # where this server listens (for status)
        elif key == "force" and value in ("0", "1"):
            self.force = value == "1"     # serve a superseded primary read-write
        else:
            raise UsageError(f"unknown parameter {key!r} (={value[:64]!r}): the prepl plugin "
                             "takes state=DIR [uri=URI] [force=0|1]")

    def config_complete(self):
        if not self.state:
            raise UsageError("missing parameter state=DIR (the prepl state directory)")
        try:
            if StateDir(self.state).read_meta().role == "secondary":
                self.replica = Replica(self.state)
            else:
                self.tracker = Tracker(self.state, force=self.force)
                roles.probe_links(self.tracker)     # a superseded primary learns it now
        except FileNotFoundError as e:      # a map, snapshot or staging file is gone
            raise StateError(f"{e.filename} is missing: the state directory {self.state} is "
                             "damaged; refusing to serve it")
        self.owner.md.fail_stop = _fail_stop

    @property
    def owner(self):
        return self.tracker or self.replica

    def after_fork(self):
        try:        # nbdkit (umask 022) wrote it 0644 just before calling us
            os.chmod(self.owner.sd.pidfile, 0o600)
        except FileNotFoundError:
            pass
        self.owner.uri = self.uri
        if self.tracker:
            self.tracker.start()
        if self.replica:
            self.replica.start()
        self.control = ControlServer(self.owner.sd.control_socket, self.owner,
                                     self.control_handlers())
        self.control.start()

    def control_handlers(self):
        return dict(self.owner.control_handlers(), failover=self.failover,
                    supersede=self.supersede, failback=self.failback,
                    reinstate=self.reinstate, fence=self.fence, unfence=self.unfence)

    def reinstate(self, req):
        """The control socket's "reinstate": the node that superseded this
        primary failed back onto it (replication/roles.py)."""
        if self.tracker is None:
            raise RefusedError(f"{self.state} is a secondary: nothing to reinstate")
        try:
            info = ReplicaInfo.from_json(req.get("info"))
        except RecordError as e:
            raise RefusedError(f"reinstate needs the peer's replica info ({e})") from None
        s = roles.reinstate(self.tracker, info, req.get("uri"))
        return {"reinstated": s is not None, "read_only": self.tracker.fenced}

    def failback(self, req):
        """The control socket's "failback": this primary becomes the
        secondary of the peer whose info the request carries
        (replication/roles.py) and is served as one from now on."""
        if self.tracker is None:
            b = self.replica.body
            if b.bound is not None and req.get("peer_uuid") == b.bound.primary_uuid:
                report = b.failback.report if b.failback else {"blocks": 0, "bytes": 0}
                return dict(report, role="secondary", uri=self.uri, again=True)
            raise RefusedError(f"{self.state} is a secondary already (of "
                               f"{b.bound.primary_uuid if b.bound else 'no primary yet'}); "
                               "failback turns a primary into the secondary of the node it "
                               "diverged from")
        peer = roles.primary_info(req.get("info"))
        if peer is None:
            raise RefusedError("the peer is no prepl primary (failback needs the node to "
                               "follow serving as a primary); nothing was changed")
        t = self.tracker
        _, report = roles.failback(t, peer, req.get("uri"), bool(req.get("discard_my_data")),
                                   migrating=bool(req.get("migrate")))
        faults.point("primary.failback.recorded")
        try:
            r = Replica(self.state, lockfile=t.retire())
            r.uri = self.uri
            r.md.fail_stop = _fail_stop
            r.start()
        except BaseException as e:      # the record says secondary: a restart serves it
            _fail_stop(f"the failback is recorded but the secondary could not start: {e!r}")
        self.replica, self.tracker = r, None
        self.control.serve(r, self.control_handlers())
        r.remove_unnamed_files()        # the old chain's maps and snapshots go now
        return dict(report, role="secondary", uri=self.uri, again=False)

    def supersede(self, req):
        """The control socket's "supersede": an agent met the node promoted
        from this primary (replication/roles.py)."""
        if self.tracker is None:
            raise RefusedError(f"{self.state} is a secondary: it cannot be superseded")
        info = roles.primary_info(req.get("info"))
        if info is None:
            raise RefusedError("supersede needs the promoted node's info document")
        s = roles.supersede(self.tracker, info, req.get("uri"), "agent", req.get("link"))
        return {"superseded": s.to_json(), "read_only": self.tracker.fenced,
                "remedy": self.tracker.superseded_remedy()}

    def failover(self, req):
        """The control socket's "failover": this secondary becomes a primary
        (replication/roles.py) and is served as one from now on."""
        return self._promote()

    def promote(self, req):
        """Export "promote" (a migration's primary asks): as failover, if
        the replica holds exactly the interval the request names of the
        primary it names; asking again once promoted answers the same."""
        try:
            planned = (req["primary_uuid"], IntervalRef.from_json(req["target"]))
        except (KeyError, TypeError, RecordError) as e:
            raise RefusedError(f"malformed promote request ({e})") from None
        p = self.tracker.body.promoted if self.tracker else None
        if p is not None and (p.from_volume_uuid, p.divergence) == planned:
            return self._promoted(self.tracker.body)
        return self._promote(planned)

    def _promote(self, planned=None):
        if self.replica is None:
            raise RefusedError(f"{self.state} is a primary already"
                               + (f" (promoted by a failover at generation "
                                  f"{self.tracker.body.promoted.generation})"
                                  if self.tracker.body.promoted else "")
                               + "; failover turns a secondary into a primary")
        body, waited = roles.failover(self.replica, planned)
        faults.point("secondary.failover.recorded")
        old = self.replica
        try:
            old.close()
            t = Tracker(self.state, lockfile=old.hand_over_lock())
            t.md.fail_stop = _fail_stop
            t.uri = self.uri
            t.start()
        except BaseException as e:      # the record says primary: a restart serves it
            _fail_stop(f"the failover is recorded but the primary could not start: {e!r}")
        self.tracker = t
        self.replica = None
        self.control.serve(t, self.control_handlers())
        return dict(self._promoted(body), merge_waited_seconds=waited)

    def _promoted(self, body):
        p = body.promoted
        return {"role": "primary", "generation": body.generation,
                "promoted_from": p.from_volume_uuid, "divergence": p.divergence.to_json(),
                "failback_snappoint": roles.FAILBACK, "uri": self.uri}

    def fence(self, req):
        """The control socket's "fence" (a migration): once no write is in
        flight (waiting up to wait_quiet seconds), export "" refuses writes
        until "unfence" or a restart; nothing is recorded."""
        t = self._primary("fence")
        return {"fenced": True, "writes_total": roles.fence_when_quiet(
            t, float(req.get("wait_quiet", 10)))}

    def unfence(self, req):
        t = self._primary("unfence")
        with t.lock:
            if not t.fenced:
                t.unfence()
        return {"fenced": t.fenced}

    def _primary(self, op):
        if self.tracker is None:
            raise RefusedError(f"{self.state} is a secondary: {op} is for a primary")
        return self.tracker

    def cleanup(self):
        if self.control:
            self.control.stop()
        if self.owner:
            self.owner.close()

    def list_exports(self):
        if self.replica:
            return exports_secondary.list_exports(self.replica)
        return exports_primary.list_exports(self.tracker)

    def open(self, name, readonly):
        if self.replica and name == "promote" and not readonly:
            return PromoteHandle(self)
        if self.replica:
            return exports_secondary.open_export(self.replica, name, readonly)
        return exports_primary.open_export(self.tracker, name, readonly)


class PromoteHandle(RequestHandle):
    """Export "promote" of a secondary (not listed): a migration's primary
    writes {"primary_uuid", "target"} and flushes; the reply says what the
    node is now (Server.promote)."""

    def __init__(self, server):
        super().__init__()
        self.server = server

    def answer(self, text):
        try:
            req = json.loads(text)
        except ValueError as e:
            raise RefusedError(f"malformed promote request ({e})") from None
        if not isinstance(req, dict):
            raise RefusedError("malformed promote request (not a JSON object)")
        return self.server.promote(req)


def _fail_stop(err):
    """A metadata write whose durability is unknown (replication/meta.py):
    the server stops at once, as in a crash; its next start trusts the
    file it finds and recovers as after any unclean stop."""
    log.critical("stopping the server: %s", err)
    logging.shutdown()
    os._exit(EXIT_STATE)


def default_logging():
    """Logging of the server: stderr (nbdkit's log), no timestamps (journald
    or STATE/server.log's reader adds them); PREPL_LOG_LEVEL sets the level."""
    logging.basicConfig(level=os.environ.get("PREPL_LOG_LEVEL", "INFO"),
                        format="prepl[%(process)d] %(levelname)s %(name)s: %(message)s")
