"""What the nbdkit plugin does, without nbdkit: configuration, the role's
exports and the server's lifecycle.  nbdplugin/plugin.py forwards nbdkit's
callbacks here and turns OSError into nbdkit.set_error(errno).

A server serves one state directory: a primary (replication/tracker.py,
exports in replication/exports_primary.py) or a secondary
(replication/secondary.py, exports in replication/exports_secondary.py).
Its control socket (replication/control.py) starts in after_fork; under
systemd (Type=notify) the server reports READY=1 only once that socket has
answered a status request (replication/notify.py).

Role changes (failover, failback, migration: replication/roleserver.py)
swap what serves the state directory without a restart.
"""
import logging
import os

from . import control, exports_primary, exports_secondary, native, notify, roles
from .control import ControlServer
from .errors import EXIT_STATE, PreplError, StateError, UsageError  # noqa: F401 (plugin.py: PreplError)
from .roleserver import PromoteHandle, RoleChanges
from .secondary import Replica
from .state import StateDir
from .tracker import Tracker
from .durability import DEFAULT_INTERVAL, sync_interval

log = logging.getLogger(__name__)


def fail_stop(err):
    """A metadata write whose durability is unknown (replication/meta.py):
    the server stops at once, as in a crash; its next start trusts the
    file it finds and recovers as after any unclean stop."""
    log.critical("stopping the server: %s", err)
    logging.shutdown()
    os._exit(EXIT_STATE)


class Server:
    fail_stop = staticmethod(fail_stop)     # for what serves next after a role change

    def __init__(self):
        self.state = None
        self.tracker = None
        self.replica = None
        self.control = None
        self.uri = None
        self.force = False
        self.sync_interval = DEFAULT_INTERVAL
        self.roles = RoleChanges(self)

    def config(self, key, value):
        if key == "state":
            self.state = value
        elif key == "uri":
            self.uri = value          # where this server listens (for status)
        elif key == "force" and value in ("0", "1"):
            self.force = value == "1"     # serve a superseded primary read-write
        elif key == "sync_interval":
            self.sync_interval = sync_interval(value)
        else:
            raise UsageError(f"unknown parameter {key!r} (={value[:64]!r}): the prepl plugin "
                             "takes state=DIR [uri=URI] [force=0|1] [sync_interval=SECONDS]")

    def config_complete(self):
        if not self.state:
            raise UsageError("missing parameter state=DIR (the prepl state directory)")
        try:
            if StateDir(self.state).read_meta().role == "secondary":
                self.replica = Replica(self.state)
            else:
                self.tracker = Tracker(self.state, force=self.force,
                                       sync_interval=self.sync_interval)
                roles.probe_links(self.tracker)     # a superseded primary learns it now
        except FileNotFoundError as e:      # a map, snapshot or staging file is gone
            raise StateError(f"{e.filename} is missing: the state directory {self.state} is "
                             "damaged; refusing to serve it")
        self.owner.md.fail_stop = fail_stop

    @property
    def owner(self):
        return self.tracker or self.replica

    def after_fork(self):
        # every callback runs on an nbdkit thread with a fresh Python thread
        # state: its frame stack comes from a cache, not a new mapping
        native.cache_frame_stacks()
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
        self.announce_ready()

    def announce_ready(self, timeout=60):
        """READY=1 for a Type=notify unit, once the control socket answers
        (a server that cannot answer its own socket fails its start)."""
        if not notify.wanted():
            return
        st = control.request(self.owner.sd.control_socket, "status", timeout=timeout)
        notify.send("READY=1", f"MAINPID={os.getpid()}",
                    f"STATUS=serving {st['volume']} ({st.get('role')}) at {self.uri}")

    def control_handlers(self):
        return dict(self.owner.control_handlers(), **self.roles.handlers())

    def serve(self, owner):
        """From now on owner (a Tracker or a Replica, after a role change)
        serves the state directory: its exports and control handlers."""
        self.tracker, self.replica = (owner, None) if isinstance(owner, Tracker) else \
            (None, owner)
        self.control.serve(owner, self.control_handlers())

    def cleanup(self):
        notify.send("STOPPING=1")
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
            return PromoteHandle(self.roles)
        if self.replica:
            return exports_secondary.open_export(self.replica, name, readonly)
        return exports_primary.open_export(self.tracker, name, readonly)


def default_logging():
    """Logging of the server: stderr (nbdkit's log), no timestamps (journald
    or STATE/server.log's reader adds them); PREPL_LOG_LEVEL sets the level."""
    logging.basicConfig(level=os.environ.get("PREPL_LOG_LEVEL", "INFO"),
                        format="prepl[%(process)d] %(levelname)s %(name)s: %(message)s")
