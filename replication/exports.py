"""What every export's handle has in common, and the names they parse.

A handle is what nbdkit's open returns for one connection:
nbdplugin/plugin.py reads its attributes (size, writable, can_zero,
fua_native, block_size, is_snapshot) and calls its methods (pread, pwrite,
zero, trim, flush, extents).  The exports themselves live in
replication/exports_primary.py and replication/exports_secondary.py.
"""
import errno
import json
import logging
import re
import uuid

from .errors import PreplError

log = logging.getLogger(__name__)

SEQ = re.compile(r"0|[1-9][0-9]{0,17}")    # an interval number: ASCII decimal, canonical


def parse_seq(text):
    """The interval number spelled canonically by text, else None ("007",
    "-1", "1e3" and non-ASCII digits are not interval numbers)."""
    return int(text) if isinstance(text, str) and SEQ.fullmatch(text) else None


def is_uuid(text):
    try:
        return str(uuid.UUID(text)) == text
    except (TypeError, ValueError, AttributeError):
        return False


class Handle:
    """What every handle tells nbdkit (plugin.py reads these)."""
    is_snapshot = False
    writable = False
    can_zero = False
    fua_native = False
    block_size = (1, 4096, 32 << 20)

    def flush(self):
        pass

    def refuse_write(self, *args):
        raise OSError(errno.EROFS, "this export is read-only")

    pwrite = zero = trim = refuse_write


class DocHandle(Handle):
    """A small read-only document (nbdkit's info plugin pattern)."""

    def __init__(self, doc):
        self.doc = doc
        self.size = -(-max(len(doc), 1) // 4096) * 4096

    def pread(self, buf, offset):
        data = self.doc[offset:offset + len(buf)]
        buf[:] = data + bytes(len(buf) - len(data))


class RequestHandle(Handle):
    """An export that takes a request: write a JSON document at offset 0,
    then flush; the flush acts on it (answer(text) -> a reply dict, a
    PreplError becoming {"ok": false, "error": ...}); reads return the
    reply, or default() before any."""
    writable = True
    size = 1 << 20

    def __init__(self):
        self.buf = bytearray(self.size)
        self.result = None

    def answer(self, text):
        raise NotImplementedError

    def default(self):
        return {"ok": False, "error": "no request was made on this connection"}

    def pwrite(self, buf, offset, flags=0):
        self.buf[offset:offset + len(buf)] = buf

    def flush(self):
        text = bytes(self.buf).split(b"\0", 1)[0]
        if not text:
            return
        try:
            self.result = dict(self.answer(text), ok=True)
        except PreplError as e:
            log.error("%s refused: %s", type(self).__name__, e)
            self.result = {"ok": False, "error": str(e)}
        self.buf[:] = bytes(len(self.buf))

    def pread(self, buf, offset):
        doc = json.dumps(self.result or self.default(), sort_keys=True).encode()
        data = doc[offset:offset + len(buf)]
        buf[:] = data + bytes(len(buf) - len(data))
