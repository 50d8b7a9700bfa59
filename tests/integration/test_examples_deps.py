"""An example whose optional package is missing says which extra to install, in one line, with exit code 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Makes ``package`` unimportable (as if not installed), then runs the example as ``python examples/x.py`` would.
BLOCK = (
    "import runpy, sys; sys.modules[sys.argv[1]] = None; sys.argv = sys.argv[2:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.parametrize(
    ("example", "package", "needs", "extra"),
    [
        ("hf_causal_lm.py", "transformers", "transformers", "hf"),
        ("train_digits.py", "sklearn.datasets", "scikit-learn", "demo"),
    ],
)
def test_missing_optional_package_names_the_extra(example, package, needs, extra):
    done = subprocess.run(
        [sys.executable, "-c", BLOCK, package, str(EXAMPLES / example)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"examples/{example} needs {needs}, which is not installed: pip install 'noisescale[{extra}]'"
    ]
