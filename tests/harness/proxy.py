"""A fault proxy for a unix-socket NBD link: pass-through that counts the
bytes each way and can cut every connection on command.

    with CutProxy(listen_path, target_path) as p:
        ...connect clients to listen_path...
        p.cut()            # drop every open connection (both sides)
        p.bytes_up         # client -> server bytes so far
"""
import os
import socket
import threading


class CutProxy:
    def __init__(self, listen, target):
        self.listen, self.target = str(listen), str(target)
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuts = 0
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

    def stop(self):
        self._stop = True
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
