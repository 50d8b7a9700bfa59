"""Which framework versions an integration supports, checked when it is imported and when it is constructed.

An integration relies on the hooks of a framework's training loop (their names, their order, what has happened
when they run).  A version outside the range it was written and tested for could call them differently and give
a wrong number without any error, so it is refused with the range, the version found, and the fix.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from dataclasses import dataclass
from typing import Any

from noisescale.errors import NoiseScaleError

__all__ = ["FrameworkVersionError", "Supported", "parse_version", "require"]


class FrameworkVersionError(NoiseScaleError, RuntimeError):
    """The installed version of a framework lies outside the range an integration supports."""


def parse_version(text: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"2.6.0rc1"`` -> ``(2, 6, 0)``, ``"4.57.1+cpu"`` -> ``(4, 57, 1)``.

    Raises:
        ValueError: the string does not start with a number.
    """
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if m is None:
        raise ValueError(f"not a version number: {text!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _text(release: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in release)


@dataclass(frozen=True)
class Supported:
    """A range of versions ``minimum <= v < below`` of one distribution.

    Attributes:
        distribution: the name pip knows it by (``"lightning"``).
        minimum: the oldest supported release, e.g. ``(2, 2)``.
        below: the first release no longer supported, e.g. ``(3,)``.
        extra: the noisescale extra that installs it.
        what: the integration, for the messages (``"noisescale.integrations.lightning.NoiseScaleCallback"``).
    """

    distribution: str
    minimum: tuple[int, ...]
    below: tuple[int, ...]
    extra: str
    what: str

    @property
    def range(self) -> str:
        return f">={_text(self.minimum)},<{_text(self.below)}"

    def check(self, version: str) -> None:
        """Raise unless ``version`` lies in the range.

        Raises:
            FrameworkVersionError: with the range, the version found and how to install a supported one.
        """
        try:
            release = parse_version(version)
        except ValueError:
            raise FrameworkVersionError(
                f"{self.what} supports {self.distribution}{self.range}, and the installed version {version!r} cannot "
                f"be read: pip install '{self.distribution}{self.range}'"
            ) from None
        if not (self.minimum <= release < self.below):
            raise FrameworkVersionError(
                f"{self.what} supports {self.distribution}{self.range}, found {self.distribution} {version}: its "
                "training loop may call the hooks this integration relies on differently, which could measure the "
                f"wrong gradients without any error. Install a supported version: pip install "
                f"'{self.distribution}{self.range}' (or pip install 'noisescale[{self.extra}]')"
            )

    def installed(self, module: Any = None) -> str:
        """The installed version: ``module.__version__`` when given (what the running code is), else pip's."""
        version = getattr(module, "__version__", None)
        if isinstance(version, str):
            return version
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


def require(module: str, supported: Supported) -> Any:
    """Import ``module`` or raise an ``ImportError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{supported.what} needs {supported.distribution}{supported.range}: pip install "
            f"'noisescale[{supported.extra}]' ({e})"
        ) from None
