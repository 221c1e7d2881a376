"""Stopping a run on a signal: SIGTERM (what schedulers send) / SIGINT set a flag, the ranks vote on it every
optimizer step (:class:`~mffzoo.train.distributed.StopVote`) and stop at the same step, one after the signal.

Test hook (not a user setting): ``MFFZOO_TEST_SIGNAL_AT_STEP=STEP[:SIGNAL[:TARGET]]`` makes rank 0 send SIGNAL
(default TERM) right after optimizer step STEP to its own process group (TARGET ``group``, the default) or to its
parent's (``parent``: torchrun), so tests interrupt a run at a known step instead of racing it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ..errors import ConfigError
from .distributed import DistEnv, StopVote

_logger = logging.getLogger("mffzoo.train")

__all__ = ["StopSignal", "TestSignal", "StopRequest"]


class StopSignal:
    """SIGTERM (what schedulers send) / SIGINT set a flag; the ranks agree on it at the next step, save, exit."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0  # the strongest request so far (SIGTERM 15 over SIGINT 2): what the ranks vote with
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = max(self.signum, int(signum))

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TestSignal:
    """``MFFZOO_TEST_SIGNAL_AT_STEP`` (see the module docstring): a deterministic interruption for tests."""

    VAR = "MFFZOO_TEST_SIGNAL_AT_STEP"

    def __init__(self, step: int, sig: signal.Signals, target: str) -> None:
        self.step, self.sig, self.target = step, sig, target

    @classmethod
    def from_env(cls, env: DistEnv) -> TestSignal | None:
        spec = os.environ.get(cls.VAR, "").strip()
        if not spec or not env.is_main:
            return None
        parts = spec.split(":")
        try:
            step = int(parts[0])
            sig = signal.Signals[f"SIG{parts[1].upper().removeprefix('SIG')}"] if len(parts) > 1 else signal.SIGTERM
        except (ValueError, KeyError):
            raise ConfigError(f"{cls.VAR}='{spec}' is not STEP[:SIGNAL[:TARGET]], e.g. 5:TERM (a test hook)") from None
        target = parts[2] if len(parts) > 2 else "group"
        if target not in ("group", "parent"):
            raise ConfigError(f"{cls.VAR}: target '{target}' must be group or parent (a test hook)")
        return cls(step, sig, target)

    def maybe_fire(self, global_step: int) -> None:
        """Signal our own group now (so this rank's request is in this step's vote whatever the parent does),
        then, for ``parent``, the parent's: torchrun forwards it to every rank's process group.

        The signal comes from a forked child, as from ``kill`` in a shell or a scheduler: torch's loader workers
        treat a SIGTERM from their own parent (the main process) differently from anyone else's."""
        if global_step != self.step:
            return
        pids = [os.getpid()] + ([os.getppid()] if self.target == "parent" else [])
        for pid in pids:
            # a whole group only where that process leads it (a test starts it with start_new_session=True)
            leads = os.getpgid(pid) == pid
            _logger.warning("test hook %s: sending %s to %s %d at step %d", self.VAR, self.sig.name,
                            "process group" if leads else "process", pid, global_step)
            child = os.fork()
            if child == 0:  # pragma: no cover - the child only sends the signal
                try:
                    (os.killpg if leads else os.kill)(pid, self.sig)
                finally:
                    os._exit(0)
            os.waitpid(child, 0)  # sent (and delivered to us, if we are in that group) when this returns


class StopRequest:
    """A run's stop machinery: the signal handler (entered around the loop), the test hook and the ranks' vote;
    ``agreed`` is the signal the ranks agreed to stop on at the latest vote (0: none), ``reason`` how the run
    ends (``finished``, or ``sigterm`` / ``sigint`` once the ranks stopped on one)."""

    def __init__(self, env: DistEnv) -> None:
        self.signal = StopSignal()
        self.test = TestSignal.from_env(env)
        self.vote = StopVote(env)  # collective: every rank creates it, in the same order
        self.agreed = 0
        self.reason = "finished"

    def __enter__(self) -> StopRequest:
        self.signal.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.signal.__exit__(*exc)

    def after_step(self, global_step: int) -> int:
        """Every optimizer step, on every rank (no host sync): fire the test hook when due, then the vote, which
        under torchrun answers one step late."""
        if self.test is not None:
            self.test.maybe_fire(global_step)
        self.agreed = self.vote.poll(self.signal.signum)
        return self.agreed

    def at_epoch_end(self) -> int:
        """A blocking vote (the ranks sync at an epoch's end anyway): nothing requested is left in flight."""
        self.agreed = max(self.agreed, self.vote.poll(self.signal.signum, sync=True))
        return self.agreed

    def stopped(self, signum: int) -> str:
        """The ranks stop on ``signum``: the run's end reason from here on; returns the signal's name."""
        self.reason = signal.Signals(signum).name.lower()
        return signal.Signals(signum).name

    def close(self) -> None:
        self.vote.close()
