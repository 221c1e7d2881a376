"""What a run reports: a progress bar (rank 0, TTY only), ``metrics.jsonl``, TensorBoard events if installed.

Every record is one JSON object per line: ``{"type": "train", "step", "epoch", "loss", "lr", "img_s", "mem_mb",
"time", ...task metrics (e.g. "fusion_weights": [...])}`` or ``{"type": "epoch", ...}`` at each epoch end.
On resume, records newer than the checkpoint are dropped so the history has no repeated steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..progress import Progress as BaseProgress
from ..progress import format_duration

_logger = logging.getLogger("mffzoo.train")

__all__ = ["MetricsWriter", "Progress", "read_metrics", "format_duration", "peak_memory_mb", "reset_peak_memory",
           "proc_status_kib"]

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
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
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
        self._f.write(json.dumps(record) + "\n")
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
    """tqdm bar over optimizer steps (rank 0, on a TTY); otherwise one log line per epoch."""

    def __init__(self, mode: str, enabled: bool, total: int, initial: int) -> None:
        super().__init__(mode, enabled, total, initial, unit="step", logger=_logger)

    def show(self, rec: dict[str, Any]) -> None:
        self.postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_s']:.0f}")

    def epoch_line(self, text: str) -> None:
        self.line(text)
