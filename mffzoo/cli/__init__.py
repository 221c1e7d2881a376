"""Command-line interface (see :mod:`mffzoo.cli.main`)."""
