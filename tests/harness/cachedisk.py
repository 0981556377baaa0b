"""nbdkit Python plugin: a disk with a volatile write cache (power-loss tests).

    nbdkit -f -U SOCK python cachedisk.py file=IMG control=CTL [blocksize=4096]

Model
-----
* The disk is the backing image ``file`` (must exist; its size is the disk
  size).  It is divided into blocks of ``blocksize`` bytes.
* Writes (pwrite, zero, trim) only go to an in-memory cache of whole blocks
  (partial-block writes read-modify-write the block).  Reads return the cache
  over the backing file.
* A flush, or any write carrying FUA, writes the *whole* cache to the backing
  file, fsyncs it and empties the cache.  Only then is data durable.
* A control channel (unix socket ``control``, one JSON object per line in,
  one JSON line out) lets a test inspect the disk and cut the power:

  {"op":"stats"}
      -> {"ok":true,"cached":N,"flushes":N,"writes":N,...}
  {"op":"writeback","fraction":F,"seed":S}
      Write a random fraction F of the cached blocks to the backing file
      early (no fsync; they stay in the cache as well).
  {"op":"crash","mode":"flushed"|"random","seed":S[,"fraction":F]}
      Power cut.  From this instant every NBD request fails with EIO.  The
      backing file is left holding the flushed data only (mode "flushed"),
      or the flushed data plus a random subset (each block with probability
      F, default 0.5, chosen with random.Random(S)) of the unflushed blocks
      (mode "random").  Blocks are never torn: each is entirely the last
      flushed content or entirely the latest written content.  The file is
      fsynced, the reply is {"ok":true,"kept":K,"dropped":D} (counts of
      unflushed blocks), then nbdkit is asked to shut down (unless
      "shutdown":false: then it keeps answering every request with EIO).
      Note (nbdkit 1.32): after nbdkit.shutdown() nbdkit itself answers the
      next request with ESHUTDOWN and drops that connection, but an idle
      client connection keeps nbdkit alive until the client goes away
      (the harness kills nbdkit by PID).

Blocks written back early (choice made for this harness): before the first
early write of a block its last *flushed* content is saved.  In mode
"flushed" that content is restored, so the backing file holds exactly the
flushed state and dropped data is never visible.  In mode "random" such
blocks count as "kept" (a real disk that wrote a block back keeps it) and
hold the latest cached content.
"""

import errno
import json
import os
import random
import socket
import threading

import nbdkit

API_VERSION = 2

cfg = {"file": None, "control": None, "blocksize": 4096}
lock = threading.Lock()  # NBD requests vs. the control thread
fd = -1
size = 0
cache = {}       # block index -> bytes (unflushed content)
undo = {}        # block index -> last flushed bytes, for early-written blocks
stats = {"flushes": 0, "writes": 0, "zeros": 0, "trims": 0, "fua": 0,
         "writebacks": 0}
crashed = False


# ---------------------------------------------------------------- config ---

def config(key, value):
    if key in ("file", "control"):
        cfg[key] = value
    elif key == "blocksize":
        bs = nbdkit.parse_size(value)
        if bs < 512 or bs & (bs - 1):
            raise ValueError("blocksize must be a power of 2 >= 512")
        cfg["blocksize"] = bs
    else:
        raise ValueError("unknown parameter %r" % key)


def config_complete():
    global fd, size
    if not cfg["file"] or not cfg["control"]:
        raise ValueError("file= and control= are required")
    fd = os.open(cfg["file"], os.O_RDWR)  # must exist
    size = os.fstat(fd).st_size


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def after_fork():
    # Threads must be started after nbdkit forks (-f avoids the fork, but
    # after_fork is called either way).
    try:
        os.unlink(cfg["control"])
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(cfg["control"])
    srv.listen(8)
    threading.Thread(target=control_loop, args=(srv,), daemon=True).start()


def cleanup():
    try:
        os.unlink(cfg["control"])
    except OSError:
        pass


# ----------------------------------------------------------- block cache ---

def blen(i):
    bs = cfg["blocksize"]
    return min(bs, size - i * bs)


def read_block(i):
    if i in cache:
        return cache[i]
    return os.pread(fd, blen(i), i * cfg["blocksize"])


def write_range(offset, data):
    """Store the bytes-like `data` at disk offset `offset` in the cache."""
    bs = cfg["blocksize"]
    mv = memoryview(data)
    pos = 0
    while pos < len(mv):
        i, boff = divmod(offset + pos, bs)
        n = min(blen(i) - boff, len(mv) - pos)
        if boff == 0 and n == blen(i):
            cache[i] = bytes(mv[pos:pos + n])
        else:
            b = bytearray(read_block(i))
            b[boff:boff + n] = mv[pos:pos + n]
            cache[i] = bytes(b)
        pos += n


def zero_range(offset, count):
    bs = cfg["blocksize"]
    zero = bytes(bs)  # shared object: zeroing a big range costs no memory
    end = offset + count
    pos = offset
    while pos < end:
        i, boff = divmod(pos, bs)
        n = min(blen(i) - boff, end - pos)
        if boff == 0 and n == blen(i):
            cache[i] = zero if n == bs else bytes(n)
        else:
            b = bytearray(read_block(i))
            b[boff:boff + n] = bytes(n)
            cache[i] = bytes(b)
        pos += n


def put_block(i, data):
    os.pwrite(fd, data, i * cfg["blocksize"])


def do_flush():
    for i in sorted(cache):
        put_block(i, cache[i])
    os.fsync(fd)
    cache.clear()
    undo.clear()
    stats["flushes"] += 1


def check_alive():
    if crashed:
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "disk lost power")


# ------------------------------------------------------- nbdkit callbacks ---

def open(readonly):
    return {}


def get_size(h):
    return size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_zero(h):
    return True


def can_trim(h):
    return True


def can_multi_conn(h):
    return True  # one global cache: a flush on any connection covers all


def pread(h, buf, offset, flags):
    with lock:
        check_alive()
        data = bytearray(os.pread(fd, len(buf), offset))
        if len(data) != len(buf):
            nbdkit.set_error(errno.EIO)
            raise OSError(errno.EIO, "short read")
        bs = cfg["blocksize"]
        for i in range(offset // bs, (offset + len(buf) - 1) // bs + 1):
            if i in cache:
                lo = max(offset, i * bs)
                hi = min(offset + len(buf), i * bs + blen(i))
                data[lo - offset:hi - offset] = \
                    cache[i][lo - i * bs:hi - i * bs]
        buf[:] = data


def pwrite(h, buf, offset, flags):
    with lock:
        check_alive()
        write_range(offset, buf)
        stats["writes"] += 1
        if flags & nbdkit.FLAG_FUA:
            stats["fua"] += 1
            do_flush()


def zero(h, count, offset, flags):
    with lock:
        check_alive()
        zero_range(offset, count)
        stats["zeros"] += 1
        if flags & nbdkit.FLAG_FUA:
            stats["fua"] += 1
            do_flush()


def trim(h, count, offset, flags):
    with lock:
        check_alive()
        zero_range(offset, count)
        stats["trims"] += 1
        if flags & nbdkit.FLAG_FUA:
            stats["fua"] += 1
            do_flush()


def flush(h, flags):
    with lock:
        check_alive()
        do_flush()


# -------------------------------------------------------- control channel ---

def op_stats(req):
    return dict(stats, cached=len(cache), early=len(undo), crashed=crashed)


def op_writeback(req):
    rng = random.Random(req.get("seed", 0))
    frac = float(req.get("fraction", 0.5))
    n = 0
    for i in sorted(cache):
        if rng.random() < frac:
            if i not in undo:
                undo[i] = os.pread(fd, blen(i), i * cfg["blocksize"])
            put_block(i, cache[i])
            n += 1
    stats["writebacks"] += n
    return {"written": n}


def op_crash(req):
    global crashed
    mode = req.get("mode", "flushed")
    if mode not in ("flushed", "random"):
        raise ValueError("mode must be 'flushed' or 'random'")
    crashed = True  # from now on every request fails
    rng = random.Random(req.get("seed", 0))
    frac = float(req.get("fraction", 0.5))
    kept = dropped = 0
    for i in sorted(cache):
        keep = mode == "random" and (i in undo or rng.random() < frac)
        if keep:
            put_block(i, cache[i])
            kept += 1
        else:
            if i in undo:
                put_block(i, undo[i])
            dropped += 1
    os.fsync(fd)
    cache.clear()
    undo.clear()
    return {"kept": kept, "dropped": dropped}


OPS = {"stats": op_stats, "writeback": op_writeback, "crash": op_crash}


def control_loop(srv):
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve_client, args=(conn,), daemon=True).start()


def serve_client(conn):
    with conn, conn.makefile("rwb") as f:
        for line in f:
            if not line.strip():
                continue
            shutdown = False
            try:
                req = json.loads(line)
                op = OPS[req["op"]]
                with lock:
                    if crashed and op is not op_stats:
                        raise RuntimeError("disk already crashed")
                    rep = dict(op(req), ok=True)
                shutdown = op is op_crash and req.get("shutdown", True)
            except Exception as e:  # report, keep serving
                rep = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
            f.write(json.dumps(rep).encode() + b"\n")
            f.flush()
            if shutdown:
                nbdkit.shutdown()
