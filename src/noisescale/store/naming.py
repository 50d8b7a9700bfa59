"""Run names, run ids and the file names built from them.

A run file is ``<name>-<id>.sqlite`` where the id is ``YYYYmmdd-HHMMSS-xxxxxx`` (local start time and 6 random
hex digits), so two runs never share a file even with the same name and the same second; the file itself is
created exclusively, so a collision is detected, not overwritten.
"""

from __future__ import annotations

import re
import secrets
import time
import unicodedata
from pathlib import Path

from noisescale.errors import ConfigError

__all__ = ["RUN_SUFFIX", "check_run_name", "new_run_id", "parse_run_file_name", "run_file_name"]

RUN_SUFFIX = ".sqlite"
MAX_NAME_LENGTH = 64
_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
_ID_LEN = 22
_MARKUP = set("<>&\"'`")
_SEPARATORS = set("/\\:")


def check_run_name(name: object) -> str:
    """Return ``name`` if it is a valid run name, else raise ``ConfigError`` saying why and what is allowed.

    A name is 1-64 letters, digits, ``-``, ``_``, ``.`` or ``+``, not starting with ``.`` or ``-``: it becomes
    part of a file name and is shown in terminals and HTML reports, so path separators, markup characters,
    spaces and control characters are refused rather than silently rewritten.

    >>> check_run_name("digits-mlp")
    'digits-mlp'
    """
    rule = (
        f"use 1-{MAX_NAME_LENGTH} letters, digits, '-', '_', '.' or '+', not starting with '.' or '-' "
        "(e.g. 'digits-mlp')"
    )
    if not isinstance(name, str):
        raise ConfigError(f"run name must be a str, got {type(name).__name__}; {rule}")
    if not name:
        raise ConfigError(f"run name is empty; {rule}")
    shown = ascii(name) if len(name) <= 80 else ascii(name[:80]) + "..."
    bad = sorted(set(name) & _SEPARATORS)
    if bad:
        raise ConfigError(f"run name {shown} contains a path separator {''.join(bad)!r}; {rule}")
    bad = sorted(set(name) & _MARKUP)
    if bad:
        raise ConfigError(f"run name {shown} contains markup character(s) {''.join(bad)!r}; {rule}")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"run name {shown} is {len(name)} characters long; {rule}")
    for ch in name:
        if ch in "-_.+":
            continue
        cat = unicodedata.category(ch)
        if not (cat.startswith("L") or cat == "Nd"):
            raise ConfigError(f"run name {shown} contains the character {ch!r}; {rule}")
    if name[0] in ".-":
        raise ConfigError(f"run name {shown} starts with {name[0]!r}; {rule}")
    return name


def new_run_id(now: float | None = None) -> str:
    """A fresh run id ``YYYYmmdd-HHMMSS-xxxxxx`` (sortable by start time, random suffix)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(3)}"


def run_file_name(name: str, run_id: str) -> str:
    return f"{name}-{run_id}{RUN_SUFFIX}"


def parse_run_file_name(path: str | Path) -> tuple[str, str] | None:
    """``(name, id)`` from a run file name made by ``run_file_name``, or ``None`` for any other file name."""
    p = Path(path)
    if p.suffix != RUN_SUFFIX:
        return None
    stem = p.stem
    if len(stem) < _ID_LEN + 2 or stem[-_ID_LEN - 1] != "-":
        return None
    run_id = stem[-_ID_LEN:]
    if not _ID_RE.match(run_id):
        return None
    return stem[: -_ID_LEN - 1], run_id
