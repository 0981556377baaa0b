"""The transfer engine (replication/transport.py) against real nbdkit
servers on unix sockets: random extent lists copied and compared with an
independent byte model, what goes over the wire (nbdkit's log filter),
failing, read-only, dying and stalling targets, TLS-PSK and export-name
connections.  Every nbdkit is stopped by PID in a finalizer."""
import errno
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
import weakref

import nbd
import pytest

from replication import transport as T
from tests.conftest import NBDKIT

MiB = 1 << 20
SIZE = 64 * MiB


class Nbdkit:
    def __init__(self, proc, sock, log):
        self.proc, self.sock, self.log = proc, str(sock), log

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def open(self, **kw):
        return T.open_nbd(self.uri, **kw)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def listening(sock):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture
def nbdkit(tmp_path, request):
    """nbdkit(*args) starts `nbdkit -f -U SOCK *args` and waits until it
    accepts connections."""
    procs = []

    def stop_all():
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(1)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
    request.addfinalizer(stop_all)

    def start(*args):
        n = len(procs)
        sock = tmp_path / f"nbdkit{n}.sock"
        log = tmp_path / f"nbdkit{n}.log"
        with open(log, "wb") as logf:
            p = subprocess.Popen([NBDKIT, "-f", "-U", str(sock)] + [str(a) for a in args],
                                 stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        procs.append(p)
        deadline = time.monotonic() + 10
        while not listening(sock):      # (the socket exists from bind(), before listen())
            if p.poll() is not None:
                raise AssertionError(f"nbdkit {args} exited {p.returncode}: "
                                     + log.read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise AssertionError(f"nbdkit {args} did not start")
            time.sleep(0.01)
        return Nbdkit(p, sock, log)
    return start


def random_extents(rng, size, max_request):
    """Sorted, non-overlapping (offset, length, zero) with gaps, adjacent
    runs of both kinds, tiny and > max_request lengths."""
    exts = []
    off = 0
    while True:
        gap = rng.choice([0, 0, 0, rng.randrange(1, 4096), rng.randrange(1, 2 * MiB)])
        kind = rng.random()
        if kind < 0.3:
            length = rng.randrange(1, 4096)
        elif kind < 0.8:
            length = rng.randrange(1, 2 * max_request)
        else:
            length = rng.randrange(2 * max_request, 6 * max_request)
        off += gap
        if off + length > size:
            break
        exts.append((off, length, rng.random() < 0.35))
        off += length
    return exts


def model_apply(base, src, exts):
    want = bytearray(base)
    for off, length, zero in exts:
        want[off:off + length] = bytes(length) if zero else src[off:off + length]
    return bytes(want)


def expected_requests(exts, max_request, max_zero):
    """Independent count: merge touching runs of one kind, ceil-divide."""
    runs = []
    for off, length, zero in exts:
        if runs and runs[-1][2] == zero and runs[-1][0] + runs[-1][1] == off:
            runs[-1][1] += length
        else:
            runs.append([off, length, zero])
    return sum(-(-n // (max_zero if z else max_request)) for _, n, z in runs)


def fill(h, data):
    step = 16 * MiB
    for o in range(0, len(data), step):
        h.pwrite(data[o:o + step], o)


def read_all(h):
    size = h.get_size()
    return b"".join(h.pread(min(16 * MiB, size - o), o) for o in range(0, size, 16 * MiB))


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_extents_match_model(nbdkit, seed):
    rng = random.Random(seed)
    max_request = rng.choice([256 * 1024, 1 * MiB])
    max_in_flight = rng.choice([1, 3, 16])
    src_srv = nbdkit("memory", SIZE)
    dst_srv = nbdkit("memory", SIZE)
    src, dst = src_srv.open(), dst_srv.open()
    src_data = rng.randbytes(SIZE)
    dst_data = rng.randbytes(SIZE)
    fill(src, src_data)
    fill(dst, dst_data)
    exts = random_extents(rng, SIZE, max_request)
    assert any(z for *_, z in exts) and any(not z for *_, z in exts)

    seen = []
    stats = T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), iter(exts),
                           max_in_flight=max_in_flight, max_request=max_request,
                           progress=lambda d, t: seen.append((d, t)), progress_interval=0)
    assert read_all(dst) == model_apply(dst_data, src_data, exts)
    data = sum(n for _, n, z in exts if not z)
    zeroed = sum(n for _, n, z in exts if z)
    assert stats["bytes_read"] == stats["bytes_written"] == data
    assert stats["bytes_zeroed"] == zeroed
    assert stats["requests"] == expected_requests(exts, max_request, T.MAX_ZERO_REQUEST)
    assert seen[-1] == (data + zeroed, data + zeroed)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert src.aio_in_flight() == 0 and dst.aio_in_flight() == 0


def test_file_source_to_file_target_without_zero(nbdkit, tmp_path):
    """FileSource (pread) -> `nbdkit file` behind the nozero filter: zero
    extents become writes of zero buffers; the target file is checked
    directly after the final flush."""
    rng = random.Random(7)
    size = 16 * MiB
    src_data, dst_data = rng.randbytes(size), rng.randbytes(size)
    (tmp_path / "src.img").write_bytes(src_data)
    (tmp_path / "dst.img").write_bytes(dst_data)
    srv = nbdkit("--filter=nozero", "file", tmp_path / "dst.img")
    h = srv.open()
    dst = T.NbdTarget(h)
    assert not dst.can_zero()
    exts = random_extents(rng, size, 1 * MiB)
    with T.FileSource(tmp_path / "src.img") as src:
        stats = T.copy_extents(src, dst, exts, max_request=1 * MiB, max_in_flight=8)
    assert (tmp_path / "dst.img").read_bytes() == model_apply(dst_data, src_data, exts)
    data = sum(n for _, n, z in exts if not z)
    zeroed = sum(n for _, n, z in exts if z)
    assert stats["bytes_read"] == data
    assert stats["bytes_written"] == data + zeroed
    assert stats["bytes_zeroed"] == zeroed
    assert stats["requests"] == expected_requests(exts, 1 * MiB, 1 * MiB)


def _log_requests(log, kind):
    """(offset, count) of each `kind` request in an nbdkit log filter file."""
    pat = re.compile(rf"{kind} id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)")
    return [(int(m.group(1), 16), int(m.group(2), 16))
            for m in pat.finditer(open(log).read())]


def test_wire_bytes_match_extents(nbdkit, tmp_path):
    """The source only sees reads of the data extents, the target only
    writes of them plus one payload-free zero request per zero run."""
    slog, dlog = tmp_path / "src.reqlog", tmp_path / "dst.reqlog"
    s = nbdkit("--filter=log", "memory", SIZE, f"logfile={slog}")
    d = nbdkit("--filter=log", "memory", SIZE, f"logfile={dlog}")
    src, dst = s.open(), d.open()
    exts = [(0, 5 * MiB, False), (5 * MiB, 3 * MiB, True), (8 * MiB, 100, True),
            (9 * MiB, 4097, False), (9 * MiB + 4097, 1, False), (20 * MiB, 40 * MiB, True),
            (60 * MiB, 1 * MiB, False)]
    stats = T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), exts, max_request=2 * MiB)
    del src, dst        # disconnect: the logs are complete
    data = 5 * MiB + 4098 + 1 * MiB
    assert stats["bytes_read"] == stats["bytes_written"] == data
    assert stats["bytes_zeroed"] == 3 * MiB + 100 + 40 * MiB
    reads = _log_requests(slog, "Read")
    writes = _log_requests(dlog, "Write")
    zeroes = _log_requests(dlog, "Zero")
    assert _log_requests(slog, "Write") == [] and _log_requests(slog, "Zero") == []
    assert sum(n for _, n in reads) == data and sorted(reads) == sorted(writes)
    assert max(n for _, n in writes) <= 2 * MiB
    # 5 MiB at 0 -> 3 writes; the two touching runs at 9 MiB -> 1; 60 MiB -> 1
    assert len(writes) == 5
    # the touching zero runs at 5 MiB and 8 MiB are coalesced
    assert sorted(zeroes) == [(5 * MiB, 3 * MiB + 100), (20 * MiB, 40 * MiB)]
    assert stats["requests"] == len(writes) + len(zeroes)
    assert len(re.findall(r"connection=\d+ Flush id=", open(dlog).read())) == 1


def test_zero_only_reads_nothing(nbdkit):
    s, d = nbdkit("memory", SIZE), nbdkit("memory", SIZE)
    src, dst = s.open(), d.open()
    fill(dst, b"\xff" * SIZE)
    stats = T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), [(0, SIZE, True)])
    assert stats == dict(stats, bytes_read=0, bytes_written=0, bytes_zeroed=SIZE, requests=1)
    assert dst.pread(MiB, SIZE - MiB) == bytes(MiB)


@pytest.mark.parametrize("args", [["--filter=error", "memory", SIZE, "error-pwrite-rate=1"],
                                  ["-r", "memory", SIZE]])
def test_failing_target_raises(nbdkit, args):
    s, d = nbdkit("memory", SIZE), nbdkit(*args)
    src, dst = s.open(), d.open()
    t = time.monotonic()
    with pytest.raises(T.TransportError) as ei:
        T.copy_extents(T.NbdSource(src), T.NbdTarget(dst),
                       [(0, 20 * MiB, False), (30 * MiB, MiB, True)], max_request=MiB)
    assert time.monotonic() - t < 5
    assert ei.value.offset is not None and f"offset {ei.value.offset}" in str(ei.value)
    assert ei.value.errno in (5, 1)     # EIO from the server, EPERM from libnbd
    # drained: nothing left in flight, the handles stay usable
    assert src.aio_in_flight() == 0 and dst.aio_in_flight() == 0
    assert len(dst.pread(10, 0)) == 10
    # and the error keeps no reference cycle holding them (open connections)
    refs = [weakref.ref(src), weakref.ref(dst)]
    del ei, src, dst
    assert [r() for r in refs] == [None, None]


def test_failing_source_midway(nbdkit):
    """Reads fail now and then: the first error is reported and the
    in-flight requests are drained before it is raised."""
    s = nbdkit("--filter=error", "memory", SIZE, "error-pread-rate=0.2")
    d = nbdkit("memory", SIZE)
    src, dst = s.open(), d.open()
    with pytest.raises(T.TransportError, match=r"read of \d+ bytes at offset \d+ failed: "
                                               r"Input/output error"):
        T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), [(0, SIZE, False)],
                       max_request=256 * 1024, max_in_flight=8)
    assert src.aio_in_flight() == 0 and dst.aio_in_flight() == 0


def test_target_dies_midway(nbdkit):
    s = nbdkit("memory", SIZE)
    d = nbdkit("--filter=delay", "memory", SIZE, "wdelay=20ms")
    src, dst = s.open(), d.open()
    threading.Timer(0.3, d.kill).start()
    t = time.monotonic()
    with pytest.raises(T.TransportError) as ei:
        T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), [(0, SIZE, False)],
                       max_request=256 * 1024, max_in_flight=4)
    assert time.monotonic() - t < 10
    assert "offset" in str(ei.value)
    assert dst.aio_is_dead() or dst.aio_is_closed()
    del ei      # pytest.raises' ExceptionInfo <-> this frame: a reference cycle


def test_stall_timeout(nbdkit):
    s = nbdkit("memory", SIZE)
    d = nbdkit("--filter=delay", "memory", SIZE, "wdelay=30")
    src, dst = s.open(), d.open()
    t = time.monotonic()
    with pytest.raises(T.TransportError, match="no request completed"):
        T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), [(0, MiB, False)],
                       stall_timeout=0.5)
    assert time.monotonic() - t < 5
    d.kill()


def paused(nbdkit, tmp_path):
    """An nbdkit that completes handshakes but leaves every request
    unanswered (the pause filter, paused): a hung server.  (Not the delay
    filter: it wakes up when the client goes and replies, and nbdkit 1.32.5
    may then abort, connections.c:402.)"""
    ctl = tmp_path / f"pause{time.monotonic_ns()}.sock"
    srv = nbdkit("--filter=pause", "memory", SIZE, f"pause-control={ctl}")
    deadline = time.monotonic() + 10
    while not ctl.exists():
        assert time.monotonic() < deadline, "no pause control socket"
        time.sleep(0.01)
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(str(ctl))
    c.sendall(b"p")
    assert c.recv(1) == b"P"
    c.close()
    return srv


def test_hung_source_times_out(nbdkit, tmp_path):
    """A source server that stops answering (a hung primary): the copy
    fails with ETIMEDOUT after the stall timeout, and both handles close at
    once although the source still owns reads."""
    s = paused(nbdkit, tmp_path)
    d = nbdkit("memory", SIZE)
    src, dst = s.open(), d.open()
    t = time.monotonic()
    with pytest.raises(T.TransportError, match="no request completed") as ei:
        T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), [(0, 4 * MiB, False)],
                       stall_timeout=0.5)
    assert ei.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - t < 5
    assert src.aio_in_flight() > 0
    t = time.monotonic()
    T.close_nbd(src)
    T.close_nbd(dst)
    assert time.monotonic() - t < 1.5
    del ei
    s.kill()


def test_sync_exchanges_have_deadlines(nbdkit, tmp_path):
    """pread/pwrite/flush of the module time out on a server that does not
    answer (libnbd's own h.pread etc. would wait forever), close_nbd never
    waits for it, and on a live server they just work."""
    d = paused(nbdkit, tmp_path)
    calls = {"pread": lambda h: T.pread(h, 4096, 0, 0.5),
             "pwrite": lambda h: T.pwrite(h, b"x" * 4096, 0, 0.5)}   # (flush: not paused)
    for name, call in calls.items():
        h = d.open()
        t = time.monotonic()
        with pytest.raises(T.TransportError, match="the peer does not answer") as ei:
            call(h)
        assert ei.value.errno == errno.ETIMEDOUT, name
        assert 0.4 < time.monotonic() - t < 3, name
        t = time.monotonic()
        T.close_nbd(h)                  # a request in flight: closed at once
        assert time.monotonic() - t < 0.5, name
        with pytest.raises((AttributeError, getattr(nbd, "ClosedHandle", AttributeError))):
            h.get_size()                # closed (1.14: the capsule is gone)
        del ei
    s = nbdkit("memory", SIZE)
    h = s.open()
    T.pwrite(h, b"abc" * 1000, 4096)
    T.flush(h)
    assert T.pread(h, 3000, 4096) == b"abc" * 1000
    t = time.monotonic()
    T.close_nbd(h)                      # idle: a polite disconnect, answered
    assert time.monotonic() - t < 1


@pytest.mark.slow
def test_abandoned_handles_free_their_buffers(nbdkit, tmp_path):
    """Handles closed with requests (and their buffers) in flight release
    them: no crash, no growth over 30 rounds."""
    import gc
    import tracemalloc
    d = paused(nbdkit, tmp_path)
    tracemalloc.start()
    try:
        base = None
        for i in range(30):
            h = d.open()
            for k in range(4):
                h.aio_pread(memoryview(bytearray(MiB)), k * MiB, lambda err: 1)
            with pytest.raises(T.TransportError):
                T.pread(h, MiB, 8 * MiB, 0.05)
            T.close_nbd(h)
            del h
            gc.collect()
            if i == 4:
                base = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 2 * MiB, f"{grown} bytes retained after 25 abandoned handles"
    d.kill()


class _Counter:
    """Peak number of requests and data bytes outstanding (a request is
    reading, or writing/zeroing)."""
    n = bytes = peak_n = peak_bytes = 0

    def add(self, n, b):
        self.n += n
        self.bytes += b
        self.peak_n = max(self.peak_n, self.n)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def wrap(self, done, b, keep=False):
        def cb(err):
            if not keep or err:     # a read's request lives on in its write
                self.add(-1, -b)
            done(err)
        return cb


class _CountingSource:
    def __init__(self, src, c):
        self.src, self.c, self.handles, self.size = src, c, src.handles, src.size

    def start_read(self, buf, off, done):
        self.c.add(1, len(buf))
        self.src.start_read(buf, off, self.c.wrap(done, len(buf), keep=True))


class _CountingTarget:
    def __init__(self, dst, c):
        self.dst, self.c, self.handles, self.size = dst, c, dst.handles, dst.size
        self.can_zero, self.flush = dst.can_zero, dst.flush

    def start_write(self, buf, off, done):
        self.dst.start_write(buf, off, self.c.wrap(done, len(buf)))

    def start_zero(self, n, off, done):
        self.c.add(1, 0)
        self.dst.start_zero(n, off, self.c.wrap(done, 0))


@pytest.mark.parametrize("blk,max_in_flight,max_bytes", [(64 * 1024, 64, 1 * MiB),
                                                         (64 * 1024, 8, 16 * MiB),
                                                         (MiB, 64, 4 * MiB)])
def test_in_flight_bounds(nbdkit, blk, max_in_flight, max_bytes):
    s = nbdkit("memory", SIZE)
    d = nbdkit("-t", "128", "--filter=delay", "memory", SIZE, "wdelay=2ms", "delay-zero=2ms")
    src, dst = s.open(), d.open()
    exts = [(o, blk, (o // (2 * blk)) % 5 == 4) for o in range(0, 32 * MiB, 2 * blk)]
    c = _Counter()
    T.copy_extents(_CountingSource(T.NbdSource(src), c), _CountingTarget(T.NbdTarget(dst), c),
                   exts, max_in_flight=max_in_flight, max_bytes_in_flight=max_bytes,
                   max_request=MiB)
    assert c.n == 0 and c.bytes == 0
    assert c.peak_n <= max_in_flight and c.peak_bytes <= max_bytes
    # the bounds are reached, not just respected
    assert c.peak_n == max_in_flight or c.peak_bytes > max_bytes - blk


def test_buffers_are_freed_after_copies(nbdkit):
    """Repeated copies do not accumulate buffers (python3-libnbd 1.14 leaks
    nbd.Buffer objects passed to aio calls; the engine must not use them)."""
    import gc
    import tracemalloc
    s, d = nbdkit("memory", SIZE), nbdkit("memory", SIZE)
    src, dst = s.open(), d.open()
    exts = [(0, 16 * MiB, False), (16 * MiB + 1, 3 * MiB + 7, False)]
    T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), exts)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(5):
            T.copy_extents(T.NbdSource(src), T.NbdTarget(dst), exts)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 1 * MiB, f"{grown} bytes retained after 5 copies"


def test_bad_extents_rejected():
    with pytest.raises(ValueError):
        T.plan_requests([(10, 10, False), (15, 10, False)], MiB, MiB)
    with pytest.raises(ValueError):
        T.plan_requests([(10, 10, False), (0, 5, False)], MiB, MiB)
    assert T.plan_requests([(0, 3, False), (3, 3, False), (6, 3, True), (9, 0, False),
                            (9, 5, True)], 4, 100) == [(0, 4, False), (4, 2, False), (6, 8, True)]
    with pytest.raises(ValueError):
        T.copy_extents(T.NullTarget(10), T.NullTarget(10), [(5, 10, False)])


def test_null_target_and_file_source(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(os.urandom(3 * MiB))
    with T.FileSource(p) as src:
        st = T.copy_extents(src, T.NullTarget(), [(0, 3 * MiB, False)], max_request=MiB)
        assert st["bytes_read"] == 3 * MiB and st["requests"] == 3
        src._size = 4 * MiB       # pretend the file shrank under us
        with pytest.raises(T.TransportError, match="short read"):
            T.copy_extents(src, T.NullTarget(), [(0, 4 * MiB, False)], max_request=MiB)


def test_open_errors_and_export_override(nbdkit, tmp_path):
    with pytest.raises(T.TransportError, match=r"nope\.sock.*No such file"):
        T.open_nbd(f"nbd+unix:///?socket={tmp_path}/nope.sock")
    info = nbdkit("info", "mode=exportname")
    with pytest.raises(T.TransportError, match="TLS") as ei:
        T.open_nbd(info.uri, tls_psk_file=__file__)
    # the failed handle is not kept (open) by the exception's frames
    tb = ei.value.__traceback__.tb_next      # skip this test's own frame
    while tb:
        assert not any(isinstance(v, nbd.NBD) for v in tb.tb_frame.f_locals.values())
        tb = tb.tb_next
    del tb, ei
    with pytest.raises(T.TransportError, match="unknown NBD URI scheme"):
        T.open_nbd("bogus://x")
    h = T.open_nbd(f"nbd+unix:///fromuri?socket={info.sock}", export="over ride/x")
    assert h.pread(h.get_size(), 0) == b"over ride/x"
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h = T.open_nbd(f"nbd+unix:///fromuri?socket={info.sock}", meta_context=True)
    assert h.pread(h.get_size(), 0) == b"fromuri"
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h = T.open_nbd(info.uri, export="x", meta_context=True)
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    strict = nbdkit("--filter=exportname", "memory", MiB, "exportname-strict=true",
                    "exportname=good")
    h = T.open_nbd(strict.uri, export="good")
    assert h.get_size() == MiB
    with pytest.raises(T.TransportError, match=r"'bad'.*refused the export"):
        T.open_nbd(strict.uri, export="bad")


def test_tls_psk(nbdkit, tmp_path):
    psk = tmp_path / "keys.psk"
    psk.write_text(f"alice:{os.urandom(32).hex()}\n")
    psk.chmod(0o600)
    srv = nbdkit("--tls=require", f"--tls-psk={psk}", "memory", MiB)
    h = T.open_nbd(srv.uri, tls_psk_file=str(psk), tls_username="alice")
    assert h.get_tls_negotiated()
    h = T.open_nbd(f"nbds+unix://alice@/?socket={srv.sock}&tls-psk-file={psk}")
    assert h.get_tls_negotiated()
    with pytest.raises(T.TransportError, match="TLS"):
        T.open_nbd(srv.uri)
    with pytest.raises(T.TransportError, match="bob"):
        T.open_nbd(srv.uri, tls_psk_file=str(psk), tls_username="bob")


def test_connect_timeout(tmp_path):
    """A server that accepts but never speaks."""
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(str(tmp_path / "mute.sock"))
    ls.listen(1)
    try:
        t = time.monotonic()
        with pytest.raises(T.TransportError, match="timed out"):
            T.open_nbd(f"nbd+unix:///?socket={tmp_path}/mute.sock", connect_timeout=0.3)
        assert time.monotonic() - t < 3
    finally:
        ls.close()
