"""Errors of prepl.  Each class carries its message and the exit code the
CLI returns for it; the CLI catches PreplError, prints the message and
exits with the code.  Anything else is a bug and gets a traceback."""
import errno as _errno

# Exit codes (bup-style: each one means one thing to a script).
EXIT_OK = 0
EXIT_FAILED = 1       # the operation was tried and failed; see the message
EXIT_USAGE = 2        # bad command line (argparse uses 2 too)
EXIT_NOT_RUNNING = 3  # no server runs for this state directory
EXIT_STATE = 4        # state directory missing, corrupt, incompatible or in use
EXIT_REFUSED = 5      # refused; retrying will not help (wrong peer, would lose data)
EXIT_TIMEOUT = 6      # gave up after --timeout; retrying later may succeed


class PreplError(Exception):
    exit_code = EXIT_FAILED
    code = "failed"   # stable machine-readable name used on the control socket


class UsageError(PreplError):
    exit_code = EXIT_USAGE
    code = "usage"


class StateError(PreplError):
    exit_code = EXIT_STATE
    code = "state"


class InUseError(StateError):
    code = "in_use"


class NotRunningError(PreplError):
    exit_code = EXIT_NOT_RUNNING
    code = "not_running"


class RefusedError(PreplError):
    exit_code = EXIT_REFUSED
    code = "refused"


class LinkPausedError(RefusedError):
    """The link is paused (`prepl link pause`): its agent makes no cycle;
    a daemon waits for `prepl link resume`, --once exits 5."""


class TimedOutError(PreplError):
    exit_code = EXIT_TIMEOUT
    code = "timeout"


class NotFoundError(PreplError):
    code = "not_found"


class OSFailedError(PreplError):
    """The server's operation failed in the operating system (ENOSPC from a
    metadata write, EIO, ...); errno names the error (None if unknown)."""
    code = "os_error"

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno


class MetadataWriteError(OSFailedError):
    """The metadata could not be written; nothing was changed (retry once
    the cause is gone).  .errno is the system call's; on the control socket
    it travels as an OSFailedError."""

    def __init__(self, path, err):
        name = errno_name(err.errno)
        super().__init__(f"cannot write the metadata {path}: {err.strerror or err} ({name}); "
                         "nothing was changed (free space or fix the state directory's "
                         "filesystem, then retry)", err.errno)


def errno_name(n):
    return _errno.errorcode.get(n, "no errno") if n else "no errno"


class MetadataFailStop(PreplError):
    """The metadata was renamed into place but its directory's fsync failed:
    whether the change survives a power loss is unknown (the server stops)."""
    code = "fail_stop"


class DamagedMapError(StateError):
    """A closed map does not match its recorded digest (or is recorded as
    damaged): the changes it records cannot be trusted."""
    code = "damaged_map"

    def __init__(self, state, seq=None, path=None, why=None):
        self.seq, self.path = seq, path
        if why is None:       # rebuilt from a control-socket reply
            super().__init__(state)
            return
        super().__init__(
            f"closed map {path} of interval {seq} is damaged ({why}): the changes it "
            "records cannot be trusted. The volume is served as before; a link that needs "
            f"interval {seq} must be replicated again in full: "
            f"`prepl link resync {state} LINK`")


BY_CODE = {c.code: c for c in (PreplError, UsageError, StateError, InUseError,
                                NotRunningError, RefusedError, NotFoundError, TimedOutError,
                                MetadataFailStop, DamagedMapError, OSFailedError)}
