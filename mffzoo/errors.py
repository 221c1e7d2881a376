"""User-facing errors.

Every error a user can fix by changing their input derives from :class:`MffzooError`. The CLI prints its
message as one line and exits with :attr:`exit_code` (2 for bad input), never with a traceback. Python API
users get an ordinary exception with the same message.
"""

from __future__ import annotations


class MffzooError(Exception):
    """Bad input: one line naming the problem and the fix."""

    exit_code = 2


class ConfigError(MffzooError, ValueError):
    """A recipe or export profile key is unknown, mistyped or out of range."""


class CheckpointError(MffzooError, ValueError):
    """A checkpoint is corrupt, unsafe to load, or does not match the model."""


class WeightsNotFoundError(MffzooError, RuntimeError):
    """Pretrained weights were requested but none are available."""


class DataError(MffzooError, ValueError):
    """A dataset is missing, empty, or has too many unreadable images."""


class ExportError(MffzooError, RuntimeError):
    """An export option or backend is unsupported on this machine."""


class CheckFailed(MffzooError):
    """A gate (e.g. export parity) was missed: the artefact exists but must not be trusted."""

    exit_code = 1
