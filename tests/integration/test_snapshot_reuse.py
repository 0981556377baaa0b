"""A freed snapshot image is reused by the next snapshot
(replication/snapshots.py, REUSE and SPARE), on a real server.

A reused image holds old data where a new one has holes, so a snapshot
taken on it must still read exactly the volume at its snappoint: a block
that was all zero then reads zero (copy-on-write writes zeroes into a
reused image, and into an image reopened from disk), blocks never copied
read the volume.  An image holding more than REUSE of the volume is freed,
not kept, and the spare goes at the next start."""
import os
import random

from tests.conftest import prepl, read_export

MiB = 1 << 20
SIZE = 16 * MiB
BS = 4096
NBLOCKS = SIZE // BS


def write_blocks(h, model, blocks, data):
    for b in blocks:
        h.pwrite(data(b), b * BS)
        model[b * BS:(b + 1) * BS] = data(b)
    h.flush()


def test_the_next_snapshot_reuses_a_freed_image_and_reads_its_own_instant(
        tmp_path, make_server):
    rnd = random.Random(5)
    model = bytearray(rnd.randbytes(SIZE))
    (tmp_path / "p.img").write_bytes(model)
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img")
    prim = make_server(tmp_path / "p").start()
    snaps = tmp_path / "p" / "snaps"
    spare = snaps / "spare.img"
    h = prim.connect()
    picked = rnd.sample(range(NBLOCKS), 328)
    zs, zs2, others = sorted(picked[:64]), sorted(picked[64:128]), sorted(picked[128:])
    noise = {b: rnd.randbytes(BS) for b in range(NBLOCKS)}

    # A copies the old (random) data of zs, zs2 and others; its image
    # becomes the spare
    prepl("snappoint", "create", prim.state, "A")
    write_blocks(h, model, zs + zs2, lambda b: bytes(BS))     # zero from now on
    write_blocks(h, model, others, lambda b: noise[b])
    assert not spare.exists()
    prepl("snappoint", "delete", prim.state, "A")
    assert spare.exists()
    ino = spare.stat().st_ino

    # B takes the spare: old data at zs and zs2, where B's instant holds zeroes
    prepl("snappoint", "create", prim.state, "B")
    at_b = bytes(model)
    assert not spare.exists()
    images = [p for p in snaps.iterdir()]
    assert [p.stat().st_ino for p in images] == [ino], images      # reused, not new
    write_blocks(h, model, zs + others[:50], lambda b: noise[(b * 7) % NBLOCKS])
    assert read_export(prim, SIZE, "snap/B") == at_b

    # an image reopened at a start is written as a reused one too: the
    # zeroes of zs2 are copied into it
    prim.stop()
    prim.start()
    h = prim.connect()
    write_blocks(h, model, zs2, lambda b: noise[b])
    assert read_export(prim, SIZE, "snap/B") == at_b


def test_a_large_image_is_freed_and_the_spare_goes_at_the_next_start(tmp_path, make_server):
    rnd = random.Random(6)
    model = bytearray(rnd.randbytes(SIZE))
    (tmp_path / "p.img").write_bytes(model)
    prepl("init", tmp_path / "p", "--volume", tmp_path / "p.img")
    prim = make_server(tmp_path / "p").start()
    snaps = tmp_path / "p" / "snaps"
    spare = snaps / "spare.img"
    h = prim.connect()

    # more than REUSE (a quarter) of the volume copied: freed, not kept
    prepl("snappoint", "create", prim.state, "big")
    write_blocks(h, model, range(0, NBLOCKS // 3), lambda b: bytes(BS))
    prepl("snappoint", "delete", prim.state, "big")
    assert not spare.exists()

    prepl("snappoint", "create", prim.state, "small")
    write_blocks(h, model, range(0, 16), lambda b: b"x" * BS)
    prepl("snappoint", "delete", prim.state, "small")
    assert spare.exists()
    prim.stop()
    prim.start()
    assert not spare.exists()
    assert list(snaps.iterdir()) == []
