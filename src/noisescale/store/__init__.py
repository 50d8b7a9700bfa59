"""The run store: one SQLite file per training run, written in the background, readable while it is written.

Record with ``Run`` (pass it to ``GNSMonitor(model, run=run)`` for every measurement), read with ``open_run``:

>>> import tempfile
>>> from noisescale.store import Run, open_run
>>> with tempfile.TemporaryDirectory() as tmp:
...     with Run("doc", dir=tmp, config={"lr": 0.1}) as run:
...         run.log(1, {"loss": 0.5})
...     with open_run(run.path) as reader:
...         print(reader.info.name, reader.info.status, reader.info.config, reader.metric("loss").value)
doc finished {'lr': 0.1} [0.5]

The read side (``open_run``, ``RunReader``, ``summarize``) needs only the standard library, so the command line
reads runs without importing torch; ``Run``, the writer, is imported on first use.
"""

from typing import TYPE_CHECKING

from noisescale.store.catalog import DEFAULT_DIR, list_runs, open_run, resolve_run, run_files
from noisescale.store.errors import StoreError
from noisescale.store.naming import check_run_name
from noisescale.store.reader import MEASUREMENT_FIELDS, LayerMatrix, RunInfo, RunReader, Series
from noisescale.store.schema import SCHEMA_VERSION
from noisescale.store.summary import summarize

if TYPE_CHECKING:
    from noisescale.store.writer import Run

__all__ = [
    "DEFAULT_DIR",
    "MEASUREMENT_FIELDS",
    "SCHEMA_VERSION",
    "LayerMatrix",
    "Run",
    "RunInfo",
    "RunReader",
    "Series",
    "StoreError",
    "check_run_name",
    "list_runs",
    "open_run",
    "resolve_run",
    "run_files",
    "summarize",
]


def __getattr__(name: str) -> object:
    # The writer imports torch (it reads tensors a training loop logs): loaded only when a run is recorded.
    if name == "Run":
        from noisescale.store.writer import Run

        return Run
    raise AttributeError(f"module 'noisescale.store' has no attribute {name!r}")
