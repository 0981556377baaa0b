"""The soak's ordered writer: a thread that writes stamped blocks
(tests/harness/stamps.py) to an NBD export at a steady rate, flushes now
and then, and keeps the log of what it issued, what was acknowledged and
what a completed flush covered.  A failed request is retried with the same
write id and content (reconnecting), so an interrupted write never leaves a
hole in the log.  The controller can pause it (around a restart of the
server) and rebase its log after a power cut.
"""
import random
import threading
import time
from array import array

import nbd
import numpy as np

from tests.harness.stamps import BLOCK, WriterLog, stamp


def connect(sock, export=""):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


def close_handle(h):
    try:
        h.shutdown()
    except nbd.Error:
        pass


class Writer(threading.Thread):
    def __init__(self, sock, nblocks, seed, tag, rate):
        super().__init__(name="soak-writer", daemon=True)
        self.sock, self.nblocks, self.tag, self.rate = sock, nblocks, tag, rate
        self.rnd = random.Random(seed)
        self.lw, self.lb = array("q"), array("q")    # (write id, block) pairs
        self.lock = threading.Lock()                 # the log and the counters
        self.gate = threading.Lock()                 # held around every NBD call
        self.want_pause = False
        self.stopping = threading.Event()
        self.abandon = threading.Event()
        self.h = None
        self.issued = self.acked = self.flushed = 0
        self.flushes = self.reconnects = self.errors = 0
        self.last_error = None
        self.failure = None

    # pausing: the controller holds the gate while the primary restarts
    def pause(self):
        self.want_pause = True
        self.gate.acquire()

    def resume(self):
        self.want_pause = False
        self.gate.release()

    def snapshot(self):
        with self.lock:
            wids = np.frombuffer(self.lw, np.int64).copy()
            blocks = np.frombuffer(self.lb, np.int64).copy()
            return WriterLog(wids, blocks, self.nblocks), self.issued, self.acked, self.flushed

    def rebase(self, vis):
        """After a power cut: the writes a block does not show (newer than
        what it shows) were lost and never happened; writes not yet
        acknowledged stay (they are retried as they are).  Returns how many
        (write, block) pairs were dropped."""
        with self.lock:
            w = np.frombuffer(self.lw, np.int64)
            b = np.frombuffer(self.lb, np.int64)
            keep = (w <= vis[b]) | (w > self.acked)
            lw, lb = array("q", w[keep].tobytes()), array("q", b[keep].tobytes())
            dropped = int((~keep).sum())
            del w, b
            self.lw, self.lb = lw, lb
            return dropped

    def _op(self, fn):
        """fn(handle) until it succeeds (reconnecting); False if abandoned."""
        while True:
            if self.want_pause:
                time.sleep(0.005)
                continue
            with self.gate:
                if not self.want_pause:
                    try:
                        if self.h is None:
                            self.h = connect(self.sock)
                            if self.issued:
                                self.reconnects += 1
                        fn(self.h)
                        return True
                    except nbd.Error as e:
                        self.errors += 1
                        self.last_error = str(e)
                        if self.h is not None:
                            close_handle(self.h)
                        self.h = None
            if self.abandon.is_set():
                return False
            time.sleep(0.05)

    def _flush(self):
        mark = self.acked
        if self._op(lambda h: h.flush()):
            with self.lock:
                self.flushed = max(self.flushed, mark)
                self.flushes += 1
            return True
        return False

    def run(self):
        try:
            self._run()
        except BaseException as e:      # noqa: B036 -- reported by the controller
            self.failure = repr(e)

    def _run(self):
        rnd = self.rnd
        t_next = time.monotonic()
        next_flush = rnd.randint(5, 100)
        while not self.stopping.is_set():
            n = rnd.choice((1, 1, 1, 1, 1, 2, 3, 4, 8))
            b0 = rnd.randrange(self.nblocks - n + 1)
            with self.lock:
                wid = self.issued + 1
                self.lw.extend([wid] * n)
                self.lb.extend(range(b0, b0 + n))
                self.issued = wid
            data = stamp(self.tag, wid, b0, n)
            # an interrupted write is retried as is: whether or not the first
            # try landed, the block ends up holding exactly this write
            if not self._op(lambda h: h.pwrite(data, b0 * BLOCK)):
                return
            with self.lock:
                self.acked = wid
            next_flush -= 1
            if next_flush <= 0:
                if not self._flush():
                    return
                next_flush = rnd.randint(5, 100)
            t_next += 1 / self.rate
            delay = t_next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                t_next = time.monotonic()
        self._flush()                   # load stops: everything acknowledged is flushed
        with self.gate:
            if self.h is not None:
                close_handle(self.h)
                self.h = None
