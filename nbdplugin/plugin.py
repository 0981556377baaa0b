"""nbdkit Python plugin for prepl: thin adapters onto replication.server.

    nbdkit python nbdplugin/plugin.py state=STATE_DIR

Every callback hands the work to the library; OSError becomes the errno the
NBD client sees.  Use `prepl serve` rather than starting this by hand.
"""
import os
import sys

import nbdkit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from replication import server as _server  # noqa: E402

API_VERSION = 2
_server.default_logging()
srv = _server.Server()


def _fail(e):
    nbdkit.set_error(e.errno or 5)
    raise e


def _startup(f, *args):
    # before serving, an expected error ends nbdkit with its message and exit
    # code (no traceback): nothing has been served yet (after_fork too: a
    # server whose start could not be recorded must not serve)
    try:
        f(*args)
    except _server.PreplError as e:
        print(f"prepl: error: {e}", file=sys.stderr, flush=True)
        os._exit(e.exit_code)


def config(key, value): _startup(srv.config, key, value)
def config_complete(): _startup(srv.config_complete)
def thread_model(): return nbdkit.THREAD_MODEL_PARALLEL
def after_fork(): _startup(srv.after_fork)
def cleanup(): srv.cleanup()
def list_exports(readonly, is_tls): return srv.list_exports()
def default_export(readonly, is_tls): return ""
def get_size(h): return h.size
def can_write(h): return h.writable
def can_flush(h): return True
def can_trim(h): return h.can_zero
def can_zero(h): return h.can_zero
def can_fast_zero(h): return h.can_zero
def can_fua(h): return nbdkit.FUA_NATIVE if h.fua_native else nbdkit.FUA_EMULATE
def block_size(h): return h.block_size
def can_multi_conn(h): return True
def can_extents(h): return h.is_snapshot
def extents(h, count, offset, flags): return h.extents(count, offset)


def open(readonly):
    try:
        name = nbdkit.export_name()
    except UnicodeDecodeError:               # not UTF-8: no export has such a name
        nbdkit.set_error(2)
        raise OSError(2, "export name is not UTF-8") from None
    try:
        return srv.open(name, readonly)
    except OSError as e:
        _fail(e)


def pread(h, buf, offset, flags):
    try:
        h.pread(buf, offset)
    except OSError as e:
        _fail(e)


def pwrite(h, buf, offset, flags):
    try:
        h.pwrite(buf, offset, flags)
    except OSError as e:
        _fail(e)


def zero(h, count, offset, flags):
    try:
        h.zero(count, offset, flags)
    except OSError as e:
        _fail(e)


def trim(h, count, offset, flags):
    try:
        h.trim(count, offset, flags)
    except OSError as e:
        _fail(e)


def flush(h, flags):
    try:
        h.flush()
    except OSError as e:
        _fail(e)
