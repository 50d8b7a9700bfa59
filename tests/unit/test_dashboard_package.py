"""The dashboard's page ships inside the package, and the vendored chart library with its licence."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

import noisescale.dashboard.server as server

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[2]


def test_every_static_file_is_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["noisescale"]
    package = ROOT / "src" / "noisescale"
    files = [p.relative_to(package).as_posix() for p in server.STATIC.rglob("*") if p.is_file()]
    assert "dashboard/static/index.html" in files and "dashboard/static/vendor/uPlot.iife.min.js" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert missing == [], f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_the_vendored_library_carries_its_licence_and_the_page_loads_nothing_from_outside():
    vendor = server.STATIC / "vendor"
    assert "MIT License" in (vendor / "uPlot.LICENSE").read_text()
    assert "uplot@1.6.32" in (vendor / "README.md").read_text()
    html = (server.STATIC / "index.html").read_text()
    assert "static/vendor/uPlot.iife.min.js" in html and "//" not in html.replace("<!--", "")
