"""Readiness for systemd (replication/notify.py, Server.announce_ready):
datagrams to $NOTIFY_SOCKET (a path or an abstract @name), nothing without
it, and READY=1 from a server only once its control socket answered."""
import json
import os
import socket
import threading
from types import SimpleNamespace

import pytest

from replication import control, notify
from replication.errors import NotRunningError
from replication.server import Server


@pytest.fixture
def listener(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's; returns recv()."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)

    def recv(timeout=5):
        s.settimeout(timeout)
        return s.recv(4096).decode()
    yield recv
    s.close()


def test_a_path_and_an_abstract_name(listener, monkeypatch):
    assert notify.send("READY=1", "STATUS=up")
    assert listener() == "READY=1\nSTATUS=up"
    name = f"prepl-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.send("STOPPING=1")
        assert s.recv(4096) == b"STOPPING=1"


def test_nothing_without_notify_socket_and_no_raise_on_a_bad_one(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.wanted() and not notify.send("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert not notify.send("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "relative")
    assert not notify.send("READY=1")


def _server_on(path):
    srv = Server()
    srv.tracker = SimpleNamespace(sd=SimpleNamespace(control_socket=path))
    srv.uri = "nbd+unix:///?socket=/x"
    return srv


def test_ready_only_once_the_control_socket_answers(listener, tmp_path):
    path = str(tmp_path / "control.sock")
    srv = _server_on(path)
    with pytest.raises(NotRunningError):          # no control socket: no READY=1
        srv.announce_ready(timeout=1)
    with pytest.raises(socket.timeout):
        listener(0.2)
    sock = control.listen_private(path)
    answered = []

    def answer():
        conn, _ = sock.accept()
        with conn, conn.makefile("rwb") as f:
            answered.append(json.loads(f.readline()))
            f.write(json.dumps({"ok": True, "result": {"volume": "/v", "role": "primary"}})
                    .encode() + b"\n")
    t = threading.Thread(target=answer)
    t.start()
    try:
        srv.announce_ready(timeout=5)
    finally:
        t.join(5)
        sock.close()
    assert answered == [{"op": "status"}]
    got = listener().split("\n")
    assert got[0] == "READY=1" and f"MAINPID={os.getpid()}" in got and \
        "STATUS=serving /v (primary) at nbd+unix:///?socket=/x" in got
