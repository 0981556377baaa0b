"""MapFile.prefault (native.prefault_mapping): every page of a writable map
is made writable in the page tables at once, so that the write path's
first store into each page after a snappoint takes no fault (a fault there
waits for the filesystem's journal); no bit changes."""
import resource

import numpy as np

from replication.maps import MapFile

PAGES = 64
BITS = PAGES * 4096 * 8


def faults_storing_one_word_per_page(m):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    view = m.bits[::512]
    view |= np.uint64(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_no_fault_after_prefault(tmp_path):
    cold = MapFile(str(tmp_path / "cold.map"), BITS, create=True)
    assert faults_storing_one_word_per_page(cold) >= PAGES     # the measure sees faults
    warm = MapFile(str(tmp_path / "warm.map"), BITS, create=True)
    warm.prefault()
    assert faults_storing_one_word_per_page(warm) <= 2


def test_prefault_after_sync_again(tmp_path):
    m = MapFile(str(tmp_path / "m.map"), BITS, create=True)
    m.prefault()
    faults_storing_one_word_per_page(m)
    m.sync()                      # msync write-protects the pages again
    m.prefault()
    assert faults_storing_one_word_per_page(m) <= 2


def test_prefault_changes_no_bit(tmp_path):
    m = MapFile(str(tmp_path / "m.map"), BITS, create=True)
    rng = np.random.default_rng(7)
    want = rng.integers(0, 2**63, size=m.bits.size, dtype=np.uint64)
    m.bits[:] = want
    m.prefault()
    assert np.array_equal(m.bits, want)
    m.sync()
    again = MapFile(str(tmp_path / "m.map"), BITS, writable=False)
    assert np.array_equal(again.bits, want)


def test_a_failed_prefault_is_logged_and_changes_nothing(tmp_path, monkeypatch, caplog):
    import errno

    from replication import native

    def fail(array):
        raise OSError(errno.EIO, "injected")
    m = MapFile(str(tmp_path / "m.map"), BITS, create=True)
    m.bits[3] = 5
    monkeypatch.setattr(native, "prefault_mapping", fail)
    m.prefault()                  # advisory: a snappoint does not fail for it
    assert "prefaulting map" in caplog.text and "injected" in caplog.text
    assert m.bits[3] == 5 and int(m.bits.sum()) == 5
