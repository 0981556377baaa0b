"""The fault proxy's delay mode (tests/harness/proxy.py), in this process
against an echo server, on a unix socket and on TCP: a tiny echo takes at
least the round trip (twice the one-way delay) and not much more, bytes
arrive in order, and a bulk transfer is not serialised to one chunk per
delay (what is in flight is sent on while earlier chunks wait)."""
import os
import socket
import threading
import time

import pytest

from tests.harness.proxy import CutProxy
from tests.harness.servers import wait_for

DELAY = 0.020
BULK = 16 << 20


def echo_server(address):
    """Listens on address; echoes every connection until it closes.
    Returns the listening socket (close it to stop)."""
    family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.bind(address)
    ls.listen(4)

    def serve(c):
        with c:
            while data := c.recv(1 << 16):
                c.sendall(data)

    def accept():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:          # closed: the test is over
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return ls


def recv_exactly(s, n):
    parts, got = [], 0
    while got < n:
        b = s.recv(min(1 << 20, n - got))
        assert b, f"closed after {got} of {n} bytes"
        parts.append(b)
        got += len(b)
    return b"".join(parts)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_delay_applies_each_way_without_serialising(tmp_path, kind):
    if kind == "unix":
        target, listen = str(tmp_path / "echo.sock"), str(tmp_path / "px.sock")
    else:
        target, listen = ("127.0.0.1", 0), ("127.0.0.1", 0)
    echo = echo_server(target)
    target = echo.getsockname()
    proxy = CutProxy(listen, target).start()
    try:
        proxy.delay(DELAY)
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        with socket.socket(family, socket.SOCK_STREAM) as c:
            c.connect(proxy.listen)
            rtts = []
            for i in range(5):
                t0 = time.monotonic()
                c.sendall(bytes([i]))
                assert recv_exactly(c, 1) == bytes([i])
                rtts.append(time.monotonic() - t0)
            assert min(rtts) >= 2 * DELAY, rtts
            assert min(rtts) < 2 * DELAY + 0.1, rtts
            data = os.urandom(BULK)
            sender = threading.Thread(target=c.sendall, args=(data,))
            t0 = time.monotonic()
            sender.start()
            back = recv_exactly(c, BULK)
            took = time.monotonic() - t0
            sender.join()
        assert back == data                      # in order, nothing lost
        # one 64 KiB chunk per delay would take BULK / 64 KiB * DELAY = 5 s
        assert took < 1.5, f"{BULK >> 20} MiB echoed in {took:.2f} s"
        # a chunk is counted once its send returned, which may be just after
        # the echo reached the client
        wait_for(lambda: proxy.bytes_down == BULK + 5, 5, "the proxy's count")
        assert proxy.bytes_up == proxy.bytes_down == BULK + 5
    finally:
        proxy.stop()
        echo.close()
