"""The ``noisescale`` command: one module per subcommand (``demo``, ``show``, ``report``, ``runs``)."""
