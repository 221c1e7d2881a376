"""The package version, in the bottom layer: ``pyproject.toml`` reads it from here, and modules that record it
(model folders' ``mffzoo.json``) import it without importing the package's ``__init__`` (no import cycle)."""

__version__ = "0.1.0"
