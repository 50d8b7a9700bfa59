"""The installed version of noisescale, read from the package metadata (no import of the package face)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("noisescale")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
