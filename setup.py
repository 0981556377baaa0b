from setuptools import setup

setup(
    name="prepl",
    version="0.1.0",
    description="Periodic block-level replication for Linux volumes over NBD",
    packages=["replication"],
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "numpy>=1.24"],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6"]},
    cffi_modules=["native/build_ffi.py:ffibuilder"],
    entry_points={"console_scripts": ["prepl=replication.cli:main"]},
    zip_safe=False,
)
