"""The run files the dashboard may read: those directly inside its folder, addressed by id, never by a path.

A request names a run by its id (the file name without ``.sqlite``), by its file name, or by the run id recorded
in it; the id is looked up in a fresh listing of the folder, so nothing a request sends is ever joined into a path.
A file whose real path (links followed) lies outside the folder is refused, whatever its name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from noisescale.dashboard.buckets import BucketCache
from noisescale.dashboard.params import ApiError
from noisescale.store import StoreError, run_files
from noisescale.store.naming import RUN_SUFFIX, parse_run_file_name
from noisescale.store.reader import RunReader

__all__ = ["RunDirectory", "RunFile"]


@dataclass(frozen=True)
class RunFile:
    """One run file of the folder: ``id`` is its name without ``.sqlite``; ``real`` its resolved path."""

    id: str
    file: str
    real: Path
    refused: str | None = None  # why the file may not be read (a link out of the folder)


class RunDirectory:
    """The folder of run files one dashboard serves.

    Args:
        root: the folder (``noisescale dashboard DIR``).

    Raises:
        StoreError: the folder does not exist or is a file.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            what = "a file, not a folder of runs" if self.root.exists() else "not there"
            raise StoreError(f"the dashboard's folder {str(self.root)!r} is {what}; give a folder of run files")
        self.real_root = self.root.resolve(strict=True)
        self.cache = BucketCache()  # downsampled buckets already read from these files

    def files(self) -> list[RunFile]:
        """Every ``*.sqlite`` file directly in the folder, oldest run first; links out of it marked ``refused``."""
        out = []
        for p in run_files(self.root):
            real = p.resolve()
            refused = None
            if not real.is_relative_to(self.real_root):
                refused = "a link to a file outside the dashboard's folder: not served"
            elif not real.is_file():
                refused = "not a regular file"
            out.append(RunFile(id=p.stem, file=p.name, real=real, refused=refused))
        return out

    def find(self, ref: str) -> RunFile:
        """The run file named by ``ref`` (an id, a file name, or the run id in the file name).

        Raises:
            ApiError: 404 when no file in the folder has that id, 403 when the file is a link out of the folder.
        """
        files = self.files()
        match = next((f for f in files if ref in (f.id, f.file)), None)
        if match is None:
            match = next((f for f in files if _run_id(f.file) == ref), None)
        if match is None:
            raise ApiError(
                404,
                f"no run {ref!r} in the dashboard's folder ({len(files)} run file(s) there; GET /api/runs lists "
                "their ids)",
            )
        if match.refused is not None:
            raise ApiError(403, f"run {ref!r} is {match.refused}")
        return match

    def open(self, run: RunFile) -> RunReader:
        """A read-only reader of ``run`` (found with ``find``).

        Raises:
            ApiError: 422 when the file is there but not a readable run (with the reason).
        """
        if run.refused is not None:
            raise ApiError(403, f"run {run.id!r} is {run.refused}")
        try:
            return RunReader(run.real)
        except StoreError as e:
            raise ApiError(422, f"run {run.id!r} cannot be read: {e}") from None


def _run_id(file_name: str) -> str | None:
    if not file_name.endswith(RUN_SUFFIX):
        return None
    parsed = parse_run_file_name(file_name)
    return parsed[1] if parsed else None
