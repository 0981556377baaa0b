"""What pyproject.toml cannot say on every setuptools we support: the cffi
extension (cffi_modules, cffi's setuptools keyword) and the package list
([tool.setuptools] is still "beta" in Debian 12's setuptools 66)."""
from setuptools import setup

setup(packages=["replication"], cffi_modules=["native/build_ffi.py:ffibuilder"])
