"""Failover, failback and migration between two hosts: two network
namespaces joined by a veth pair (tests/harness/netns.py), each node's
server on its host's address, TCP with the pair's TLS-PSK, in every role
(the README's "Two machines"): the application's and the agent's
connections to the local primary and the other host's agent all use the
same key.  Every command runs in its host's namespace."""
import json
import os
import time

import pytest

from replication import divergence, writeclock
from tests.conftest import ENV, PREPL, REPO, prepl
from tests.harness.netns import TwoHosts

pytestmark = pytest.mark.slow

SIZE = 16 << 20
PORT = 10809


@pytest.fixture
def hosts(tmp_path):
    with TwoHosts("th") as net:
        yield net


class Node:
    def __init__(self, net, host, tmp_path, key):
        self.net, self.host, self.key = net, host, key
        self.state = str(tmp_path / f"state-{host}")
        self.uri = f"nbds://{net.addr[host]}:{PORT}"

    def prepl(self, *args, check=True):
        return self.net.run(self.host, PREPL + list(args), check=check, env=ENV, cwd=REPO)

    def serve(self):
        return self.prepl("serve", self.state, "--port", PORT, "--bind", self.net.addr[self.host],
                          "--tls-psk", self.key, "--background")

    def stop(self):
        self.prepl("stop", self.state, check=False)

    def io(self, host, *args):
        """tests/harness/nbdio.py on this node's export, run on host."""
        r = self.net.run(host, [PREPL[0], "-m", "tests.harness.nbdio", *args[:1], self.uri,
                                "--tls-psk", self.key, *args[1:]], env=ENV, cwd=REPO)
        return json.loads(r.stdout)

    def digest(self, host=None):
        return self.io(host or self.host, "digest")

    def write(self, seed, count=10):
        return self.io(self.host, "write", "--seed", seed, "--count", count)["blocks"]

    def agent(self, peer, *extra, check=True):
        return self.prepl("agent", self.state, "--secondary", peer.uri, "--tls-psk", self.key,
                          "--once", "--timeout", "60", *extra, check=check)


def test_failover_failback_migrate_across_hosts(tmp_path, hosts):
    key = str(tmp_path / "pair.psk")
    prepl("keygen", key)
    a, b = Node(hosts, "a", tmp_path, key), Node(hosts, "b", tmp_path, key)
    prepl("init", a.state, "--volume", a.state + ".img", "--size", str(SIZE))
    prepl("init", b.state, "--volume", b.state + ".img", "--size", str(SIZE), "--role",
          "secondary")
    try:
        a.serve()
        b.serve()
        a.write(1)
        a.agent(b)
        assert b.digest()["sha256"] == a.digest()["sha256"]
        # the wrong key, a wrong address: refused with the remedy, nothing sent
        other = str(tmp_path / "other.psk")
        prepl("keygen", other)
        r = a.prepl("agent", a.state, "--secondary", b.uri, "--tls-psk", other, "--once",
                    "--timeout", "10", check=False)
        assert r.returncode == 5 and "is not the secondary's key" in r.stderr, r.stderr
        # the primary dies; failover on b, checking a over the link
        a.write(2)
        a.stop()
        time.sleep(writeclock.PERIOD + divergence.CLOCK_MARGIN + 0.5)   # a's writes: before
        r = b.prepl("failover", b.state, "--peer", a.uri, "--tls-psk", key)
        assert "does not answer" in r.stderr
        b.write(3)
        # a comes back: its probe reaches b over TLS and finds it promoted
        a.serve()
        assert a.digest()["read_only"] is True
        st = json.loads(a.prepl("status", a.state, "--json").stdout)
        assert st["superseded"]["by_uri"] == b.uri
        r = a.prepl("failback", a.state, "--peer", b.uri, "--tls-psk", key)
        b.agent(a)
        assert a.digest()["sha256"] == b.digest()["sha256"]
        # the reverse direction over the same key: b writes, cycles to a
        b.write(4)
        b.agent(a)
        assert a.digest()["sha256"] == b.digest()["sha256"]
        # planned migration back to a, over the link
        r = b.prepl("migrate", b.state, "--peer", a.uri, "--tls-psk", key, "--json")
        res = json.loads(r.stdout)
        assert res["blocks"] == 0
        assert a.digest()["sha256"] == b.digest()["sha256"]
        a.write(5)
        a.agent(b)
        assert a.digest()["sha256"] == b.digest()["sha256"]
        st = json.loads(a.prepl("status", a.state, "--json").stdout)
        assert st["role"] == "primary" and not st["links"]["default"]["last_cycle"]["full"]
        # each host reaches the other's server, never the local path only
        assert b.digest(host="a")["sha256"] == a.digest(host="b")["sha256"]
    finally:
        a.stop()
        b.stop()
        assert not os.path.exists(os.path.join(a.state, "control.sock"))
