"""The control socket: one JSON object per line, each answered by one.

Request:  {"op": "status"} | {"op": "snappoint_create", "name": N, "dataless": B,
                              "changes_after": SEQ (optional: a snapshot of changes)}
          | {"op": "snappoint_list"} | {"op": "snappoint_convert", "name": N}
          | {"op": "snappoint_delete", "name": N} | {"op": "maps"}
          | {"op": "shutdown"}  (clean stop of the tracker; the process exits
                                 when nbdkit is signalled, see `prepl stop`)
          | {"op": "failover"}  (a secondary becomes a primary: replication/roles.py)
Reply:    {"ok": true, "result": ...} or {"ok": false, "code": C, "error": MESSAGE}
          (code "os_error": the operation failed with an OSError, e.g.
          ENOSPC from a metadata write; "errno" holds its number)

The server side is a thread started in nbdkit's after_fork (threads started
earlier do not survive nbdkit's fork).  It and the threads answering
requests run at a lower CPU priority (priority.background_priority): what
they do -- a snappoint's flush, freeing a snapshot, a status -- is kernel
and Python work that must not delay the clients' writes on a busy CPU.  The
socket is created mode 0600 in the state directory: whoever may use it may
change the volume's state.
"""
import errno
import json
import logging
import os
import socket
import threading
import time

from .errors import BY_CODE, NotRunningError, OSFailedError, PreplError, errno_name
from .priority import background_priority

log = logging.getLogger(__name__)
TICK = 1.0


def listen_private(path, backlog=16):
    """A listening unix socket at path, mode 0600 from its creation on
    (a stale socket file there is replaced)."""
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def answer(handlers, line):
    op = None
    try:
        req = json.loads(line)
        if not isinstance(req, dict) or req.get("op") not in handlers:
            raise PreplError(f"unknown request {line[:80]!r}; ops: {', '.join(handlers)}")
        op = req["op"]
        return {"ok": True, "result": handlers[op](req)}
    except PreplError as e:
        reply = {"ok": False, "code": e.code, "error": str(e)}
        if getattr(e, "errno", None):        # e.g. a metadata write that failed
            reply.update(errno=e.errno, error=f"{(op or 'the request').replace('_', ' ')} "
                         f"failed: {e}")
        return reply
    except ValueError as e:
        return {"ok": False, "code": "failed", "error": f"bad request: {e}"}
    except OSError as e:    # the operation failed (a full disk, EIO): not a bug
        log.error("%s failed: %s", op, e)
        return {"ok": False, "code": OSFailedError.code, "errno": e.errno,
                "error": os_failure(op, e)}
    except Exception as e:  # a bug: keep serving, tell the client
        log.exception("control request failed")
        return {"ok": False, "code": "failed", "error": f"internal error: {e!r}"}


REMEDY = {errno.ENOSPC: "free space (on the state directory's or the volume's filesystem), "
                        "then try again",
          errno.EDQUOT: "free space or raise the quota, then try again",
          errno.EIO: "the disk reports I/O errors: check it (dmesg) before trying again",
          errno.EROFS: "the filesystem is read-only: remount it read-write, then try again"}


def os_failure(op, e):
    """The message of operation op that failed with OSError e."""
    what = (op or "the request").replace("_", " ")
    name = errno_name(e.errno)
    where = f" on {e.filename}" if e.filename else ""
    return (f"{what} failed: {e.strerror or e} ({name}){where}; "
            f"{REMEDY.get(e.errno, 'fix the cause, then try again')}")


class ControlServer:
    def __init__(self, path, owner, handlers):
        """owner: the Tracker (primary) or Replica (secondary) whose tick()
        this socket runs; handlers: op -> function(request)."""
        self.path = path
        self.owner = owner
        self.handlers = handlers
        self._stop = threading.Event()
        self.sock = listen_private(path)      # we hold the state lock: any old one is stale
        self.thread = threading.Thread(target=self._run, name="prepl-control", daemon=True)

    def start(self):
        self.thread.start()

    def serve(self, owner, handlers):
        """From now on: another owner (a failover's new primary)."""
        self.owner, self.handlers = owner, handlers

    def _run(self):
        """Accepts connections and runs the owner's tick() every TICK
        seconds, however often clients connect (a status poll every 0.5 s
        must not starve the checkpoints and retries the tick does)."""
        background_priority()
        next_tick = time.monotonic() + TICK
        while not self._stop.is_set():
            self.sock.settimeout(max(0.001, next_tick - time.monotonic()))
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                pass
            except OSError:
                break
            else:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + TICK

    def _tick(self):
        try:
            self.owner.tick()
        except Exception:
            log.exception("housekeeping failed")

    def _serve(self, conn):
        background_priority()
        with conn, conn.makefile("rwb") as f:
            for line in f:
                reply = answer(self.handlers, line.decode(errors="replace"))
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def stop(self):
        self._stop.set()
        try:
            self.sock.close()
            os.unlink(self.path)
        except OSError:
            pass


def exchange(path, message, timeout, not_running):
    """One JSON line to the unix socket at path, one JSON line back (None if
    the peer hung up without answering).  not_running: the message of the
    NotRunningError raised when nobody listens there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError):
            raise NotRunningError(not_running)
        with s.makefile("rwb") as f:
            f.write(json.dumps(message).encode() + b"\n")
            f.flush()
            line = f.readline()
    finally:
        s.close()
    return json.loads(line) if line else None


def request(path, op, timeout=60.0, **args):
    """Sends one request to the server's control socket; returns its result
    or raises the PreplError the server reported."""
    state = os.path.dirname(path)
    reply = exchange(path, {"op": op, **args}, timeout,
                     f"no server is running for {state} (nothing was changed); "
                     f"start one with `prepl serve {state} --unix SOCKET`")
    if reply is None:
        raise PreplError("the server closed the control connection without an answer")
    if not reply.get("ok"):
        err = BY_CODE.get(reply.get("code"), PreplError)(reply.get("error"))
        err.errno = reply.get("errno")
        raise err
    return reply["result"]
