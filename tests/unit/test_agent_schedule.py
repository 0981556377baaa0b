"""The agent daemon's schedule (replication/daemon.wait_due): a cycle starts
on its due time, not at the next threshold poll after it."""
import pytest

from replication import daemon


class FakeTime:
    """A clock and an Event whose wait() advances the clock (pure logic)."""

    def __init__(self):
        self.now = 100.0
        self.waits = []
        self.set_at = None

    def clock(self):
        return self.now

    def is_set(self):
        return self.set_at is not None and self.now >= self.set_at

    def wait(self, t):
        self.waits.append(round(t, 9))
        if self.set_at is not None and self.now < self.set_at <= self.now + t:
            self.now = self.set_at
            return True
        self.now += t
        return False


def test_never_sleeps_past_the_due_time():
    ft = FakeTime()
    daemon.wait_due(ft.now + 0.5, ft, clock=ft.clock)
    assert ft.now == pytest.approx(100.5)
    assert ft.waits == [0.2, 0.2, pytest.approx(0.1)]


def test_due_time_already_past_returns_at_once():
    ft = FakeTime()
    asked = []
    daemon.wait_due(ft.now - 1, ft, lambda: asked.append(1), clock=ft.clock)
    assert ft.waits == [] and asked == []


def test_thresholds_polled_and_end_the_wait():
    ft = FakeTime()
    answers = iter([False, False, True])
    daemon.wait_due(ft.now + 10, ft, lambda: next(answers), clock=ft.clock)
    assert ft.waits == [daemon.POLL_SECONDS] * 2
    assert ft.now == pytest.approx(100 + 2 * daemon.POLL_SECONDS)


def test_a_sync_request_ends_the_wait():
    ft = FakeTime()
    ft.set_at = ft.now + 0.3
    daemon.wait_due(ft.now + 10, ft, clock=ft.clock)
    assert ft.now == pytest.approx(100.3)
