"""The metadata of a state directory: the one durable record of a node's
state, and the one way to change it.

STATE/meta.json is {"format", "checksum", "body"}; the checksum is the
SHA-256 of the canonical JSON of body, so a damaged file is detected,
never trusted.

Memory follows the disk.  A server holds its body in a Metadata object.
A change edits a deep copy (`with md.change() as body: ...`), writes it
durably -- temp file, write, fsync, rename over meta.json, fsync of the
directory -- and only then makes the copy the body everybody reads.

* A failure before the rename (the temp file's write or fsync: ENOSPC,
  EIO; the rename itself) leaves the file and the memory as they were and
  raises MetadataWriteError with the errno: the operation failed, nothing
  changed, and it can be retried once the cause is gone.
* A failure after the rename (the directory's fsync) leaves the new file
  visible but perhaps not durable: nobody can tell which of the two a power
  loss would keep.  That is fail-stop: Metadata.fail_stop is called (the
  server logs and exits at once, like a crash) and the next start trusts
  whatever file it finds, recovering as after any unclean stop.
"""
import copy
import hashlib
import json
import logging
import os
from contextlib import contextmanager

from . import faults
from .errors import MetadataFailStop, MetadataWriteError, StateError

log = logging.getLogger(__name__)

FORMAT = 2     # 2: closed maps' digests are XXH3-128 ("xxh3-128:HEX"); 1: SHA-256 hex
NAME = "meta.json"
ROLES = ("primary", "secondary")
# keys every metadata body has since `prepl init`, with their types
REQUIRED = {"volume_uuid": str, "volume": str, "size": int, "region_size": int,
            "block_size": int, "role": str, "generation": int, "clean": bool,
            "intervals": list, "snappoints": list, "links": dict}


def canonical(body):
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def checksum(body):
    return "sha256:" + hashlib.sha256(canonical(body)).hexdigest()


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(state_path):
    """The metadata body of the state directory, checked: format, checksum,
    required keys."""
    path = os.path.join(state_path, NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if not os.path.isdir(state_path):
            raise StateError(f"{state_path} does not exist: create it with `prepl init`")
        raise StateError(f"{state_path} is not a prepl state directory (no {NAME}): "
                         "create one with `prepl init`")
    except NotADirectoryError:
        raise StateError(f"{state_path} is not a directory, so no prepl state directory: "
                         "give the state directory (`prepl init` creates one)")
    except IsADirectoryError:
        raise StateError(f"{path} is a directory, not prepl metadata: the state directory "
                         "is damaged")
    try:
        doc = json.loads(raw)
        fmt = doc["format"]
        body = doc["body"]
        digest = doc["checksum"]
    except (ValueError, KeyError, TypeError):
        raise StateError(f"{path} is corrupt (not a prepl metadata document); "
                         "restore it from a backup or re-create the state directory")
    if type(fmt) is not int or fmt < 1:
        raise StateError(f"{path} is corrupt (format {fmt!r} is no prepl metadata "
                         "format); restore it from a backup or re-create the state "
                         "directory")
    if fmt > FORMAT:
        raise StateError(f"{path} has format {fmt!r}, newer than this prepl understands "
                         f"({FORMAT}): upgrade prepl")
    if digest != checksum(body):
        raise StateError(f"{path} is corrupt (checksum mismatch); nothing was changed. "
                         "Restore it from a backup or re-create the state directory")
    bad = sorted(k for k, t in REQUIRED.items() if type(body.get(k)) is not t) \
        if isinstance(body, dict) else ["body"]
    if not bad and (body["role"] not in ROLES or body["size"] <= 0):
        bad = ["role" if body["role"] not in ROLES else "size"]
    if bad:
        raise StateError(f"{path} is corrupt (missing or invalid: {', '.join(bad)}) although "
                         "its checksum matches; nothing was changed. Restore it from a "
                         "backup or re-create the state directory")
    return body


def write(state_path, body):
    """Atomically replaces the metadata; durable on return.  Raises
    MetadataWriteError (nothing changed) or MetadataFailStop (the new file
    is in place, its durability unknown)."""
    path = os.path.join(state_path, NAME)
    tmp = path + ".tmp"
    doc = {"format": FORMAT, "checksum": checksum(body), "body": body}
    data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            faults.io("meta.write")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            faults.io("meta.fsync")
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.io("meta.rename")
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise MetadataWriteError(path, e) from e
    try:
        faults.io("meta.dirsync")
        fsync_dir(state_path)
    except OSError as e:
        raise MetadataFailStop(f"the metadata {path} was replaced but its directory could not "
                               f"be synced ({e.strerror or e}): whether the change survives a "
                               "power loss is unknown; stopping (the next start trusts the "
                               "file)") from e


def _fail_stop_raise(err):
    raise err


class Metadata:
    """The last durable body of a state directory, held by its server.

    Read it through .body and never change that object: every change goes
    through change().  fail_stop(err) is called on a failure after the
    rename (see the module's text); by default it raises err."""

    def __init__(self, state_path, body):
        self.path = state_path
        self._body = body
        self.fail_stop = _fail_stop_raise
        self.writes = 0

    @property
    def body(self):
        return self._body

    @contextmanager
    def change(self):
        """Yields a deep copy of the body to edit; on a normal exit writes it
        durably and only then makes it the body.  An exception inside the
        block, or a failed write, leaves everything as it was."""
        new = copy.deepcopy(self._body)
        yield new
        self.commit(new)

    def commit(self, new):
        try:
            write(self.path, new)
        except MetadataFailStop as e:
            log.critical("%s", e)
            self.fail_stop(e)
            raise
        self._body = new
        self.writes += 1
