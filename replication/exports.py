"""What every export's handle has in common, and the names they parse.

A handle is what nbdkit's open returns for one connection:
nbdplugin/plugin.py reads its attributes (size, writable, can_zero,
fua_native, block_size, is_snapshot) and calls its methods (pread, pwrite,
zero, trim, flush, extents).  The exports themselves live in
replication/exports_primary.py and replication/exports_secondary.py.
"""
import errno
import re
import uuid

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
