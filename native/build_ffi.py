"""cffi build script (API mode, out of line): builds replication._native
from native/*.c.  The header's text is the cdef, so C and Python agree."""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "prepl.h")

ffibuilder = FFI()
with open(HEADER) as f:
    ffibuilder.cdef(f.read())
ffibuilder.set_source(
    "replication._native",
    '#include <stdint.h>\n#include <stddef.h>\n#include "prepl.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, n)) for n in ("bitmap.c", "writepath.c",
                                                                 "staging.c", "pyarena.c")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
