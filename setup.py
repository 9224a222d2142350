"""The C part of the package: the middleware's request path (``crowdmon/_speedups.c``).

It is optional: without a C compiler the package installs all the same and runs the same code
in Python (``crowdmon/_core.py``).  Everything else about the package is in ``pyproject.toml``.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("crowdmon._speedups", ["crowdmon/_speedups.c"], optional=True)])
