"""A fault proxy for a unix-socket NBD link: pass-through that counts the
bytes each way and, on command, cuts every connection, stalls, throttles,
or closes the link in the middle of a reply.

    with CutProxy(listen_path, target_path) as p:
        ...connect clients to listen_path...
        p.cut()              # drop every open connection (both sides)
        p.stall()            # hold all traffic ...
        p.resume()           # ... and let it flow again
        p.throttle(2 << 20)  # at most 2 MiB/s each way (None: unlimited)
        p.close_after(100)   # cut once 100 more bytes went server -> client
        p.bytes_up           # client -> server bytes so far
"""
import os
import socket
import threading
import time


class CutProxy:
    def __init__(self, listen, target):
        self.listen, self.target = str(listen), str(target)
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuts = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._rate = None
        self._close_down_at = None
        self._lock = threading.Lock()
        self._conns = []
        self._stop = False

    def start(self):
        if os.path.exists(self.listen):
            os.unlink(self.listen)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.listen)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return self

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.target)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, s]
            threading.Thread(target=self._pump, args=(c, s, "bytes_up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, "bytes_down"), daemon=True).start()

    def _pump(self, src, dst, counter):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                self._flowing.wait()
                rate = self._rate
                if rate:                 # chunks of 1/50 s at the rate
                    step = max(1, rate // 50)
                    for i in range(0, len(data), step):
                        dst.sendall(data[i:i + step])
                        time.sleep(len(data[i:i + step]) / rate)
                elif counter == "bytes_down" and self._close_down_at is not None:
                    with self._lock:
                        room = self._close_down_at - self.bytes_down
                    if room < len(data):          # mid-reply: part of it, then cut
                        dst.sendall(data[:max(room, 0)])
                        self._close_down_at = None
                        self.cut()
                        break
                    dst.sendall(data)
                else:
                    dst.sendall(data)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        """Drops every open connection, like a link going down."""
        with self._lock:
            conns, self._conns = self._conns, []
            self.cuts += 1
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def stall(self):
        """Holds all traffic (connections stay open) until resume()."""
        self._flowing.clear()

    def resume(self):
        self._flowing.set()

    def throttle(self, bytes_per_second):
        """Limits each direction of each connection; None lifts the limit."""
        self._rate = bytes_per_second

    def close_after(self, nbytes):
        """Cuts every connection once nbytes more went server -> client (the
        last reply is delivered only in part)."""
        with self._lock:
            self._close_down_at = self.bytes_down + nbytes

    def stop(self):
        self._stop = True
        self._flowing.set()
        self.cut()
        try:
            self.sock.close()
            os.unlink(self.listen)
        except OSError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
