"""Baseline peer for scripts/bench: a plain file behind nbdkit-python, no tracking."""
import os
import nbdkit

API_VERSION = 2
fd = None
path = None


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}")
    path = value


def config_complete():
    global fd
    fd = os.open(path, os.O_RDWR)


def thread_model(): return nbdkit.THREAD_MODEL_PARALLEL
def open(readonly): return fd
def get_size(h): return os.fstat(fd).st_size
def pread(h, buf, offset, flags): os.preadv(fd, [buf], offset)
def pwrite(h, buf, offset, flags): os.pwrite(fd, buf, offset)
def flush(h, flags): os.fdatasync(fd)
