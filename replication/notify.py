"""Readiness for systemd: the sd_notify protocol (a datagram of
newline-separated KEY=VALUE fields to the unix socket named by
$NOTIFY_SOCKET, an abstract one when the name starts with "@").

What it promises: send() does nothing without $NOTIFY_SOCKET (a server or
agent not run by a Type=notify unit pays nothing); a notification that
cannot be sent is logged, never raised (systemd then times the start out,
which says more than a server that refuses to run).  Who sends what: the
server (replication/server.py, inside nbdkit: `prepl serve` execs it, so it
is the unit's main process) READY=1 once its control socket answered a
status request, STOPPING=1 as it stops; the agent (replication/daemon.py)
READY=1 once its link lock is held and its sync socket listens.
"""
import logging
import os
import socket

log = logging.getLogger(__name__)


def wanted():
    return bool(os.environ.get("NOTIFY_SOCKET"))


def _address(name):
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    raise ValueError(f"NOTIFY_SOCKET={name!r} is neither a path nor an abstract name (@...)")


def send(*fields):
    """Sends fields ("READY=1", "STATUS=...") to systemd; True if sent."""
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(_address(name))
            s.sendall("\n".join(fields).encode())
    except (OSError, ValueError) as e:
        log.error("cannot notify systemd (%s) through %s: %s", ", ".join(fields), name, e)
        return False
    return True
