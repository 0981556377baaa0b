"""replication/bwlimit.py with a fake clock: the bucket's promises."""
import pytest

from replication.bwlimit import TokenBucket


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def drain(b, clock, n, seconds):
    """Bytes let through in `seconds` of requests of n bytes, each asked as
    soon as the bucket allows."""
    end, sent = clock.t + seconds, 0
    while clock.t < end:
        d = b.delay(n)
        if d:
            clock.t += d
        else:
            sent += n
    return sent


def test_the_rate_holds_over_time_with_at_most_a_second_of_burst():
    c = Clock()
    b = TokenBucket(1 << 20, clock=c)
    sent = drain(b, c, 65536, 10)
    assert 10 * (1 << 20) <= sent <= 11 * (1 << 20) + 65536
    c.t += 60                                     # a long pause is not made up
    assert drain(b, c, 65536, 1) <= 2 * (1 << 20) + 65536


def test_requests_larger_than_the_bucket_go_and_leave_a_debt():
    c = Clock()
    b = TokenBucket(1000, clock=c)
    assert b.delay(5000) == 0                     # the bucket is full: it goes
    assert b.delay(10) == pytest.approx(4.01)     # the debt of 4000 first


def test_unlimited_and_changing_the_rate():
    c = Clock()
    b = TokenBucket(0, clock=c)
    assert all(b.delay(1 << 30) == 0 for _ in range(5))
    b.set_rate(2 << 20)
    assert 10 * (2 << 20) <= drain(b, c, 1 << 20, 10) <= 11 * (2 << 20) + (1 << 20)
    for bad in (-1, 1.5, "1M"):
        with pytest.raises(ValueError):
            b.set_rate(bad)


def test_a_new_rate_is_no_occasion_for_a_burst():
    c = Clock()
    b = TokenBucket(1000, clock=c)
    assert b.delay(1000) == 0                     # the bucket is empty now
    b.set_rate(100000)
    assert b.delay(50000) > 0                     # not refilled by the change
    c.t += 0.5
    assert b.delay(50000) == 0
