"""A bandwidth limit: a token bucket of bytes on the wire (`prepl agent
--bwlimit RATE`, changed at run time by `prepl link set`).

What it promises: over any stretch of time T, at most RATE * T + RATE bytes
are let through (the bucket holds at most one second of the rate, so a
pause is not made up by a burst of more than a second's worth); a request
larger than the bucket goes once the bucket is full, and the debt it leaves
is paid before the next one.  A rate of 0 means unlimited.  Thread-safe:
the agent's transfer asks, its socket thread sets the rate.
"""
import threading
import time


class TokenBucket:
    def __init__(self, rate=0, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self.rate = 0
        self._tokens = 0.0
        self._at = clock()
        self.set_rate(rate)

    def set_rate(self, rate):
        """Bytes per second from now on (0: unlimited).  The bucket keeps
        what it holds (at most a second of the new rate): a change is no
        occasion for a burst.  From unlimited, it starts full."""
        if type(rate) is not int or rate < 0:
            raise ValueError(f"a rate is bytes per second, at least 0, not {rate!r}")
        with self._lock:
            now = self._clock()
            held = self._tokens + (now - self._at) * self.rate if self.rate else float(rate)
            self.rate = rate
            self._tokens = min(float(rate), held)
            self._at = now

    def delay(self, n):
        """0 if n bytes may go now (they are taken), else the seconds to wait
        before asking again."""
        with self._lock:
            if self.rate == 0:
                return 0.0
            now = self._clock()
            self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
            self._at = now
            need = min(n, self.rate)
            if self._tokens >= need:
                self._tokens -= n          # may go below 0: a debt paid before the next
                return 0.0
            return (need - self._tokens) / self.rate
