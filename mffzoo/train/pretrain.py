"""MFF / MAE pretraining as an engine :class:`~mffzoo.train.engine.Task`, and :func:`train`, the API the CLI calls.

The mask of each image is drawn from that image's seed (``batch.seeds``), never from a process-wide RNG, so a
run is the same on any number of processes and after a resume. At the end the encoder is written as a timm
model folder into ``RUN/model`` and, when the recipe names a ``publish.tag``, into the zoo home, where
``timm.create_model("<arch>.<tag>", pretrained=True)`` finds it.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..archs import describe_arch, published_tag, registered_schedule
from ..config import load_config, to_dict
from ..io import file_sha256
from ..models.mff import MFFPretrainModel, create_pretrain_model
from ..zoo.home import FUSION_LAYERS_KEY, WEIGHTS_NAME, entry_dir, git_commit
from .data import Batch, derive_seed, pretrain_transform, preview_transform
from .engine import FINAL_LOSS_KIND, RunContext, Task, TrainResult, run
from .metrics import read_metrics
from .publish import save_timm_folder
from .recipe import PretrainRecipe, load_recipe
from .visualize import save_fusion_plot, save_reconstruction_grid

_logger = logging.getLogger("mffzoo.train")

__all__ = ["PretrainTask", "mask_noise", "train"]


def mask_noise(seeds: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, L) uniform noise, row ``i`` drawn from ``seeds[i]`` only (argsort of it is the mask)."""
    out = torch.empty(len(seeds), num_patches)
    g = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        g.manual_seed(derive_seed(s, 1))
        torch.rand(num_patches, generator=g, out=out[i])
    return out


class PretrainTask(Task):
    recipe: PretrainRecipe

    def __init__(self, recipe: PretrainRecipe) -> None:
        super().__init__(recipe)
        m = recipe.model
        self.num_patches = (m.img_size // m.patch_size) ** 2
        self._vis: torch.Tensor | None = None

    # ---- what the engine needs
    def build_model(self) -> MFFPretrainModel:
        m = self.recipe.model
        return create_pretrain_model(
            m.arch, fusion_layers=m.fusion_layers, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
            decoder_heads=m.decoder_heads, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
            grad_checkpointing=m.grad_checkpointing, drop_path_rate=m.drop_path_rate, **m.encoder_kwargs(),
        )

    def build_transform(self) -> Callable[[Any], torch.Tensor]:
        return pretrain_transform(self.recipe.data, self.recipe.model.img_size)

    def step(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = mask_noise(batch.seeds, self.num_patches).to(batch.images.device, non_blocking=True)
        out = model(batch.images, noise=noise)
        return out.loss, {"fusion_weights": out.fusion_weights.detach()}

    def checkpoint_meta(self) -> dict[str, Any]:
        """What ``mffzoo convert`` reads next to ``model``, and the fused levels ``mffzoo analyze fusion`` reads."""
        m = self.recipe.model
        return {"arch": m.arch, "model_args": m.encoder_kwargs(), FUSION_LAYERS_KEY: m.fusion_layers}

    # ---- figures and publishing
    def _vis_images(self, ctx: RunContext) -> torch.Tensor:
        if self._vis is None:
            ds, k = ctx.dataset, self.recipe.log.vis_images
            tf = preview_transform(self.recipe.data, self.recipe.model.img_size)
            idx = torch.linspace(0, len(ds) - 1, k).round().long().unique().tolist()  # spread over classes
            self._vis = torch.stack([tf(ds.load(i)[0]) for i in idx])
        return self._vis

    def save_reconstructions(self, ctx: RunContext, name: str) -> Path | None:
        """Fixed images, fixed mask; every rank runs the forward (FSDP needs it), rank 0 writes."""
        if self.recipe.log.vis_images == 0:
            return None
        imgs = self._vis_images(ctx)
        noise = torch.rand(len(imgs), self.num_patches, generator=torch.Generator().manual_seed(
            derive_seed(self.recipe.train.seed, 0x515)))
        model = ctx.model
        was_training = model.training
        model.eval()
        try:
            dev = next(model.parameters()).device
            out = model.reconstruct(imgs.to(dev), noise=noise.to(dev))
        finally:
            model.train(was_training)
        if not ctx.env.is_main:
            return None
        d = self.recipe.data
        loss = f"{ctx.epoch_loss:.4f}" if ctx.epoch_loss is not None else "n/a"
        return save_reconstruction_grid(
            out, ctx.run_dir / "vis" / name, d.mean, d.std, norm_pix=self.recipe.model.norm_pix_loss,
            title=f"{self.recipe.name}: after epoch {ctx.epoch} of {self.recipe.train.epochs}, step "
                  f"{ctx.global_step}, loss {loss} (epoch mean)",
        )

    def on_epoch_end(self, ctx: RunContext) -> None:
        every = self.recipe.log.vis_every_epochs
        if every and ctx.epoch % every == 0 and ctx.epoch < self.recipe.train.epochs:
            self.save_reconstructions(ctx, f"reconstruction_epoch{ctx.epoch:04d}.png")

    def on_train_end(self, ctx: RunContext) -> dict[str, Any]:
        recon = self.save_reconstructions(ctx, f"reconstruction_epoch{ctx.epoch:04d}.png")
        if not ctx.env.is_main:
            return {}
        r, m = self.recipe, self.recipe.model
        records = read_metrics(ctx.run_dir)
        plot = save_fusion_plot(records, m.fusion_layers or [], ctx.run_dir / "fusion_weights.png",
                                title=f"{r.name}: {'MAE (single level)' if m.is_mae else 'MFF'} fusion weights")
        final_w = next((rec["fusion_weights"] for rec in reversed(records) if rec.get("fusion_weights")), None)
        assert ctx.state_dict is not None
        meta = self.provenance(ctx, final_w)
        tag = meta["tag"] = published_tag(m.arch, r.publish.tag, ctx.epoch) if r.publish.tag else None
        model_dir = save_timm_folder(ctx.run_dir / "model", m.arch, m.encoder_kwargs(), ctx.state_dict, meta)
        out: dict[str, Any] = {"model_dir": model_dir, "reconstruction_png": recon, "fusion_plot": plot,
                               "fusion_weights": final_w}
        if r.publish.zoo and tag:
            out["zoo_entry"] = save_timm_folder(entry_dir(m.arch, tag), m.arch, m.encoder_kwargs(),
                                                   ctx.state_dict, meta)
            _logger.info("published %s.%s (%s) -> %s", m.arch, tag, meta["model"], out["zoo_entry"])
            if tag != r.publish.tag:
                _logger.warning("published as %s.%s, not %s: this run trained %d of the %d epochs that tag stands "
                                "for; %s", m.arch, tag, r.publish.tag, ctx.epoch,
                                registered_schedule(m.arch, r.publish.tag), self._publish_anyway_hint(ctx))
        else:
            why = "publish.zoo is false" if not r.publish.zoo else "publish.tag is null"
            _logger.info("not published to the zoo (%s); weights in %s", why, model_dir)
        return out

    def _publish_anyway_hint(self, ctx: RunContext) -> str:
        """The command that publishes a partial run under its real tag, runnable as printed. It never carries
        --overwrite: weights already under that tag (a full run's, say) are the user's to replace, so the hint
        only says that they are there."""
        m, tag = self.recipe.model, self.recipe.publish.tag
        dest = entry_dir(m.arch, str(tag))
        ckpt = ctx.checkpoint or ctx.run_dir / "checkpoints" / f"checkpoint-{ctx.global_step:08d}.pth"
        hint = f"to publish it as {tag} anyway: {shlex.join(['mffzoo', 'convert', str(ckpt), str(dest)])}"
        if (dest / WEIGHTS_NAME).is_file():
            hint += f" ({dest} already holds weights: convert refuses to replace them unless you add --overwrite)"
        return hint

    def finished_outputs(self, ctx: RunContext, summary: dict[str, Any]) -> dict[str, Any] | None:
        """``RUN/model`` and the zoo entry this run published, when both are still there: a rerun then leaves
        them (and the evaluations recorded in the entry) alone. An entry that holds other weights now (published
        since by another run) is left too, and not claimed as this run's."""
        out: dict[str, Any] = {"model_dir": ctx.run_dir / "model"}
        mine = out["model_dir"] / WEIGHTS_NAME
        r, m = self.recipe, self.recipe.model
        tag = published_tag(m.arch, r.publish.tag, ctx.epoch) if r.publish.tag else None
        entry = entry_dir(m.arch, tag) if r.publish.zoo and tag else None
        if not mine.is_file() or (entry is not None and not (entry / WEIGHTS_NAME).is_file()):
            return None
        if entry is not None:
            if file_sha256(entry / WEIGHTS_NAME) == file_sha256(mine):
                out["zoo_entry"] = entry
            else:
                _logger.warning("%s holds other weights than this run's (published since); left as they are (to "
                                "replace them with this run's: %s --overwrite)", entry,
                                shlex.join(["mffzoo", "convert", str(ctx.checkpoint), str(entry)]))
        for key in ("reconstruction_png", "fusion_plot"):
            if summary.get(key) and Path(summary[key]).is_file():
                out[key] = Path(summary[key])
        if summary.get("fusion_weights") is not None:
            out["fusion_weights"] = summary["fusion_weights"]
        return out

    def provenance(self, ctx: RunContext, fusion_weights: Sequence[float] | None) -> dict[str, Any]:
        r = self.recipe
        return {
            "recipe_name": r.name, "recipe": to_dict(r), "tag": r.publish.tag, "epochs": ctx.epoch,
            "global_step": ctx.global_step, "images_seen": ctx.images_seen,
            "data": {"root": r.data.root, "dataset": r.data.dataset or "folder", "split": r.data.split,
                     "num_images": len(ctx.dataset), "augment": r.data.augment, "unreadable_skipped": ctx.bad_images},
            "model": describe_arch(r.model.arch, r.model.encoder_kwargs()),
            "final_loss": ctx.epoch_loss, "final_loss_kind": FINAL_LOSS_KIND,
            "method": "mae" if r.model.is_mae else "mff",
            FUSION_LAYERS_KEY: r.model.fusion_layers, "fusion_weights": list(fusion_weights or []),
            "world_size": ctx.env.world_size, "device": str(ctx.env.device), "wall_time_s": round(ctx.wall_s, 1),
            "git_commit": git_commit(Path(__file__).parent),
        }


def train(
    recipe: PretrainRecipe | str | os.PathLike[str] | dict[str, Any],
    overrides: Sequence[str] = (),
    *,
    output_dir: str | os.PathLike[str] | None = None,
    task: Task | None = None,
) -> TrainResult:
    """Pretrain per ``recipe`` (a :class:`PretrainRecipe`, a YAML path/name, or a mapping) + ``key=value``
    overrides. Works single-process and under ``torchrun``; returns on rank 0 and on every other rank."""
    if not isinstance(recipe, PretrainRecipe):
        recipe = load_recipe(recipe, list(overrides))
    elif overrides:
        recipe = load_config(PretrainRecipe, to_dict(recipe), list(overrides))
    return run(recipe, task or PretrainTask(recipe), output_dir)
