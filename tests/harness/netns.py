"""Two hosts on one machine: two network namespaces joined by a veth pair,
each end with its own address from 198.18.0.0/15 (the range set aside for
benchmarks), optionally with a rate limit (tc tbf) on the link.

    with TwoHosts("t1") as net:
        net.run("a", ["prepl", "serve", ...])       # in host a's namespace
        net.addr["b"]                               # "198.18.0.2"

Everything is created with `ip` and removed in stop(), which first kills
whatever still runs in the namespaces (by pid, `ip netns pids`); stop() is
idempotent and works after a partial start.  Needs root.
"""
import os
import signal
import subprocess
import time

ADDR = {"a": "198.18.0.1", "b": "198.18.0.2"}


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


class TwoHosts:
    def __init__(self, tag, rate=None):
        tag = f"{tag}{os.getpid() % 100000}"
        self.ns = {"a": f"prepl-a-{tag}", "b": f"prepl-b-{tag}"}
        self.dev = {"a": f"pva{tag}"[:15], "b": f"pvb{tag}"[:15]}
        self.addr = dict(ADDR)
        self.rate = rate            # e.g. "20mbit": tbf on both ends
        self.created = []

    def start(self):
        try:
            for h in "ab":
                _ip("netns", "add", self.ns[h])
                self.created.append(self.ns[h])
            _ip("link", "add", self.dev["a"], "type", "veth", "peer", "name", self.dev["b"])
            for h in "ab":
                _ip("link", "set", self.dev[h], "netns", self.ns[h])
                _ip("-n", self.ns[h], "addr", "add", f"{self.addr[h]}/30", "dev", self.dev[h])
                _ip("-n", self.ns[h], "link", "set", "lo", "up")
                _ip("-n", self.ns[h], "link", "set", self.dev[h], "up")
                if self.rate:
                    subprocess.run(["tc", "-n", self.ns[h], "qdisc", "add", "dev", self.dev[h],
                                    "root", "tbf", "rate", self.rate, "burst", "64kb",
                                    "latency", "50ms"], check=True, capture_output=True)
        except BaseException:
            self.stop()
            raise
        return self

    def cmd(self, host, args):
        """The command line that runs args in host's namespace."""
        return ["ip", "netns", "exec", self.ns[host], *map(str, args)]

    def run(self, host, args, check=True, timeout=300, env=None, **kw):
        r = subprocess.run(self.cmd(host, args), capture_output=True, text=True, timeout=timeout,
                           env=env, stdin=subprocess.DEVNULL, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"[{host}] {' '.join(map(str, args))} -> {r.returncode}\n"
                                 f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def pids(self, host):
        r = _ip("netns", "pids", self.ns[host], check=False)
        return [int(p) for p in r.stdout.split()]

    def stop(self):
        for ns in list(self.created):
            host = "a" if ns == self.ns["a"] else "b"
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.pids(host):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 10
                while self.pids(host) and time.monotonic() < deadline:
                    time.sleep(0.05)
            _ip("netns", "del", ns, check=False)      # its veth end goes with it
            self.created.remove(ns)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
