"""Every nbdkit callback runs on a thread without a Python thread state, so
nbdkit's python plugin makes one per call and deletes it after; each new
one needs a 16 KiB frame stack.  The servers keep freed frame stacks in a
cache (native/pyarena.c) instead of mapping and unmapping one per call (an
munmap shoots the TLB down on the other CPU: an IPI on every write).  This
checks, on real servers, that writes and reads take their frame stacks
from the cache, and that the data is what was written."""
import hashlib
import random

import nbd
import pytest

from tests.conftest import prepl

MiB = 1 << 20
SIZE = 16 * MiB
WRITES = 2000
IN_FLIGHT = 8


def write_random(h, model, rnd, n):
    """n 4 KiB writes at random blocks, IN_FLIGHT at a time; model follows."""
    pending = []
    for i in range(n):
        off = rnd.randrange(SIZE // 4096) * 4096
        data = rnd.randbytes(4096)
        model[off:off + 4096] = data
        pending.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
        if len(pending) >= IN_FLIGHT:
            drain(h, pending)
    drain(h, pending)


def drain(h, pending):
    while pending:
        h.poll(-1)
        pending[:] = [c for c in pending if not h.aio_command_completed(c)]


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_callbacks_take_frame_stacks_from_the_cache(tmp_path, make_server, role):
    state = tmp_path / "s"
    args = ["--volume", tmp_path / "v.img", "--size", str(SIZE)]
    prepl("init", state, *args, *(["--role", "secondary"] if role == "secondary" else []))
    srv = make_server(state).start()
    before = srv.ctl("status")["frame_stack_cache"]
    rnd = random.Random(14)
    h = srv.connect()
    if role == "primary":
        model = bytearray(SIZE)
        write_random(h, model, rnd, WRITES)
        got = b"".join(h.pread(MiB, o) for o in range(0, SIZE, MiB))
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(model).hexdigest()
        calls = WRITES + SIZE // MiB
    else:                       # the replica: read-only, reads only
        for _ in range(WRITES):
            assert h.pread(4096, rnd.randrange(SIZE // 4096) * 4096) == bytes(4096)
        calls = WRITES
    h.shutdown()
    after = srv.ctl("status")["frame_stack_cache"]
    hits = after["hits"] - before["hits"]
    misses = after["misses"] - before["misses"]
    # one frame stack per callback at least; a miss only while fewer stacks
    # were freed than threads hold at once
    assert hits >= calls, (before, after)
    assert misses <= 4 * IN_FLIGHT, (before, after)
    assert after["held"] <= 16       # the cache's bound (the status thread may hold one)
