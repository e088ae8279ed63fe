"""The ``symbi`` command line: ``symbi up``, ``symbi agent …``, ``symbi audit``."""

from symbi.main import main

__all__ = ["main"]
