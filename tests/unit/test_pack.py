"""replication/pack.py against independent models: batches hold exactly the
manifest's pieces in order, none split; a batch decodes to what was
encoded; malformed batches are refused whole; a stream range maps back to
the volume bytes it stands for; manifest.runs against a bit-by-bit model."""
import random
import struct

import numpy as np
import pytest

from replication import manifest, native, pack

MiB = 1 << 20


def random_runs(rnd, size=64 * MiB, block=4096, n=200):
    """Sorted, non-overlapping, non-adjacent-of-one-kind runs, some longer
    than a piece, some zero."""
    out, pos = [], 0
    for _ in range(n):
        pos += rnd.randrange(1, 64) * block
        length = rnd.choice((1, 3, 16, 300, 700)) * block
        if pos + length > size:
            break
        out.append((pos, length, rnd.random() < 0.2))
        pos += length
    return out


def test_batches_hold_the_pieces_in_order_none_split():
    rnd = random.Random(1)
    for trial in range(20):
        runs = random_runs(rnd)
        bb = rnd.choice((64 << 10, 1 << 20, 3 << 20))
        me = rnd.choice((1, 5, 4096))
        plan = pack.batches(runs, bb, me)
        assert [e for b in plan for e in b.entries] == list(manifest.pieces(runs))
        stream = 0
        for b in plan:
            assert b.stream_offset == stream
            data = sum(n for _, n, z in b.entries if not z)
            assert b.data_bytes == data
            assert 1 <= len(b.entries) <= me
            # over the limit only when one piece alone is
            assert data <= bb or len([e for e in b.entries if not e[2]]) == 1
            stream += data
        assert stream == sum(n for _, n, z in runs if not z)
    assert pack.batches([]) == []


def test_batches_are_full_before_a_new_one_starts():
    runs = [(i * 8192, 4096, False) for i in range(10)]
    plan = pack.batches(runs, batch_bytes=3 * 4096, max_entries=100)
    assert [len(b.entries) for b in plan] == [3, 3, 3, 1]
    plan = pack.batches(runs, batch_bytes=1 << 20, max_entries=4)
    assert [len(b.entries) for b in plan] == [4, 4, 2]


def test_encode_decode_round_trip():
    rnd = random.Random(2)
    for _ in range(50):
        entries, data, pos = [], b"", rnd.randrange(0, 1 << 50)
        for _ in range(rnd.randrange(0, 30)):
            zero = rnd.random() < 0.3
            n = rnd.randrange(1, 1 << 40) if zero else rnd.randrange(0, 5000)
            entries.append((pos, n, zero))
            pos += n + rnd.randrange(0, 1 << 20)
            if not zero:
                data += rnd.randbytes(n)
        buf = bytearray(pack.encode_header(entries) + data)
        assert len(buf) == pack.header_size(len(entries)) + len(data)
        out, got = pack.decode(buf)
        assert out == entries and bytes(got) == data


@pytest.mark.parametrize("mangle, msg", [
    (lambda b: b[:10], "shorter than its header"),
    (lambda b: b"XREPLBT1" + b[8:], "bad magic"),
    (lambda b: b[:12] + struct.pack("<I", 1) + b[16:], "bad magic"),         # reserved
    (lambda b: b[:8] + struct.pack("<I", 1000) + b[12:], "does not fit"),
    (lambda b: b[:-1], "has data entries of"),
    (lambda b: b + b"x", "has data entries of"),
    (lambda b: b[:32] + struct.pack("<Q", 2048) + b[40:], "out of order or overlapping"),
])
def test_malformed_batches_refused(mangle, msg):
    entries = [(0, 4096, False), (8192, 1 << 33, True), (1 << 34, 4096, False)]
    good = pack.encode_header(entries) + bytes(8192)
    assert len(pack.decode(good)[0]) == 3
    with pytest.raises(ValueError, match=msg):
        pack.decode(bytearray(mangle(good)))


def test_stream_segments_map_back_to_the_volume():
    rnd = random.Random(3)
    size = 8 * MiB
    vol = rnd.randbytes(size)
    for _ in range(10):
        runs = random_runs(rnd, size=size, n=60)
        s = pack.Stream(runs)
        model = b"".join(vol[o:o + n] for o, n, z in runs if not z)
        assert s.size == len(model)
        for _ in range(30):
            if not s.size:
                break
            off = rnd.randrange(s.size)
            n = rnd.randrange(1, s.size - off + 1)
            got = bytearray(n)
            for pos, voff, k in s.segments(off, n):
                got[pos:pos + k] = vol[voff:voff + k]
            assert bytes(got) == model[off:off + n]
        with pytest.raises(ValueError):
            s.segments(s.size, 1)
        with pytest.raises(ValueError):
            s.segments(-1, 1)


def test_fingerprint_tells_run_lists_apart():
    runs = [(0, 4096, False), (8192, 4096, True)]
    fp = pack.fingerprint(runs)
    assert fp == pack.fingerprint(list(runs)) and len(fp) == 32
    for other in ([(0, 4096, False)], [(0, 4096, False), (8192, 4096, False)],
                  [(0, 4096, False), (12288, 4096, True)], []):
        assert pack.fingerprint(other) != fp


def test_stream_pieces_are_the_manifests():
    """Stream (manifest.data_pieces) cuts data runs into pieces as
    manifest.pieces does (the transfer digest depends on it), runs longer
    than a piece included."""
    rnd = random.Random(9)
    for _ in range(20):
        runs = random_runs(rnd, size=64 * MiB, n=rnd.randrange(1, 80))
        s = pack.Stream(runs)
        want = [(o, n) for o, n, z in manifest.pieces(runs) if not z]
        assert list(zip(s.offsets.tolist(), s.lengths.tolist())) == want


def test_runs_of_bitmaps_against_a_model():
    """manifest.runs against a bit-by-bit model: runs of one kind
    coalesced, in offset order, a block in both maps a zero, the last run
    clipped at the volume's end."""
    rnd = random.Random(11)
    block = 4096
    for _ in range(30):
        nblocks = rnd.randrange(1, 700)
        size = nblocks * block - rnd.choice([0, 0, 512, 4095])
        data = [rnd.random() < 0.3 for _ in range(nblocks)]
        zero = [rnd.random() < 0.15 for _ in range(nblocks)]
        words = native.words_for(nblocks)
        dbits, zbits = np.zeros(words, np.uint64), np.zeros(words, np.uint64)
        for b in range(nblocks):
            if data[b]:
                native.bm_set(dbits, nblocks, b)
            if zero[b]:
                native.bm_set(zbits, nblocks, b)
        want, b = [], 0
        while b < nblocks:
            kind = "zero" if zero[b] else "data" if data[b] else None
            e = b + 1
            while e < nblocks and ("zero" if zero[e] else "data" if data[e] else None) == kind:
                e += 1
            if kind:
                want.append((b * block, min(e * block, size) - b * block, kind == "zero"))
            b = e
        got = manifest.runs(dbits, zbits, nblocks, block, size)
        assert got == want
        assert all(type(o) is int and type(n) is int and type(z) is bool for o, n, z in got)


def test_digest_pieces_in_bulk_equal_one_by_one():
    """Digest.add_pieces (a secondary's commit) gives the digest that
    add_hashed piece by piece gives (the agent's, as reads complete, in any
    order)."""
    rnd = random.Random(7)
    offs = sorted(rnd.sample(range(1 << 16), 3000))
    pieces = [(o * 4096, 4096 * rnd.randint(1, 3)) for o in offs]
    hashes = [manifest.piece_hash(rnd.randbytes(64)) for _ in pieces]
    one = manifest.Digest()
    one.add(1 << 40, 8192, True)
    for (o, n), h in sorted(zip(pieces, hashes), key=lambda _: rnd.random()):
        one.add_hashed(o, n, h)
    bulk = manifest.Digest()
    bulk.add(1 << 40, 8192, True)
    bulk.add_pieces([o for o, _ in pieces], [n for _, n in pieces], hashes)
    assert bulk.hexdigest() == one.hexdigest()
    assert (bulk.data_bytes, bulk.zero_bytes, bulk.extents) == \
        (one.data_bytes, one.zero_bytes, one.extents)
    bulk.add_pieces([pieces[0][0]], [pieces[0][1]], [hashes[1]])     # another hash
    assert bulk.hexdigest() != one.hexdigest()
