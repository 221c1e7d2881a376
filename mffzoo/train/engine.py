"""The training loop, shared by every objective: pretraining here, fine-tuning in the evaluation tools.

:func:`run` reads like facebookresearch/mae's ``main_pretrain`` + ``engine_pretrain``: join the process group,
build data, model, optimizer and schedule, resume, then loop epochs -> micro-batches with gradient accumulation,
logging every ``log.every_steps`` and checkpointing every ``checkpoint.every_steps`` and at epoch ends. The loop
is a sequence of phases over one :class:`~mffzoo.train.state.RunState`, each a function of its own::

    run                 process group, numerics (numerics.py); the run directory locked for the whole run
      build_run         (setup.py) data (fails fast), run directory, model + DDP/FSDP2, optimizer, schedule, scaler
      resume            (resume.py) newest valid checkpoint, checked to fit -> RunState.load_state_dict
      _already_finished a finished run with its outputs in place (task.finished_outputs): return, change nothing
      _start            attention kernel and compile (choices.py), loader, metrics writer, progress, the stop
                        request (signals.py); the header line
      _train_epoch      per epoch:
        _micro_step       forward + backward of one micro-batch (gradient sync on the last one only)
        _optimizer_step   step, counters, stop vote; when due: _flush, save_checkpoint or _stop_now
      _end_epoch        flush, synced stop vote, epoch record, checkpoint or stop, task.on_epoch_end
      _finish           task.on_train_end with the full state, summary.json

``_flush`` reduces a log window across ranks (the only host syncs) and ``_check_window`` stops on a non-finite
loss or too many unreadable files. What a checkpoint holds is :class:`~mffzoo.train.state.RunState`'s
``state_dict``: the state dicts of its components (position, losses, data stats, RNG, model + optimizer,
schedule, scaler, compile and attention choices), its layout written down once in :mod:`mffzoo.train.state`.

An objective plugs in as a :class:`Task` (see :class:`mffzoo.train.pretrain.PretrainTask`)::

    class MyTask(Task):
        def build_model(self) -> nn.Module: ...              # fp32 on CPU; the engine moves and wraps it
        def build_transform(self) -> Callable: ...           # PIL image -> normalised tensor (training aug.)
        def step(self, model, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
            ...                                              # runs under autocast; loss = mean over the
                                                             # micro-batch; metrics = detached tensors,
                                                             # averaged over each log window and all ranks.
                                                             # train.compile=auto may first time it on a
                                                             # synthetic batch (a shallow copy of the task)
        # optional hooks
        def on_dataset(self, dataset) -> None: ...           # check the data before a model is built
        def optimizer_kwargs(self, model) -> dict: ...       # extra timm create_optimizer_v2 kwargs
                                                             # (e.g. layer_decay=0.65 for fine-tuning)
        def checkpoint_meta(self) -> dict: ...               # plain data stored in every checkpoint
        def on_epoch_end(self, ctx: RunContext) -> None: ... # evaluation, figures (called on every rank)
        def on_train_end(self, ctx: RunContext) -> dict: ... # export/publish; returned into TrainResult.extra
        def finished_outputs(self, ctx, summary) -> dict | None: ...  # a finished run's outputs, if all there

    result = run(recipe, MyTask(recipe))     # recipe: any EngineRecipe subclass

``batch.seeds`` holds one seed per sample, derived from (recipe seed, epoch, dataset index): draw any per-sample
randomness from it (as the pretraining mask does) and the run is identical on 1 or N processes and after a
resume. Mixup-style randomness that needs the whole batch can seed a generator from ``batch.seeds``.

The engine owns: torchrun/DDP (``find_unused_parameters=False``) or FSDP2, the effective batch through gradient
accumulation, AMP (bf16 autocast; fp16 + GradScaler; fp32), ``torch.compile``, the optimizer (timm, no-decay
groups from ``model.no_weight_decay()``, fused AdamW), the attention kernel (``train.attention``) and
per-iteration warmup + cosine (timm),
checkpoints (atomic, last-k, exact resume), preemption (SIGTERM/SIGINT: every rank stops at the same optimizer
step, one step after the signal, saves and exits with 128 + the signal number), ``train.deterministic``, the NaN
stop, progress bar, ``metrics.jsonl`` and TensorBoard. Losses stay on the device and reach the host once per log
window. Tests interrupt a run at a known step with the hook in :mod:`mffzoo.train.signals`
(``MFFZOO_TEST_SIGNAL_AT_STEP``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import dump_yaml
from ..errors import MffzooError
from ..io import atomic_write, check_output_folder, exclusive, read_json_object
from .choices import decide_run_attention, decide_run_compile
from .compile import compile_for_training
from .data import Batch, build_loader
from .distributed import DistEnv, all_gather_object, all_reduce, barrier, destroy, init_distributed
from .metrics import MetricsWriter, Progress, format_duration, peak_memory_mb, reset_peak_memory
from .numerics import numerics, precision_name
from .optim import accumulation_steps, build_optimizer, fit_batch_per_device
from .recipe import EngineRecipe
from .resume import resume, save_checkpoint
from .setup import build_run
from .signals import StopRequest
from .state import LoopParts, RunState
from .task import FINAL_LOSS_KIND, FINAL_LOSS_LABEL, RunContext, Task, TrainResult

_logger = logging.getLogger("mffzoo.train")
SUMMARY_NAME = "summary.json"  # RUN/summary.json: how the run ended, and what on_train_end returned

__all__ = ["Task", "RunContext", "TrainResult", "TrainingDiverged", "accumulation_steps", "build_optimizer",
           "fit_batch_per_device", "run", "FINAL_LOSS_KIND", "FINAL_LOSS_LABEL", "SUMMARY_NAME"]


class TrainingDiverged(MffzooError):
    """The loss became NaN/inf; the run stopped without saving the bad state."""

    exit_code = 1


def _one_line(exc: MffzooError) -> MffzooError:
    """Errors raised in a loader worker arrive wrapped in a multi-line traceback; keep the message."""
    text = str(exc)
    if "\n" not in text:
        return exc
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return type(exc)(last.split(": ", 1)[1] if ": " in last else last)


# --------------------------------------------------------------------------------------------- the run
def run(recipe: EngineRecipe, task: Task, output_dir: str | Path | None = None) -> TrainResult:
    """Train ``task`` under ``recipe`` (single process, or one rank of a torchrun launch)."""
    t_start = time.time()
    env = init_distributed(recipe.train.device)
    if not env.is_main:
        _logger.setLevel(logging.WARNING)
    try:
        with numerics(recipe.train, env.device):
            run_dir = Path(recipe.run_dir(output_dir))
            with _run_lock(run_dir, env):  # a second process is refused at once, before any work
                return _run_locked(recipe, task, env, run_dir, t_start)
    except MffzooError as exc:
        raise _one_line(exc) from None
    finally:
        destroy(env)
        if not env.is_main:
            _logger.setLevel(logging.NOTSET)


@contextlib.contextmanager
def _run_lock(run_dir: Path, env: DistEnv) -> Iterator[None]:
    """Rank 0 checks the run directory (a folder, not a file) and holds its lock for the whole run; every rank
    gets rank 0's answer, so a refused run stops on all ranks at once with the same line."""
    with contextlib.ExitStack() as held:
        refused: tuple[type[MffzooError], str] | None = None
        if env.is_main:
            try:
                check_output_folder(run_dir, "run directory", fix="pass another --output")
                held.enter_context(exclusive(run_dir, fix="wait for it to finish or pass another --output"))
            except MffzooError as exc:
                refused = (type(exc), str(exc))
        refused = all_gather_object(refused)[0]
        if refused is not None:
            raise refused[0](refused[1])
        yield


def _run_locked(recipe: EngineRecipe, task: Task, env: DistEnv, run_dir: Path, t_start: float) -> TrainResult:
    """The whole run, phase by phase (see the module docstring)."""
    s = build_run(recipe, task, env, run_dir, t_start)
    resume(s)
    if (done := _already_finished(s)) is not None:
        return done
    if env.is_main:  # only now: a run refused above (another recipe's checkpoints) keeps its own recipe.yaml
        dump_yaml(recipe, run_dir / "recipe.yaml")
    _start(s)
    loop = s.loop
    try:
        with loop.stop:
            while s.position.epoch < s.tc.epochs and loop.stop.reason == "finished":
                _train_epoch(s)
                if loop.stop.reason != "finished":
                    break
                _end_epoch(s)
    finally:
        loop.stop.close()
        loop.progress.close()
        loop.writer.close()
        # Shut the loader workers down now. They ignore SIGTERM (a scheduler's signal is the main process's to
        # handle), so a loader still referenced at interpreter exit, e.g. from a frame kept alive by a reference
        # cycle in a hook, hangs multiprocessing's exit handler on their join.
        loop.loader = None
    return _finish(s)


def _already_finished(s: RunState) -> TrainResult | None:
    """A rerun of a finished run whose outputs are all in place: the result, having changed nothing. A finished
    run with an output missing (or no summary of its end) goes on to ``_finish``, which writes them again."""
    p, epoch_loss = s.position, s.losses.epoch_loss
    if p.global_step < p.total_steps:
        return None
    outputs = None
    if s.env.is_main:
        summary = read_json_object(s.run_dir / SUMMARY_NAME)
        if summary.get("completed") and summary.get("global_step") == p.global_step:
            outputs = s.task.finished_outputs(s.context(), summary)
    outputs = all_gather_object(outputs)[0]  # rank 0 decides for every rank
    done = (f"{p.epoch} epoch{'s' * (p.epoch != 1)}, {p.global_step} step{'s' * (p.global_step != 1)}, "
            f"{FINAL_LOSS_LABEL} " + (f"{epoch_loss:.4f}" if epoch_loss is not None else "n/a"))
    if outputs is None:
        if s.env.is_main:
            _logger.info("%s is already finished (%s) but its outputs are not all in place; writing them again from "
                         "its final checkpoint %s", s.run_dir, done, s.ckpt_path)
        return None
    if s.env.is_main:
        _logger.info("%s is already finished (%s); nothing to do: to train again, pass another --output, or --set "
                     "checkpoint.restart=true (its checkpoints are moved aside)", s.run_dir, done)
    return TrainResult(s.run_dir, True, "finished", p.epoch, p.global_step, p.total_steps, epoch_loss, s.ckpt_path,
                       time.time() - s.clock.t_start, 0.0, outputs if s.env.is_main else {}, already_finished=True)


def _start(s: RunState) -> None:
    """What the loop needs beyond the model: the attention and compile decisions, the compile wrapper, loader,
    metrics writer, progress, the stop machinery; and the header line that says what this run does."""
    tc, env, device, p, t = s.tc, s.env, s.device, s.position, s.trainee
    amp = torch.autocast(device.type, dtype=t.amp_dtype) if t.amp_dtype is not None else contextlib.nullcontext()
    decide_run_attention(s, amp)
    recorder = decide_run_compile(s, amp)
    train_model = compile_for_training(t.model, s.choices.compile.enabled)
    loader = build_loader(s.dataset, p.sampler, s.recipe.data, pin_memory=device.type == "cuda", seed=tc.seed,
                          rank=env.rank)
    writer = MetricsWriter(s.run_dir, env.is_main, s.recipe.log.tensorboard,
                           resume_step=p.global_step if s.resumed_from is not None else None)
    progress = Progress(s.recipe.log.progress, env.is_main, p.total_steps, p.global_step)
    if env.is_main:
        _logger.info(
            "training %s: %d images, %d epochs x %d steps, batch %d = %d per device x %d process%s x %d "
            "accumulation, lr %.3g, %s on %s, %s, compile: %s -> %s", s.recipe.name, len(s.dataset), tc.epochs,
            p.steps_per_epoch, tc.batch_size, tc.batch_per_device, env.world_size,
            "es" if env.world_size != 1 else "", p.accum, t.lr,
            precision_name(t.amp_dtype), device, s.choices.attention, s.choices.compile,
            s.run_dir)
        if t.warmup_steps >= p.total_steps:
            _logger.warning("the warm-up (optim.warmup_epochs=%g) covers the whole run (train.epochs=%d): the lr only "
                            "rises and never decays; lower optim.warmup_epochs or raise train.epochs",
                            s.recipe.optim.warmup_epochs, tc.epochs)
    s.loop = LoopParts(train_model, amp, loader, writer, progress, recorder, StopRequest(env))
    s.clock.t_loop = time.time()
    s.window.restart(s.clock.t_loop)
    reset_peak_memory(device)


# --------------------------------------------------------------------------------------------- one epoch
def _train_epoch(s: RunState) -> None:
    """The micro-batches of one epoch (from the sampler's position): an optimizer step every ``accum`` of
    them; stops early when the ranks agreed to stop mid-epoch (``s.loop.stop.reason`` then says why)."""
    p, loop = s.position, s.loop
    p.sampler.set_epoch(p.epoch, p.step_in_epoch)
    loop.train_model.train()
    s.window.restart(time.time())
    s.window.micro, s.window.step_loss, loop.stop.agreed = 0, None, 0
    for batch in _batches(loop.loader):
        _micro_step(s, batch)
        if s.window.micro == 0 and _optimizer_step(s):
            break


def _micro_step(s: RunState, batch: Batch) -> None:
    """Forward and backward of one micro-batch; gradients sync across ranks only on an optimizer step's last
    micro-batch. Loss and metrics stay on the device."""
    t, w, accum = s.trainee, s.window, s.position.accum
    if w.micro == 0:
        t.scheduler.step_update(num_updates=s.position.global_step)
    batch = batch.to(s.device)
    if batch.bad:
        s.data.add(batch.bad)
    with t.gradient_sync(last_micro=w.micro == accum - 1), s.loop.recorder.step():
        with s.loop.amp:
            loss, metrics = s.task.step(s.loop.train_model, batch)
        t.scaler.scale(loss / accum).backward()
    w.add_micro(loss, metrics, accum)


def _optimizer_step(s: RunState) -> bool:
    """Step, count, vote on a stop (every step, no host sync), then flush / checkpoint / stop when due.
    True when the epoch must end here (a stop mid-epoch was saved)."""
    p, stop = s.position, s.loop.stop
    s.trainee.step(s.recipe.optim.clip_grad)
    s.window.end_step(s.tc.batch_size)
    p.advance()
    s.clock.images_this_run += s.tc.batch_size
    s.loop.progress.update()
    stop.after_step(p.global_step)  # one step late under torchrun

    # host syncs only here: every log window, before a checkpoint, on a stop request
    every = s.recipe.checkpoint.every_steps
    ckpt_due = bool(every) and p.global_step % every == 0
    if p.global_step % s.recipe.log.every_steps == 0 or ckpt_due or stop.agreed:
        _flush(s)
        if p.mid_epoch and stop.agreed:
            _stop_now(s, stop.agreed, f"at step {p.global_step} (in epoch {p.epoch + 1}/{s.tc.epochs})")
            return True
        if ckpt_due and p.mid_epoch:
            save_checkpoint(s)
    return False


def _end_epoch(s: RunState) -> None:
    """Close the epoch: flush, a synced stop vote, the epoch record and line, then a stop checkpoint or the
    epoch's checkpoint, then the task's epoch hook (a stop at an epoch's last step is saved here)."""
    tc, p, losses, stop = s.tc, s.position, s.losses, s.loop.stop
    _flush(s)
    stop.at_epoch_end()
    losses.end_epoch()
    p.end_epoch()
    s.loop.writer.write({"type": "epoch", "step": p.global_step, "epoch": p.epoch, "loss": losses.epoch_loss,
                         "bad_images": s.data.total, "time": round(time.time() - s.clock.t_start, 2)})
    mean = f"{losses.epoch_loss:.4f}" if losses.epoch_loss is not None else "n/a"
    s.loop.progress.epoch_line(_status_line(s, p.epoch, f"loss {mean} (epoch mean)", s.clock.img_s()))
    if stop.agreed and p.epoch < tc.epochs:
        _stop_now(s, stop.agreed, f"at the end of epoch {p.epoch}")
    elif p.epoch % s.recipe.checkpoint.every_epochs == 0 or p.epoch == tc.epochs:
        save_checkpoint(s)
    s.task.on_epoch_end(s.context())


def _status_line(s: RunState, epoch: int, loss: str, img_s: float) -> str:
    """A progress line: ``epoch`` (1-based: the epoch running, or just done), step, ``loss``, lr, speed, time."""
    p, clock = s.position, s.clock
    elapsed = time.time() - clock.t_loop
    eta = elapsed / max(clock.images_this_run, 1) * (p.total_steps - p.global_step) * s.tc.batch_size
    return (f"epoch {epoch}/{s.tc.epochs}  step {p.global_step}/{p.total_steps}  {loss}  "
            f"lr {s.trainee.current_lr:.2e}  {img_s:.0f} img/s  "
            f"elapsed {format_duration(time.time() - clock.t_start)}  eta {format_duration(eta)}")


# --------------------------------------------------------------------------------------------- log window
def _flush(s: RunState) -> dict[str, Any] | None:
    """Reduce the log window across ranks (two collectives, one host sync), check it, log it; returns the record
    (None for an empty window)."""
    device, w, p = s.device, s.window, s.position
    packed = all_reduce(w.packed(device, s.data.new)) / s.env.world_size
    mem = all_reduce(torch.tensor([peak_memory_mb(device)], device=device), op="max")  # the fullest rank
    vals = torch.cat([packed, mem]).cpu()
    vals, mem_mb = vals[:-1], float(vals[-1])
    reset_peak_memory(device)  # each window reports its own peak
    n = len(w.losses)
    _check_window(s, vals[:n], new_bad=bool(vals[-1] > 0))
    rec = None
    if n:
        now = time.time()
        s.losses.add_window(vals[:n])
        rec = {"type": "train", "step": p.global_step,
               "epoch": round(p.epoch + p.step_in_epoch / p.steps_per_epoch, 4), "loss": s.losses.last_loss,
               "lr": s.trainee.current_lr, "img_s": round(w.images / max(now - w.t_start, 1e-9), 2),
               "mem_mb": round(mem_mb, 1), "time": round(now - s.clock.t_start, 2), **w.metrics_record(vals)}
        s.loop.writer.write(rec)
        s.loop.progress.show(rec)
        if s.loop.progress.windows and p.mid_epoch:  # (at an epoch's end: the epoch line)
            # off a terminal: a plain line per log window, where a bar would have moved
            s.loop.progress.window_line(_status_line(s, p.epoch + 1, f"loss {s.losses.last_loss:.4f}", rec["img_s"]))
        w.restart(now)
    w.clear()
    return rec


def _check_window(s: RunState, losses: torch.Tensor, new_bad: bool) -> None:
    """Stop on too many unreadable files (counted the same on every rank) or a non-finite loss (before anything
    of this window is saved)."""
    s.data.check(new_bad, s.env.is_main, len(s.dataset), s.recipe.data.max_bad_fraction)
    if len(losses) and not torch.isfinite(losses).all():
        bad_step = s.position.global_step - len(losses) + int((~torch.isfinite(losses)).nonzero()[0, 0]) + 1
        last = s.ckpts.list()
        raise TrainingDiverged(
            f"loss is {float(losses[~torch.isfinite(losses)][0])} at step {bad_step} (epoch {s.position.epoch + 1}); "
            f"stopped without saving. Last good checkpoint: {last[0] if last else 'none'}. Lower optim.blr, set "
            "optim.clip_grad or use train.precision=fp32, then rerun to resume from it"
        )


# --------------------------------------------------------------------------------------------- stop, finish
def _stop_now(s: RunState, signum: int, where: str) -> None:
    """The ranks agreed to stop on ``signum``: save where they are and end the loop (exit 128 + signum)."""
    name = s.loop.stop.stopped(signum)
    t0 = time.time()
    path = save_checkpoint(s)
    _logger.info("%s received: checkpoint %s saved %s in %.1f s", name, path, where, time.time() - t0)


def _finish(s: RunState) -> TrainResult:
    """A finished run hands the full state to the task's end hook (export, publish); every run writes its
    summary, finished or stopped."""
    p, stop_reason = s.position, s.loop.stop.reason
    completed = stop_reason == "finished" and p.epoch >= s.tc.epochs
    extra: dict[str, Any] = {}
    if completed:
        model_sd = s.trainee.model_state_dict()
        extra = s.task.on_train_end(s.context(model_sd if s.env.is_main else None)) or {}
        barrier()
    wall = time.time() - s.clock.t_start
    result = TrainResult(s.run_dir, completed, stop_reason, p.epoch, p.global_step, p.total_steps,
                         s.losses.epoch_loss, s.ckpt_path, wall, s.clock.img_s(), extra)
    if s.env.is_main:
        _write_summary(result, s.recipe, s.env, s.data.total)
    return result


def _batches(loader: Any) -> Iterator[Batch]:
    try:
        yield from loader
    except MffzooError as exc:
        raise _one_line(exc) from None


def _write_summary(result: TrainResult, recipe: EngineRecipe, env: DistEnv, bad_total: int) -> None:
    summary = {
        "name": recipe.name, "completed": result.completed, "stop_reason": result.stop_reason,
        "epochs": result.epoch, "global_step": result.global_step, "total_steps": result.total_steps,
        "final_loss": result.final_loss if result.final_loss is None or math.isfinite(result.final_loss) else None,
        "final_loss_kind": FINAL_LOSS_KIND,
        "images_seen": result.global_step * recipe.train.batch_size, "wall_s": round(result.wall_s, 1),
        "images_per_s_this_run": round(result.images_per_s, 1), "world_size": env.world_size,
        "device": str(env.device), "bad_images": bad_total,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in result.extra.items()},
    }
    atomic_write(result.run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
