"""``python -m noisescale``: the same as the ``noisescale`` command."""

import sys

from noisescale.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
