"""Reports of a run: a self-contained HTML page with inline SVG charts, or a PNG image (matplotlib)."""

from noisescale.report.html import render_html
from noisescale.report.png import MissingDependencyError, render_png

__all__ = ["MissingDependencyError", "render_html", "render_png"]
