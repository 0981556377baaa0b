"""CPU priority of a server's threads.

What it owns: the niceness of the calling thread (Linux: a thread id is a
process id to setpriority).  What it promises:

* background_priority(): background work (the agent's connections, merges,
  writeback, reaping, the control socket) runs at niceness 10, so that on a
  busy CPU the volume's writes go first; it never raises a priority.
* full_priority(): a block that holds the write path's epoch exclusively
  (a snappoint's switch, a snapshot dropped) runs at niceness 0, then the
  thread's niceness is restored.  Writers wait for that lock: a niced
  thread that takes it on a busy CPU makes them wait for its turn on the
  CPU too (priority inversion).  Where the process may not raise its
  priority (no CAP_SYS_NICE, RLIMIT_NICE), the block runs as it is.
"""
import contextlib
import logging
import os
import threading

log = logging.getLogger(__name__)


def background_priority(niceness=10):
    """Lowers the calling thread's CPU priority; never raises it."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except OSError as e:            # not fatal: the work just competes as before
        log.info("could not lower a background thread's priority: %s", e)


@contextlib.contextmanager
def full_priority():
    """The block runs at niceness 0 (if the thread was niced and may be
    raised), then at the thread's niceness again."""
    tid = threading.get_native_id()
    old = os.getpriority(os.PRIO_PROCESS, tid)
    raised = False
    if old > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
            raised = True
        except OSError as e:        # not fatal: the switch just waits for its turn
            log.debug("could not raise a thread's priority for a switch: %s", e)
    try:
        yield
    finally:
        if raised:
            os.setpriority(os.PRIO_PROCESS, tid, old)
