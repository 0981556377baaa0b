"""resume.split: which pieces of a full transfer a resume sends, against
a model that looks at every block of every piece."""
import random

import numpy as np
import pytest

from replication import manifest, native, resume


def model(size, block, held):
    send, kept = [], []
    for off, n, _ in manifest.pieces([(0, size, False)]):
        blocks = range(off // block, -(-(off + n) // block))
        (kept if all(b in held for b in blocks) else send).append((off, n))
    return send, kept


def bits_of(blocks, nblocks):
    words = np.zeros(native.words_for(nblocks), dtype=np.uint64)
    for b in blocks:
        words[b // 64] |= np.uint64(1 << (b % 64))
    return words


@pytest.mark.parametrize("size,block,seed", [
    (8 << 20, 4096, 1), ((8 << 20) + 12288, 4096, 2), (3 << 20, 65536, 3),
    ((5 << 20) + 512, 512, 4), (1100 << 20, 1 << 20, 5)])
def test_split_matches_the_model(size, block, seed):
    rnd = random.Random(seed)
    nblocks = -(-size // block)
    held = set()
    for _ in range(6):                      # a few runs of held blocks, as a cut leaves
        b = rnd.randrange(nblocks)
        held.update(range(b, min(nblocks, b + rnd.randrange(1, nblocks // 3 + 2))))
    zero = {b for b in held if rnd.random() < 0.01}     # held as zeroes: sent again
    runs, kept = resume.split(size, block, bits_of(held, nblocks), bits_of(zero, nblocks))
    want_send, want_kept = model(size, block, held - zero)
    assert kept == want_kept
    sent = [(o, n) for o, n, z in runs]
    assert not any(z for _, _, z in runs)
    # runs coalesce the pieces to send, and are the pieces when cut again
    assert list((o, n) for o, n, _ in manifest.pieces(runs)) == want_send
    assert all(a[0] + a[1] < b[0] for a, b in zip(sent, sent[1:]))
    assert sum(n for _, n in sent) + sum(n for _, n in kept) == size


def test_nothing_held_sends_everything_and_all_held_nothing():
    size, block = 3 << 20, 4096
    nb = size // block
    none = bits_of((), nb)
    full = bits_of(range(nb), nb)
    assert resume.split(size, block, none, none) == ([(0, size, False)], [])
    runs, kept = resume.split(size, block, full, none)
    assert runs == [] and sum(n for _, n in kept) == size
