"""The README's quick start runs as printed (with fewer steps)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "no python block under '## Quick start'"
    source = code.group(1)
    assert "range(1000)" in source
    result = subprocess.run(
        [sys.executable, "-c", source.replace("range(1000)", "range(201)")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("B_simple ")]
    assert len(lines) == 3  # steps 0, 100 and 200
