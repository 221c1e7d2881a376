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


class InUseError(MffzooError, RuntimeError):
    """Another mffzoo process holds the lock on this output (run directory, zoo entry, artefact, repository)."""


class OutputPathError(MffzooError, ValueError):
    """An output path is taken by the other kind of thing: a file where a folder is wanted, or the reverse."""


class WriteFailed(MffzooError, OSError):
    """The file system refused a write (full, file-size limit, read-only, no permission); what was there stays.

    An ``OSError`` too, so code that tolerates a failed optional write (a cache) keeps tolerating it. ``path``,
    ``cause`` and ``remedy`` let a caller retell the message with its own context (:meth:`retold`).
    """

    def __init__(self, message: str, *, path: str | None = None, cause: str | None = None,
                 remedy: str | None = None) -> None:
        super().__init__(message)
        self.path, self.cause, self.remedy = path, cause, remedy

    @classmethod
    def compose(cls, path: str, cause: str, remedy: str, *, where: str = "write elsewhere",
                then: str = "then rerun") -> WriteFailed:
        """``could not write 'PATH': CAUSE; REMEDY or WHERE, THEN``: the path, the cause and the fix."""
        return cls(f"could not write '{path}': {cause}; {remedy} or {where}, {then}", path=path, cause=cause,
                   remedy=remedy)

    def retold(self, *, path: str | None = None, where: str = "write elsewhere", then: str = "then rerun",
               ) -> WriteFailed:
        """The same fault told with the caller's context (the final path, its option, what a rerun does)."""
        if self.cause is None or self.remedy is None:
            return self
        return self.compose(path or self.path or "?", self.cause, self.remedy, where=where, then=then)
