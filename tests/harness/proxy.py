"""A fault proxy for a unix-socket NBD link: pass-through that counts the
bytes each way and, on command, cuts every connection, stalls, throttles,
goes silent, or closes the link in the middle of a reply.

    with CutProxy(listen_path, target_path) as p:
        ...connect clients to listen_path...
        p.cut()              # drop every open connection (both sides)
        p.stall()            # hold all traffic ...
        p.resume()           # ... and let it flow again
        p.throttle(2 << 20)  # at most 2 MiB/s each way (None: unlimited)
        p.close_after(100)   # cut once 100 more bytes went server -> client
        p.silence()          # a partition: everything swallowed, nothing closed ...
        p.heal()             # ... until the path is back (see below)
        p.silence_on(b"x")   # silence() once a client sends bytes containing b"x"
        p.bytes_up           # client -> server bytes so far

Silence is what a partition, a firewall or NAT that lost the connection's
state, or a peer host that lost its power looks like from the ends: bytes
go out and nothing comes back, and no FIN or reset arrives either.  So
while silent the proxy reads and discards what either side sends (counted
in bytes_swallowed), passes on no close (an end that hangs up is not heard
by the other), and a connection made meanwhile is accepted and swallowed
too but never reaches the server (a SYN that gets no answer; the client
waits for the NBD greeting).  Unlike stall(), nothing swallowed is ever
delivered.

heal() brings the path back for new connections.  The ones that were open
during the silence stay dead, as after a partition that outlived the
connection's state (a NAT or firewall that forgot it, a peer host that
rebooted): the server's side is reset -- its TCP retransmits its unanswered
replies and meets a reset -- while the client's side is never answered
and never closed: a client waiting for a reply sends nothing, so nothing
tells it; only its own deadline can (TCP keepalive, off by default, would
take two hours).  The client's side is closed when the client closes it,
or by cut()/stop().  (A partition short enough for both ends to resume by
retransmission, state intact, is stall() instead.)  Swallowing -- rather
than leaving the bytes unread -- keeps the server's replies flowing out of
its socket, so a server never sits blocked on a send and holds no request
in flight when its side is reset.
"""
import os
import socket
import threading
import time


class _Conn:
    """One proxied connection: the client's socket, the server's (None when
    made during a silence) and whether it has been silenced."""

    def __init__(self, c, s, silent):
        self.c, self.s, self.silent = c, s, silent
        self.chunks_up = 0

    def close(self, server_only=False):
        for x in (self.s,) if server_only else (self.c, self.s):
            if x is None:
                continue
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()


class CutProxy:
    def __init__(self, listen, target):
        self.listen, self.target = str(listen), str(target)
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_swallowed = 0
        self.cuts = 0
        self.silences = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._rate = None
        self._close_down_at = None
        self._silent = False
        self._silence_on = None          # (pattern, chunks to let through first)
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
            with self._lock:
                silent = self._silent
            s = None
            if not silent:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(self.target)
                except OSError:
                    s.close()
                    c.close()
                    continue
            conn = _Conn(c, s, silent)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._pump, args=(conn, c, s, "bytes_up"),
                             daemon=True).start()
            if s is not None:
                threading.Thread(target=self._pump, args=(conn, s, c, "bytes_down"),
                                 daemon=True).start()

    def _swallowed(self, n):
        with self._lock:
            self.bytes_swallowed += n

    def _trigger(self, conn, data, tail):
        """silence_on: does this client chunk start the silence?"""
        armed = self._silence_on
        if armed is None:
            return False
        pattern, then = armed
        if conn.chunks_up < 0:
            conn.chunks_up += 1
            if conn.chunks_up == 0:
                self._silence_on = None
                return True
            return False
        if pattern in tail + data:
            if then == 0:
                self._silence_on = None
                return True
            conn.chunks_up = -then
        return False

    def _pump(self, conn, src, dst, counter):
        tail = b""
        try:
            while True:
                data = src.recv(1 << 16)
                if conn.silent:          # a FIN is swallowed too: dst hears nothing,
                    if not data:         # and src gets no FIN back (closed by cut/stop)
                        return
                    self._swallowed(len(data))
                    continue
                if not data:
                    break
                self._flowing.wait()
                if counter == "bytes_up" and self._trigger(conn, data, tail):
                    self.silence()
                tail = data[-256:]
                if conn.silent:
                    self._swallowed(len(data))
                    continue
                rate = self._rate
                if rate:                 # chunks of 1/50 s at the rate
                    step = max(1, rate // 50)
                    for i in range(0, len(data), step):
                        if conn.silent:  # silenced meanwhile: the rest is lost
                            self._swallowed(len(data) - i)
                            data = data[:i]
                            break
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
            if not conn.silent:
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
            c.close()

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

    def silence(self):
        """The link goes silent (see the module docstring): everything is
        swallowed both ways, nothing is closed, until heal()."""
        with self._lock:
            if self._silent:
                return
            self._silent = True
            self.silences += 1
            for c in self._conns:
                c.silent = True

    def silence_on(self, pattern, then=0):
        """silence() as soon as a client sends a chunk containing pattern
        (that chunk is swallowed), or with then=N, at the N-th chunk that
        client connection sends after it (e.g. the first request after the
        handshake that named an export)."""
        self._silence_on = (bytes(pattern), then)

    @property
    def silent(self):
        return self._silent

    def heal(self):
        """The path is back: new connections pass again; those open during
        the silence stay dead (see the module docstring): their server side
        is reset, their client side swallowed until the client closes it."""
        with self._lock:
            self._silent = False
            dead = [c for c in self._conns if c.silent]
        for c in dead:
            c.close(server_only=True)

    def stop(self):
        self._stop = True
        self._flowing.set()
        self._silent = False
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
