"""Block I/O on an NBD export from a process of its own, so that a test can
do it inside another network namespace (`ip netns exec NS python -m
tests.harness.nbdio ...`).  Prints one JSON object.

  digest URI [--tls-psk FILE]              {"sha256", "size", "read_only"}
  write URI --seed N --count N [--tls-psk FILE]
                                           random 4-64 KiB writes, then a flush:
                                           {"blocks": [4 KiB block numbers]}
  rtt URI --count N [--tls-psk FILE]       N reads of 512 bytes, one at a time, once
                                           connected: {"rtts": [seconds each]}
"""
import argparse
import hashlib
import json
import random
import sys
import time

import nbd


def connect(uri, key):
    h = nbd.NBD()
    if key:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(key)
        h.set_tls_username("prepl")
    h.connect_uri(uri)
    return h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("op", choices=("digest", "write", "rtt"))
    ap.add_argument("uri")
    ap.add_argument("--tls-psk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=10)
    a = ap.parse_args()
    h = connect(a.uri, a.tls_psk)
    size = h.get_size()
    if a.op == "digest":
        d = hashlib.sha256()
        for off in range(0, size, 8 << 20):
            d.update(h.pread(min(8 << 20, size - off), off))
        out = {"sha256": d.hexdigest(), "size": size, "read_only": bool(h.is_read_only())}
    elif a.op == "rtt":
        rtts = []
        for _ in range(a.count):
            t0 = time.monotonic()
            h.pread(512, 0)
            rtts.append(time.monotonic() - t0)
        out = {"rtts": rtts}
    else:
        rnd = random.Random(a.seed)
        blocks = set()
        for _ in range(a.count):
            k = rnd.randrange(1, 17)
            b = rnd.randrange(size // 4096 - k)
            h.pwrite(rnd.randbytes(k * 4096), b * 4096)
            blocks |= set(range(b, b + k))
        h.flush()
        out = {"blocks": sorted(blocks)}
    h.shutdown()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
