"""``noisescale dashboard``: a local web page over a read-only JSON API reading the run files of one folder, live
while they are written.

Needs the ``dashboard`` extra (``pip install 'noisescale[dashboard]'``): Starlette and uvicorn, imported only when a
server is made, so importing this package costs nothing.  Serve from Python::

    from noisescale.dashboard import DashboardServer
    with DashboardServer("runs", port=0).start() as server:
        print(server.url)  # http://127.0.0.1:<port>/

The page is static (``static/``, with uPlot vendored, no build step, no CDN) and draws what the API returns; every
view of it has a JSON twin under ``/api`` (described at ``/api/openapi.json``).
"""

from noisescale.dashboard.server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DashboardError,
    DashboardServer,
    MissingDependencyError,
    create_app,
)

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "DashboardError", "DashboardServer", "MissingDependencyError", "create_app"]
