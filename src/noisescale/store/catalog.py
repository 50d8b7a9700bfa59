"""Finding runs: a run is named by its file path, or by its id or name inside a folder of run files."""

from __future__ import annotations

import os
from pathlib import Path

from noisescale.store.errors import StoreError
from noisescale.store.naming import RUN_SUFFIX, parse_run_file_name
from noisescale.store.reader import RunInfo, RunReader

__all__ = ["DEFAULT_DIR", "list_runs", "open_run", "resolve_run", "run_files"]

DEFAULT_DIR = "runs"


def run_files(dir: str | os.PathLike[str]) -> list[Path]:
    """The ``*.sqlite`` files of a folder, oldest run first (by the start time in their name, then by name)."""
    root = Path(dir)
    if not root.exists():
        raise StoreError(f"no folder {str(root)!r}")
    if not root.is_dir():
        raise StoreError(f"{str(root)!r} is a file, not a folder of runs")
    try:
        files = [p for p in root.iterdir() if p.suffix == RUN_SUFFIX and p.is_file()]
    except OSError as e:
        raise StoreError(f"cannot list {str(root)!r}: {e.strerror or e}") from None

    def key(p: Path) -> tuple[str, str]:
        parsed = parse_run_file_name(p)
        return (parsed[1] if parsed else "", p.name)

    return sorted(files, key=key)


def resolve_run(run: str | os.PathLike[str], *, dir: str | os.PathLike[str] | None = None) -> Path:
    """The file of ``run``: an existing path, else the run in ``dir`` with that id, file name or name.

    A name used by several runs means the most recent of them.

    Raises:
        StoreError: nothing matches (the message says where it looked).
    """
    path = Path(run)
    root = Path(DEFAULT_DIR if dir is None else dir)
    if not path.exists() and not path.is_absolute() and (root / path).is_file():
        return root / path  # a file name inside the folder
    if path.exists() or any(sep in str(run) for sep in ("/", os.sep)) or str(run).endswith(RUN_SUFFIX):
        return path  # a path: let the reader say precisely what is wrong with it
    if not root.is_dir():
        raise StoreError(f"no run file {str(run)!r}, and no folder of runs {str(root)!r} to look it up in (use --dir)")
    ref = str(run)
    files = run_files(root)
    by_name: list[Path] = []
    for p in files:
        parsed = parse_run_file_name(p)
        if p.stem == ref or (parsed is not None and parsed[1] == ref):
            return p
        if parsed is not None and parsed[0] == ref:
            by_name.append(p)
    if by_name:
        return by_name[-1]
    raise StoreError(
        f"no run {ref!r} in {str(root)!r} ({len(files)} run file(s) there; list them with `noisescale runs {root}`)"
    )


def open_run(run: str | os.PathLike[str], *, dir: str | os.PathLike[str] | None = None) -> RunReader:
    """Open a run for reading: a path to its file, or its id or name inside ``dir`` (default ``./runs``).

    The file is opened read-only and may still be written by a training process; new rows appear as they land.

    Raises:
        StoreError: with a one-line reason (missing, empty, not a run, damaged, newer schema).
    """
    return RunReader(resolve_run(run, dir=dir))


def list_runs(dir: str | os.PathLike[str] = DEFAULT_DIR) -> list[RunInfo]:
    """Every readable run in ``dir``, oldest first (unreadable files are left out; ``noisescale runs`` lists them)."""
    out = []
    for p in run_files(dir):
        try:
            with RunReader(p) as r:
                out.append(r.info)
        except StoreError:
            continue
    return out
