"""replication/priority.py: a niced thread runs a full_priority() block at
niceness 0 and gets its niceness back after (also when the block raises);
background_priority() lowers and never raises.  (Raising a priority needs
CAP_SYS_NICE: the tests run as root.)"""
import os
import threading

import pytest

from replication.priority import background_priority, full_priority


def nice():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def in_thread(f):
    out = []
    t = threading.Thread(target=lambda: out.append(f()))
    t.start()
    t.join()
    return out[0]


def test_full_priority_raises_for_the_block_only():
    def run():
        background_priority()
        seen = [nice()]
        with full_priority():
            seen.append(nice())
        seen.append(nice())
        with pytest.raises(KeyError):
            with full_priority():
                seen.append(nice())
                raise KeyError("inside")
        seen.append(nice())
        background_priority(5)          # never raises a priority
        seen.append(nice())
        return seen
    assert in_thread(run) == [10, 0, 10, 0, 10, 10]


def test_full_priority_leaves_an_unniced_thread_alone():
    def run():
        before = nice()
        with full_priority():
            inside = nice()
        return before, inside, nice()
    b, i, a = in_thread(run)
    assert b == i == a
