"""Builds and runs the C-level unit test of native/ (native/test_native.c)."""
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATIVE = os.path.join(REPO, "native")


def test_native_c(tmp_path):
    exe = tmp_path / "test_native"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-pthread",
                    "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                    "-I", NATIVE, "-o", str(exe),
                    *(os.path.join(NATIVE, f) for f in ("test_native.c", "bitmap.c",
                                                        "writepath.c", "staging.c"))],
                   check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "native tests passed" in r.stdout
