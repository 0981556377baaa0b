"""Two machines paired the way the README's "Two nodes and TLS" shows, in
two network namespaces joined by a veth pair (tests/harness/netns.py): the
primary's server on a unix socket on host a, the secondary's on TCP with
TLS-PSK on host b (198.18.0.2), the agent on host a.  A TLS-PSK link
replicates end to end; a plaintext agent, a wrong key and a wrong address
are refused with the messages the README quotes, the replica untouched;
and over a 200 Mbit/s tbf link with 20 ms each way from the fault proxy
(run in host b's namespace, in front of the secondary) cycles replicate,
each replica equal to its snappoint's snapshot."""
import json
import os
import time
from contextlib import contextmanager

import pytest

from tests.conftest import ENV, PREPL, REPO, prepl
from tests.harness.netns import TwoHosts
from tests.harness.proxy import CutProxy

pytestmark = pytest.mark.slow

SIZE = 32 << 20
PORT, PROXY_PORT = 10809, 10810
DELAY = 0.020                     # one way
RATE = 200e6 / 8                  # the tbf's 200mbit, in bytes per second


class Pair:
    """Host a: the primary on a unix socket, where the agent runs; host b:
    the secondary on TCP with the link's key."""

    def __init__(self, net, tmp_path):
        self.net = net
        self.key = str(tmp_path / "link.psk")
        self.pstate, self.sstate = str(tmp_path / "p"), str(tmp_path / "s")
        self.sock = str(tmp_path / "p.sock")
        self.sec_uri = f"nbds://{net.addr['b']}:{PORT}"

    def prepl(self, host, *args, check=True):
        return self.net.run(host, PREPL + list(args), check=check, env=ENV, cwd=REPO)

    def start(self):
        prepl("keygen", self.key)
        prepl("init", self.pstate, "--volume", self.pstate + ".img", "--size", str(SIZE))
        prepl("init", self.sstate, "--volume", self.sstate + ".img", "--size", str(SIZE),
              "--role", "secondary")
        self.prepl("a", "serve", self.pstate, "--unix", self.sock, "--background")
        self.prepl("b", "serve", self.sstate, "--port", PORT, "--bind", self.net.addr["b"],
                   "--tls-psk", self.key, "--background")

    def stop(self):
        self.prepl("a", "stop", self.pstate, check=False)
        self.prepl("b", "stop", self.sstate, check=False)

    def io(self, host, op, uri, *args):
        """tests/harness/nbdio.py run on host."""
        r = self.net.run(host, [PREPL[0], "-m", "tests.harness.nbdio", op, uri, *args],
                         env=ENV, cwd=REPO)
        return json.loads(r.stdout)

    def write(self, seed, count):
        return self.io("a", "write", f"nbd+unix:///?socket={self.sock}", "--seed", seed,
                       "--count", count)

    def snapshot_digest(self, name):
        return self.io("a", "digest", f"nbd+unix:///snap/{name}?socket={self.sock}")["sha256"]

    def replica_digest(self):
        """Read on host b (not across the limited link)."""
        return self.io("b", "digest", self.sec_uri, "--tls-psk", self.key)["sha256"]

    def agent(self, uri, *tls, timeout=60, check=True):
        # whole snapshots: snap/LINK.N is read whole (snapshot_digest)
        return self.prepl("a", "agent", self.pstate, "--secondary", uri, *tls, "--once",
                          "--timeout", timeout, "--whole-snapshot", check=check)

    def last_cycle(self):
        st = json.loads(self.prepl("a", "status", self.pstate, "--json").stdout)
        return st["links"]["default"]["last_cycle"]

    def secondary_log(self):
        with open(os.path.join(self.sstate, "server.log")) as f:
            return f.read()


@contextmanager
def paired(tmp_path, rate=None):
    with TwoHosts("wan", rate=rate) as net:
        pair = Pair(net, tmp_path)
        try:
            pair.start()
            yield pair
        finally:
            pair.stop()


def replicated(pair, uri):
    """One cycle with the link's key; the replica is that cycle's snapshot.
    Returns the cycle's status record."""
    pair.agent(uri, "--tls-psk", pair.key)
    cycle = pair.last_cycle()
    assert pair.replica_digest() == pair.snapshot_digest(cycle["snappoint"])
    return cycle


def test_pairing_and_what_a_wrong_key_or_address_shows(tmp_path):
    with paired(tmp_path) as pair:
        pair.write(1, 50)
        replicated(pair, pair.sec_uri)
        before = pair.replica_digest()
        pair.write(2, 50)
        log = len(pair.secondary_log())

        # plaintext: the agent names the remedy; nbdkit logs a plaintext
        # client's refused options only at debug level (-v), so the
        # secondary's log says nothing, and the plugin never sees it
        r = pair.agent(f"nbd://{pair.net.addr['b']}:{PORT}", timeout=10, check=False)
        assert r.returncode == 5, r.stderr
        assert "the server refused the export: Operation not supported" in r.stderr
        assert "the secondary requires TLS: give --tls-psk FILE (its key) and an nbds:// URI" \
            in r.stderr
        assert pair.secondary_log()[log:] == ""

        # a wrong key: refused on both sides
        other = str(tmp_path / "other.psk")
        prepl("keygen", other)
        r = pair.agent(pair.sec_uri, "--tls-psk", other, timeout=10, check=False)
        assert r.returncode == 5, r.stderr
        assert f"the TLS handshake failed: the key in {other} is not the secondary's key" \
            in r.stderr
        assert "error: gnutls_handshake: " in pair.secondary_log()[log:]

        # a wrong address: nothing there is not a refusal; retried until --timeout
        for uri, what in ((f"nbds://{pair.net.addr['b']}:{PORT + 90}", "Connection refused"),
                          (f"nbds://198.18.0.3:{PORT}", "Network is unreachable")):
            r = pair.agent(uri, "--tls-psk", pair.key, timeout=2, check=False)
            assert r.returncode == 6, r.stderr
            assert "prepl: error: timed out after 2.0 s; last error: cannot connect to " \
                   f"{uri} (export 'info')" in r.stderr and what in r.stderr, r.stderr

        assert pair.replica_digest() == before            # nothing reached the replica
        replicated(pair, pair.sec_uri)                    # the right key still works
        assert pair.replica_digest() != before


def test_cycles_over_a_200mbit_link_with_20ms_each_way(tmp_path):
    with paired(tmp_path, rate="200mbit") as pair:
        proxy = CutProxy((pair.net.addr["b"], PROXY_PORT), (pair.net.addr["b"], PORT),
                         netns=pair.net.ns["b"]).start()
        try:
            proxy.delay(DELAY)
            uri = f"nbds://{pair.net.addr['b']}:{PROXY_PORT}"
            rtts = pair.io("a", "rtt", uri, "--tls-psk", pair.key, "--count", 5)["rtts"]
            assert min(rtts) >= 2 * DELAY, rtts
            # the tbf holds: the whole replica read across the link, no proxy
            t0 = time.monotonic()
            pair.io("a", "digest", pair.sec_uri, "--tls-psk", pair.key)
            link = SIZE / (time.monotonic() - t0)
            assert link <= 1.1 * RATE, f"{link / 1e6:.1f} MB/s across a 200mbit link"
            for seed in range(3):
                pair.write(seed, 300)
                sent = proxy.bytes_up
                cycle = replicated(pair, uri)
                assert cycle["bytes"] > 4 << 20
                assert proxy.bytes_up - sent > cycle["bytes"]      # it went through the proxy
                # the commit is round trips (manifest write, flush, receipt read)
                assert cycle["phases"]["commit"] >= 2 * 2 * DELAY, cycle
                rate = cycle["bytes"] / cycle["phases"]["transfer"]
                print(f"cycle {cycle['snappoint']}: {cycle['bytes'] >> 10} KiB in "
                      f"{cycle['seconds']:.2f} s, transfer {rate / 1e6:.1f} MB/s; "
                      f"RTT {min(rtts) * 1000:.1f} ms, commit {cycle['phases']['commit']:.2f} s, "
                      f"link {link / 1e6:.1f} MB/s")
        finally:
            proxy.stop()
