"""Packed transfer of an interval: many small pieces in few NBD requests.

An incremental interval is mostly small runs scattered over the volume (10 %
of 1 GiB rewritten in random 64 KiB pieces is about 1400 runs).  Sent as one
NBD request per run, each run costs a wakeup and a Python call in each of
three processes (primary server, agent, secondary server), and that, not
the bytes, bounded a cycle.  So the agent moves an incremental interval
packed, through two exports that exist for it:

* the primary's ``pack/NAME/BASE/FP`` (read-only, not listed): the
  concatenation, in offset order, of the data pieces of the interval union
  (BASE, NAME] (BASE ``none``: from the start), read from snapshot NAME.
  ``FP`` is the :func:`fingerprint` of the run list the agent computed; the
  server computes its own from its maps and refuses the export when they
  differ (the two would disagree about which bytes go where).
* the secondary's ``batch/PRIMARY/BASE/TARGET`` (write-only, not listed):
  each write carries one *batch*: a header (``MAGIC``, the entry count, then
  per entry the replica offset, length and kind) followed by the data of the
  data entries in entry order.  Every entry is staged exactly as a write or
  a zero request of ``stage/PRIMARY/BASE/TARGET`` would be; the batch is
  checked whole before any entry is staged.  The NBD offset of the write is
  not used (the agent puts the batch's stream offset there).

Entries are the manifest's pieces (data runs cut at ``manifest.PIECE`` from
the run's start, zero runs whole), never split across batches, so the
transfer digest is the same as for an unpacked transfer and the secondary
still hashes each piece as it arrives.
"""
import hashlib
import struct
from collections import namedtuple

import numpy as np

from . import manifest

MAGIC = b"PREPLBT1"
HEADER = struct.Struct("<8sII")          # magic, entry count, reserved (0)
ENTRY = np.dtype([("offset", "<u8"), ("length", "<u8")])
ZERO_FLAG = 1 << 63                      # in an entry's length: a zero entry
BATCH_BYTES = 1 << 20      # data bytes per batch (a piece larger than that goes alone)
MAX_ENTRIES = 4096         # entries per batch (zero entries carry no data)
MAX_BATCH = 32 << 20       # the batch export's largest write

Batch = namedtuple("Batch", "stream_offset data_bytes entries")


def fingerprint(run_list):
    """A short hex digest of a run list (or its manifest.run_array)."""
    return hashlib.sha256(b"prepl-runs-1\n"
                          + manifest.as_run_array(run_list).tobytes()).hexdigest()[:32]


def header_size(count):
    return HEADER.size + count * ENTRY.itemsize


def batches(run_list, batch_bytes=BATCH_BYTES, max_entries=MAX_ENTRIES):
    """The run list's pieces grouped into batches, in offset order; each
    batch's data is the stream range [stream_offset, + data_bytes) of the
    pack export."""
    out = []
    entries, data, stream = [], 0, 0
    for off, length, zero in manifest.pieces(run_list):
        if entries and (len(entries) == max_entries
                        or (not zero and data and data + length > batch_bytes)):
            out.append(Batch(stream, data, entries))
            stream += data
            entries, data = [], 0
        entries.append((off, length, zero))
        if not zero:
            data += length
    if entries:
        out.append(Batch(stream, data, entries))
    return out


def encode_header(entries):
    """The header of a batch with these entries."""
    a = np.empty(len(entries), ENTRY)
    if entries:
        e = np.array(entries, dtype=np.uint64).reshape(-1, 3)
        a["offset"] = e[:, 0]
        a["length"] = e[:, 1] | np.where(e[:, 2] != 0, np.uint64(ZERO_FLAG), np.uint64(0))
    return HEADER.pack(MAGIC, len(entries), 0) + a.tobytes()


def decode(buf):
    """(entries, data) of a batch: entries [(offset, length, zero)], data a
    memoryview of buf holding the data entries' bytes back to back.  Raises
    ValueError with what is wrong (also for entries that are not in
    increasing offset order, or overlap); nothing is decoded partially."""
    mv = memoryview(buf).cast("B")
    if len(mv) < HEADER.size:
        raise ValueError(f"a batch of {len(mv)} bytes is shorter than its header")
    magic, count, reserved = HEADER.unpack_from(mv, 0)
    if magic != MAGIC or reserved:
        raise ValueError("not a prepl batch (bad magic): batch exports take only "
                         "prepl agent batches")
    hsize = header_size(count)
    if hsize > len(mv):
        raise ValueError(f"a batch header of {count} entries does not fit in {len(mv)} bytes")
    e = np.frombuffer(mv[HEADER.size:hsize], ENTRY)
    entries = []
    need = hsize
    end = 0
    for off, length in zip(e["offset"].tolist(), e["length"].tolist()):
        zero = bool(length & ZERO_FLAG)
        length &= ~ZERO_FLAG
        if off < end:
            raise ValueError(f"batch entries out of order or overlapping at offset {off}")
        end = off + length
        if not zero:
            need += length
        entries.append((off, length, zero))
    if need != len(mv):
        raise ValueError(f"a batch of {len(mv)} bytes with a {hsize}-byte header has data "
                         f"entries of {need - hsize} bytes")
    return entries, mv[hsize:]


class Stream:
    """The pack export's content: the data pieces of a run list, one after
    the other.  ``segments(offset, length)`` maps a range of it back to the
    volume."""

    def __init__(self, run_list):
        """run_list: a run list or its manifest.run_array."""
        self.offsets, self.lengths = manifest.data_pieces(run_list)
        self.starts = np.concatenate(([0], np.cumsum(self.lengths)))
        self.size = int(self.starts[-1])

    def segments(self, offset, length):
        """(n, 3) int64 array of (position in the range, volume offset,
        length) covering [offset, offset + length) of the stream, in order.
        Raises ValueError outside."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) outside a stream of "
                             f"{self.size} bytes")
        end = offset + length
        i = int(np.searchsorted(self.starts, offset, side="right")) - 1
        j = int(np.searchsorted(self.starts, end, side="left"))      # pieces [i, j)
        lo = np.maximum(self.starts[i:j], offset)                   # stream positions
        hi = np.minimum(self.starts[i + 1:j + 1], end)
        out = np.empty((max(j - i, 0), 3), dtype=np.int64)
        out[:, 0] = lo - offset
        out[:, 1] = self.offsets[i:j] + (lo - self.starts[i:j])
        out[:, 2] = hi - lo
        return out[out[:, 2] > 0]
