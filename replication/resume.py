"""Resuming an interrupted full transfer (an initial sync or a resync).

What it owns: the agent's side of a resume.  What it promises:

* A full transfer resumes only into the staging the secondary is still
  receiving for it (same primary volume, same base) and only from that
  staging's snappoint, a snappoint of this link whose snapshot the primary
  still holds (resumable()); otherwise the cycle starts afresh.
* What the secondary holds is what it says it durably holds (its export
  held/..., replication/secondary.py), never the agent's own
  acknowledgements, which lag by the in-flight window.
* A full transfer is one data run cut into pieces of manifest.PIECE from
  offset 0.  A resume sends every piece not wholly held, whole (split()),
  so the pieces sent are the manifest's pieces and at most one piece per
  gap is sent again; the pieces held are read from the snapshot and hashed
  here (hash_held()), so the manifest's digest still covers every byte and
  the commit still checks the whole staging against the primary.
"""
import logging
import re

import numpy as np

from . import manifest, native, transport

log = logging.getLogger(__name__)

CHUNK = 1024          # pieces looked at at once (memory: a few blocks' bits per piece)


def resumable(link, body, info, base):
    """The snappoint a full transfer of link `link` to the replica whose
    info is `info` can resume from, or None: the secondary's receiving
    staging is this primary's, from base (an IntervalRef or None), and
    ends at a snappoint of this link that still has its snapshot."""
    st = info.staging
    if st is None or st.complete or st.primary_uuid != body.volume_uuid \
            or st.base != manifest.base_key(base):
        return None
    iv = next((iv for iv in body.intervals if str(iv.seq) == st.target), None)
    sp = next((sp for sp in body.snappoints if iv is not None and sp.name == iv.closed_by),
              None)
    if sp is None or not re.fullmatch(rf"{re.escape(link)}\.[0-9]+", sp.name):
        log.info("link %s: the secondary's staging of interval %s is not from a snappoint "
                 "of this link the primary holds: starting afresh", link, st.target)
        return None
    if sp.snapshot is None:
        log.info("link %s: snappoint %s lost its snapshot: the transfer starts afresh",
                 link, sp.name)
        return None
    return sp.name


def read_held(h, body, timeout):
    """The (data bits, zero bits) the secondary's held/... export (open
    handle h) says it holds durably."""
    words = native.words_for(-(-body.size // body.block_size))
    raw = transport.pread(h, 16 * words, 0, timeout)
    bits = np.frombuffer(raw, dtype=np.uint64)
    return bits[:words], bits[words:]


def split(size, block, data_bits, zero_bits):
    """(runs to send, pieces held): the full transfer's pieces over a
    volume of size bytes, each held when every block of it is held as data
    (a block held as zeroes is sent again: a full transfer sends none)."""
    held = np.ascontiguousarray(data_bits & ~zero_bits)
    all_pieces = list(manifest.pieces([(0, size, False)]))
    send, kept = [], []
    for c in range(0, len(all_pieces), CHUNK):
        chunk = all_pieces[c:c + CHUNK]
        b0 = chunk[0][0] // block
        b1 = -(-(chunk[-1][0] + chunk[-1][1]) // block)
        w0 = b0 // 64
        bits = np.unpackbits(held[w0:-(-b1 // 64)].view(np.uint8), bitorder="little")
        counts = np.concatenate([[0], np.cumsum(bits[b0 - w0 * 64:b1 - w0 * 64])])
        for off, n, _ in chunk:
            s, e = off // block - b0, -(-(off + n) // block) - b0
            (kept if counts[e] - counts[s] == e - s else send).append((off, n))
    runs = []
    for off, n in send:
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + n, False)
        else:
            runs.append((off, n, False))
    return runs, kept


def runs_to_send(agent, body, base, snap_name, target):
    """(runs to send, pieces held) of a resumed full transfer of agent's
    link up to snappoint snap_name (interval target), from base: what the
    secondary says it holds durably (export held/...), the rest sent."""
    stage = f"{body.volume_uuid}/{manifest.base_key(base)}/{target.seq}"
    h = agent.secondary(f"held/{stage}")
    try:
        data, zero = read_held(h, body, agent.peer_timeout)
    finally:
        transport.close_nbd(h)
    runs, kept = split(body.size, body.block_size, data, zero)
    held = sum(n for _, n in kept)
    log.warning("link %s: resuming the transfer of %s: the secondary holds %d of %d bytes, "
                "%d to send", agent.name, snap_name, held, body.size, body.size - held)
    agent.ctl("link_update", name=agent.name, fields={"progress": {
        "snappoint": snap_name, "percent": round(100 * held / max(body.size, 1), 1),
        "bytes_done": 0, "bytes_total": body.size - held, "held_bytes": held}})
    return runs, kept


def hash_held(h, pieces, digest, timeout):
    """Adds each held piece to the transfer digest, read from the
    snapshot through h (the transfer's source handle)."""
    for off, n in pieces:
        digest.add(off, n, False, transport.pread(h, n, off, timeout))
