"""replication/durability.py's worker, with a stand-in volume (pure logic):
a durable point only while extents wait, a failure recorded (and logged)
once and never counted as a sync, and the interval's bounds."""
import errno

import pytest

from replication.durability import VolumeDurability, sync_interval
from replication.errors import UsageError


class FakeVolume:
    def __init__(self):
        self.al_pending = 0
        self.calls = 0
        self.fail = None

    def durable(self):
        self.calls += 1
        if self.fail:
            raise OSError(self.fail, "fdatasync failed")
        self.al_pending = 0


def test_a_durable_point_only_while_extents_wait():
    vol = FakeVolume()
    d = VolumeDurability(vol, 1.0)
    assert d.sync_now() is False and vol.calls == 0
    vol.al_pending = 3
    assert d.sync_now() is True and vol.calls == 1
    assert d.status() == {"interval_s": 1.0, "syncs": 1, "pending_extents": 0}
    assert d.sync_now() is False and vol.calls == 1


def test_a_failed_durable_point_is_recorded_and_logged_once(caplog):
    vol = FakeVolume()
    vol.al_pending, vol.fail = 2, errno.EIO
    d = VolumeDurability(vol, 1.0)
    assert d.sync_now() is False and d.sync_now() is False
    assert vol.calls == 2 and d.syncs == 0
    assert d.status()["pending_extents"] == 2 and d.failed
    assert len([r for r in caplog.records if "could not be made durable" in r.message]) == 1


@pytest.mark.parametrize("text,ok", [("5", 5.0), ("0.05", 0.05), ("3600", 3600.0),
                                     ("0", None), ("0.01", None), ("3601", None),
                                     ("nan", None), ("x", None)])
def test_sync_interval_bounds(text, ok):
    if ok is None:
        with pytest.raises(UsageError):
            sync_interval(text)
        with pytest.raises(ValueError):
            VolumeDurability(FakeVolume(), float("nan") if text == "nan" else 0)
    else:
        assert sync_interval(text) == ok
