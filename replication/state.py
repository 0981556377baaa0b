"""The state directory of one volume and its metadata file.

Layout of STATE/:
  meta.json     versioned metadata, {"format", "checksum", "body"}: see
                replication/meta.py (the one way to change it)
  lock          locked (lock_exclusive) by the one server of this directory;
                holds its pid
  al            the activity log (see replication/actlog.py)
  maps/         change (.cmap), block (.bmap) and zero (.zmap) map files,
                one set per interval; valid maps (.vmap) of snapshots
  snaps/        sparse snapshot files (.img)
  control.sock  the server's control socket (mode 0600)
  server.pid    the server's pid while it runs

Only the server writes anything here after `prepl init`.
"""
import errno
import fcntl
import os
import stat
import struct
import time
import uuid

from . import chain, meta
from .errors import InUseError, StateError, UsageError
from .meta import FORMAT, NAME as META, ROLES, fsync_dir  # noqa: F401 (re-exported)

DEFAULT_REGION = 64 << 10
DEFAULT_BLOCK = 4 << 10
DEFAULT_AL_EXTENT = 4 << 20
def volume_size(path):
    """Size of a regular file or a block device, in bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class StateDir:
    def __init__(self, path):
        self.path = os.path.abspath(path)

    def __str__(self):
        return self.path

    def p(self, *names):
        return os.path.join(self.path, *names)

    @property
    def control_socket(self):
        return self.p("control.sock")

    @property
    def pidfile(self):
        return self.p("server.pid")

    # ---- metadata (replication/meta.py owns the format) -----------------
    def read_meta(self):
        """The metadata body (a meta.Body), checked: format, checksum, every
        record's fields."""
        return meta.read(self.path)

    def write_meta(self, body):
        """Atomically replaces the metadata (durable on return)."""
        meta.write(self.path, body)

    # ---- the server's lock ---------------------------------------------
    def lock(self):
        """Takes the server lock; returns the open file (keep it open)."""
        f = os.fdopen(os.open(self.p("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600),
                      "r+")
        try:
            lock_exclusive(f)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise InUseError(f"state directory {self.path} is in use by another server "
                             f"(pid {holder}); stop it first (`prepl stop {self.path}`)")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f

    def is_locked(self):
        return flocked(self.p("lock"))


def lock_exclusive(f):
    """Takes the exclusive lock of open file f without waiting (raises
    BlockingIOError if another holds it); it lasts while f stays open.
    Two locks on the same open file: an flock, which every prepl version
    takes, and an OFD lock (fcntl F_OFD_SETLK), which flocked() can test
    without taking anything (F_OFD_GETLK)."""
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        fcntl.fcntl(f, fcntl.F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
    except OSError as e:
        fcntl.flock(f, fcntl.LOCK_UN)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise BlockingIOError(e.errno, e.strerror) from None
        raise


def _flock_struct(kind):
    # struct flock: l_type, l_whence, l_start, l_len (0: to the end and
    # beyond), l_pid (0 for OFD locks)
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


def flocked(path):
    """True if some process holds the lock of path (lock_exclusive).  Only
    asks (F_OFD_GETLK): a probe never takes the lock, so it never makes a
    process that takes it at that moment fail."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_struct(fcntl.F_RDLCK))
    finally:
        os.close(fd)
    return struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK


def init(path, volume, size=None, region_size=DEFAULT_REGION, block_size=DEFAULT_BLOCK,
         role="primary", al_extent=DEFAULT_AL_EXTENT):
    """Creates a state directory for volume.  With size, creates the volume
    as a new zero-filled file and records that it was tracked since empty."""
    if role not in ROLES:
        raise UsageError(f"invalid role {role!r}: use primary or secondary")
    if block_size > region_size:
        raise UsageError(f"block size {block_size} is larger than region size {region_size}")
    sd = StateDir(path)
    if os.path.exists(sd.p(META)):
        raise StateError(f"{sd.path} already holds a prepl state directory; "
                         "nothing was changed")
    if os.path.exists(sd.path) and (not os.path.isdir(sd.path) or os.listdir(sd.path)):
        raise StateError(f"{sd.path} exists and is not an empty directory; nothing was changed")
    volume = os.path.abspath(volume)
    created = False
    if size is not None:
        if os.path.exists(volume):
            raise UsageError(f"volume {volume} already exists: --size creates a new, empty "
                             "volume; leave out --size to track an existing one")
        fd = os.open(volume, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(volume))
        created = True
    else:
        if not os.path.exists(volume):
            raise UsageError(f"volume {volume} does not exist: give --size to create it")
        mode = os.stat(volume).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise UsageError(f"volume {volume} is neither a regular file nor a block device")
        size = volume_size(volume)
        if size == 0:
            raise UsageError(f"volume {volume} is empty (0 bytes)")
    try:
        os.makedirs(sd.p("maps"), mode=0o700, exist_ok=True)
        os.makedirs(sd.p("snaps"), mode=0o700, exist_ok=True)
        os.chmod(sd.path, 0o700)
        body = meta.Body(
            volume_uuid=str(uuid.uuid4()), volume=volume, size=size,
            region_size=region_size, block_size=block_size,
            al_extent=max(al_extent, region_size), role=role, generation=1,
            created=time.time(), tracked_since_empty=created, clean=True,
            next_seq=1, next_snap_id=1, next_file_id=2,
            intervals=[chain.new_interval(0, 1)], snappoints=[], links={})
        chain.create_interval_files(sd, body, body.open_interval.maps)
        sd.write_meta(body)
    except BaseException:
        if created:
            os.unlink(volume)
        raise
    return sd, body
