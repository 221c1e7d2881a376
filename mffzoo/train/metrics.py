"""What a run reports: progress (rank 0: a bar on a TTY, else plain lines), ``metrics.jsonl``, TensorBoard events
if installed.

Every record is one JSON object per line: ``{"type": "train", "step", "epoch", "loss", "lr", "img_s", "mem_mb",
"time", ...task metrics (e.g. "fusion_weights": [...])}`` per log window, ``loss`` its mean, or ``{"type": "epoch",
...}`` at each epoch end, ``loss`` the mean over all of that epoch's optimizer steps. ``epoch`` counts epochs done:
fractional in a window record (1.5 = halfway through the 2nd epoch), the 1-based number of the epoch that ended
in an epoch record. On resume, records newer than the checkpoint are dropped so the history has no repeated steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write, write_failed
from ..progress import Progress as BaseProgress
from ..progress import format_duration

_logger = logging.getLogger("mffzoo.train")

__all__ = ["MetricsWriter", "Progress", "read_metrics", "epoch_losses_from_metrics", "format_duration",
           "peak_memory_mb", "reset_peak_memory", "proc_status_kib"]

METRICS_NAME = "metrics.jsonl"


def proc_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` value in KiB (``VmRSS``, ``VmHWM``); None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's VmHWM (Linux >= 4.0; else a no-op)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA tensors allocated, or this process's resident
    set on CPU (VmHWM; ``ru_maxrss``, the peak since the start, where procfs is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = proc_status_kib("VmHWM")
    if hwm is None:
        import resource  # POSIX only

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return hwm / 1024


def read_metrics(run_dir: str | Path, kind: str | None = "train") -> list[dict[str, Any]]:
    """Records of ``RUN/metrics.jsonl`` (of one ``type``, or all with ``kind=None``)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill mid-write
        if kind is None or rec.get("type") == kind:
            out.append(rec)
    return out


def epoch_losses_from_metrics(run_dir: str | Path, epoch: int, step_in_epoch: int, steps_per_epoch: int,
                              ) -> tuple[float | None, float, int]:
    """(mean loss of the last completed epoch or None, loss sum and steps of the current epoch so far), rebuilt
    from ``metrics.jsonl``'s window means, each weighted by its steps (windows never span an epoch end), for a
    checkpoint of an older mffzoo that did not store them. ``epoch``: epochs completed (the checkpoint's)."""
    records = read_metrics(run_dir)

    def window_sum(lo: int, hi: int) -> tuple[float, int]:
        total, steps, prev = 0.0, 0, lo
        for r in records:
            step = int(r.get("step", 0))
            if lo < step <= hi and isinstance(r.get("loss"), (int, float)):
                total += float(r["loss"]) * (step - prev)
                steps += step - prev
                prev = step
        return total, steps

    start = epoch * steps_per_epoch
    last_sum, last_steps = window_sum(start - steps_per_epoch, start) if epoch else (0.0, 0)
    cur_sum, cur_steps = window_sum(start, start + step_in_epoch)
    return (last_sum / last_steps if last_steps else None), cur_sum, cur_steps


class MetricsWriter:
    """JSON-lines log plus TensorBoard; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_NAME
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            keep = [r for r in read_metrics(run_dir, None) if int(r.get("step", 0)) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))  # whole, or as it was
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: only with log.tensorboard

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                _logger.debug("tensorboard not installed; metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._f.write(json.dumps(record) + "\n")
        except OSError as exc:  # the disk filled up: one line; the last checkpoint stays and a rerun resumes
            raise write_failed(self.path, exc, where="pass another --output",
                               then="then rerun the same command to resume from the last checkpoint") from None
        if self.tb is not None and record.get("type") == "train":
            step = int(record["step"])
            for k, v in record.items():
                if k in ("type", "step") or v is None:
                    continue
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
                elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):  # e.g. train/fusion_weights/0 .. K-1
                        self.tb.add_scalar(f"train/{k}/{i}", x, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.tb is not None:
            self.tb.close()


class Progress(BaseProgress):
    """tqdm bar over optimizer steps (rank 0, on a TTY); otherwise plain log lines, no carriage returns: one per
    log window (``windows``: mode ``auto``, so a piped or batch-job log shows the run moving) and one per epoch
    (mode ``epoch``: those only)."""

    def __init__(self, mode: str, enabled: bool, total: int, initial: int) -> None:
        super().__init__(mode, enabled, total, initial, unit="step", logger=_logger)
        self.windows = self.lines and mode == "auto"

    def show(self, rec: dict[str, Any]) -> None:
        self.postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_s']:.0f}")

    def window_line(self, text: str) -> None:
        if self.windows and self.lines:
            self.logger.info(text)

    def epoch_line(self, text: str) -> None:
        self.line(text)
