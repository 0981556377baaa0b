"""A fault proxy for an NBD link: pass-through that counts the bytes each
way and, on command, cuts every connection, stalls, throttles, delays, goes
silent, or closes the link in the middle of a reply.

    with CutProxy(listen_path, target_path) as p:       # unix sockets
    CutProxy(("198.18.0.2", 10810), ("198.18.0.2", 10809), netns="NS")   # TCP, in
                             # network namespace NS (`ip netns`), from this process
        ...connect clients to listen_path...
        p.cut()              # drop every open connection (both sides)
        p.stall()            # hold all traffic ...
        p.resume()           # ... and let it flow again
        p.throttle(2 << 20)  # at most 2 MiB/s each way (None: unlimited)
        p.delay(0.020)       # every byte arrives 20 ms after it was sent, each way
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

Delay is a WAN's one-way latency: a chunk read from one end is stamped and
queued, and a sender thread of that direction forwards it when its time
has come, in order.  Many chunks are on their way at once, so throughput
is what the ends keep in flight divided by the round trip (at most
DELAY_QUEUE bytes wait per direction: then the reader blocks and TCP holds
the sender back, as a full pipe would).  A connection that saw a delay
keeps its queue; delay(0) makes later chunks leave at once, behind the
queued ones.  stall() holds what is read from then on; what a delay
already queued still arrives.
"""
import collections
import ctypes
import os
import socket
import threading
import time

CLONE_NEWNET = 0x40000000
DELAY_QUEUE = 8 << 20


def enter_netns(name):
    """Moves the calling thread (only it) into the network namespace that
    `ip netns add NAME` made; sockets it creates then live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{name}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns into network namespace {name}: {os.strerror(e)}")


def _socket(address):
    """A stream socket for address: a (host, port) tuple is TCP (no Nagle:
    the proxy must not add latency of its own), anything else a unix path."""
    if isinstance(address, tuple):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


class _Delayed:
    """One direction of a connection in delay mode: chunks stamped with the
    time they may leave, forwarded in order by a thread of its own."""

    def __init__(self, proxy, conn, src, dst, counter):
        self.proxy, self.conn, self.src, self.dst, self.counter = proxy, conn, src, dst, counter
        self.chunks = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._send, daemon=True).start()

    def put(self, at, data):
        """Queues data to leave at `at` (None: the end, after the rest)."""
        with self.cond:
            while data and self.queued >= DELAY_QUEUE:
                self.cond.wait()
            self.chunks.append((at, data))
            self.queued += len(data or b"")
            self.cond.notify_all()

    def _get(self):
        with self.cond:
            while not self.chunks:
                self.cond.wait()
            at, data = self.chunks.popleft()
            self.queued -= len(data or b"")
            self.cond.notify_all()
            return at, data

    def _send(self):
        ok = True
        while True:
            at, data = self._get()
            if data is None:
                break
            if not ok:           # the link broke: drain, so the reader never blocks
                continue
            wait = at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if self.conn.silent:
                self.proxy._swallowed(len(data))
                continue
            try:
                ok = self.proxy._forward(self.conn, data, self.dst, self.counter)
            except OSError:
                ok = False
            if not ok:           # wakes the reader, which ends the queue
                self.proxy._hang_up(self.conn, self.src, self.dst)
        if ok:
            self.proxy._hang_up(self.conn, self.src, self.dst)


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
    def __init__(self, listen, target, netns=None):
        """listen, target: unix socket paths, or (host, port) for TCP (a
        listen port 0 picks a free one: see .listen once started); netns:
        the network namespace both live in (None: this process's)."""
        self.listen, self.target = (a if isinstance(a, tuple) else str(a)
                                    for a in (listen, target))
        self.netns = netns
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_swallowed = 0
        self.cuts = 0
        self.silences = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._rate = None
        self._delay = 0.0
        self._close_down_at = None
        self._silent = False
        self._silence_on = None          # (pattern, chunks to let through first)
        self._lock = threading.Lock()
        self._conns = []
        self._stop = False

    def start(self):
        """Listens (in the namespace, from the accept thread, which stays
        there and also makes the connections to the target)."""
        ready, failed = threading.Event(), []
        self.thread = threading.Thread(target=self._accept, args=(ready, failed), daemon=True)
        self.thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        return self

    def _listen(self):
        if self.netns:
            enter_netns(self.netns)
        self.sock = _socket(self.listen)
        if isinstance(self.listen, tuple):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        elif os.path.exists(self.listen):
            os.unlink(self.listen)
        self.sock.bind(self.listen)
        self.sock.listen(16)
        if isinstance(self.listen, tuple):
            self.listen = self.sock.getsockname()    # port 0: the one it got

    def _accept(self, ready, failed):
        try:
            self._listen()
        except OSError as e:
            failed.append(e)
            return
        finally:
            ready.set()
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if isinstance(self.listen, tuple):
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                silent = self._silent
            s = None
            if not silent:
                s = _socket(self.target)
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
        later = None                     # this direction's _Delayed, once delayed
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
                delay = self._delay
                if delay and later is None:
                    later = _Delayed(self, conn, src, dst, counter)
                if later is not None:
                    later.put(time.monotonic() + delay, data)
                elif not self._forward(conn, data, dst, counter):
                    break
        except OSError:
            pass
        finally:
            if later is not None:
                later.put(None, None)    # it hangs up once the queue is through
            else:
                self._hang_up(conn, src, dst)

    def _forward(self, conn, data, dst, counter):
        """Sends data on (throttled, or cut mid-reply by close_after) and
        counts it; False when the connection is to end."""
        rate = self._rate
        if rate:                         # chunks of 1/50 s at the rate
            step = max(1, rate // 50)
            for i in range(0, len(data), step):
                if conn.silent:          # silenced meanwhile: the rest is lost
                    self._swallowed(len(data) - i)
                    data = data[:i]
                    break
                dst.sendall(data[i:i + step])
                time.sleep(len(data[i:i + step]) / rate)
        elif counter == "bytes_down" and self._close_down_at is not None:
            with self._lock:
                room = self._close_down_at - self.bytes_down
            if room < len(data):         # mid-reply: part of it, then cut
                dst.sendall(data[:max(room, 0)])
                self._close_down_at = None
                self.cut()
                return False
            dst.sendall(data)
        else:
            dst.sendall(data)
        with self._lock:
            setattr(self, counter, getattr(self, counter) + len(data))
        return True

    @staticmethod
    def _hang_up(conn, src, dst):
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

    def delay(self, seconds):
        """Each direction's data arrives `seconds` after it was read (a
        one-way latency; the round trip is twice it); 0 lifts it."""
        self._delay = float(seconds)

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
        self.sock.close()
        if not isinstance(self.listen, tuple):
            try:
                os.unlink(self.listen)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
