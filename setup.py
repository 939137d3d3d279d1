# The C core is built here, through cffi's API mode (native/build_ffi.py); everything else
# about the package lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
