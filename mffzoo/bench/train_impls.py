"""The implementations ``mffzoo bench train`` steps: mffzoo's rows, built and configured by the training engine's
own functions and task, and the Hugging Face ``ViTMAEForPreTraining`` peer with the same dimensions.

:func:`setup_impl` turns one row's name into a ready step (model, optimizer, AMP and ``step()``): the same
forward/backward/optimizer step as the training engine, one micro-batch, for mffzoo; the peer stepped by plain
``torch.optim.AdamW`` under the autocast its row names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import timm.optim  # noqa: F401  (imported up front: library code must not count as a model's memory or step)
import torch

from ..config import load_config
from ..errors import ConfigError
from ..train.attention import choose_attention
from ..train.compile import compile_for_training
from ..train.data import Batch
from ..train.numerics import Tf32, precision_name, resolve_precision
from ..train.optim import build_optimizer
from ..train.pretrain import PretrainTask
from ..train.recipe import PretrainRecipe, load_recipe

__all__ = [
    "SIZES", "SIZE_NAMES", "DEFAULT_BATCH", "DEFAULT_BATCH_GPU", "IMPLS", "PEERS", "PEER_OF", "EAGER_TWIN",
    "DEFAULT_IMPLS", "ImplSetup", "resolve_recipe", "base_recipe", "impl_recipe", "recipe_compiles", "hf_config",
    "build_model", "count_params", "default_batch", "preimport", "setup_impl",
]

# Sizes the benchmark knows, and the per-step batch used for every implementation of that size: on a CPU small
# enough for the 24 GB / 2-core dev machine in fp32 and a run of a few minutes; on a GPU large enough that the
# step is compute-bound (at 16 images a GPU step is kernel-launch-bound and MFU means nothing), and small enough
# for the HF peer in fp32 on a 40 GB card. A recipe (``--recipe``) uses its own ``train.batch_per_device``.
SIZES = {"s": "mff_vit_small_patch16_224", "b": "mff_vit_base_patch16_224", "l": "mff_vit_large_patch16_224"}
SIZE_NAMES = {"s": "ViT-S/16", "b": "ViT-B/16", "l": "ViT-L/16"}
DEFAULT_BATCH = {"s": 16, "b": 8, "l": 4}
DEFAULT_BATCH_GPU = {"s": 256, "b": 128, "l": 64}

IMPLS = {
    "hf": "HF ViTMAEForPreTraining, its defaults (fp32)",
    "hf-bf16": "HF ViTMAEForPreTraining + bf16 autocast (the peer under mffzoo's bf16)",
    "hf-fp16": "HF ViTMAEForPreTraining + fp16 autocast + GradScaler (the peer under mffzoo's fp16)",
    "mffzoo": "mffzoo MFF, recipe settings, eager",
    "mffzoo-compile": "mffzoo MFF, recipe settings + torch.compile (as train.compile does)",
    "mffzoo-mae": "mffzoo MAE mode (fusion_layers=[last]), recipe settings, eager",
    "mffzoo-sdpa": "mffzoo MFF, recipe settings but train.attention=sdpa (what the attention choice is worth)",
}
# The peer rows and the autocast precision each runs under; a mffzoo row is compared with the one of its precision.
PEERS = {"hf": "fp32", "hf-bf16": "bf16", "hf-fp16": "fp16"}
PEER_OF = {"fp32": "hf", "tf32": "hf", "bf16": "hf-bf16", "fp16": "hf-fp16"}
EAGER_TWIN = {"mffzoo-compile": "mffzoo"}  # compiled row -> the eager row of the same configuration
DEFAULT_IMPLS = ("mffzoo", "mffzoo-mae")
_PEER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # a peer row's autocast dtype (fp32: none)


@dataclass
class ImplSetup:
    """One implementation, ready to step, and what the report says of it.

    ``step`` is the timed step (through ``torch.compile`` for a compiled row); ``eager_step`` the same step on the
    plain module (what FLOPs are counted on)."""

    impl: str
    step: Callable[[], None]
    eager_step: Callable[[], None]
    precision: str
    attention: str
    optimizer: str
    compiled: bool
    params: int
    trainable_params: int


# --- recipes and models ---------------------------------------------------------------------------------------
def resolve_recipe(size: str, overrides: Sequence[str] = (), mae: bool = False, attention: str = "auto") -> Any:
    """The default pretraining recipe for a size, with ``key=value`` model overrides (e.g. ``depth=4``) checked
    by the same schema as ``mffzoo train`` — so the benchmarked model is exactly what a recipe builds.
    ``mae`` switches to the MAE baseline (``fusion_layers=[depth - 1]``); ``attention`` is ``train.attention``."""
    if size not in SIZES:
        raise ConfigError(f"unknown model size '{size}'; allowed: {', '.join(SIZES)} (e.g. --models s,b)")
    sets = [o if o.startswith("model.") else f"model.{o}" for o in overrides] + [f"train.attention={attention}"]
    recipe = load_config(PretrainRecipe, {"model": {"arch": SIZES[size]}}, overrides=sets)
    if mae:
        sets.append(f"model.fusion_layers=[{recipe.model.depth - 1}]")
        recipe = load_config(PretrainRecipe, {"model": {"arch": SIZES[size]}}, overrides=sets)
    return recipe


def base_recipe(spec: Mapping[str, Any]) -> Any:
    """The recipe a spec benches: ``spec["recipe"]`` with ``--set`` overrides, else a size's defaults."""
    if spec.get("recipe"):
        return load_recipe(spec["recipe"], list(spec.get("overrides", ())))
    return resolve_recipe(spec["size"], spec.get("overrides", ()))


def impl_recipe(base: Any, impl: str) -> Any:
    """What one mffzoo row runs: the base recipe, switched to MAE mode or SDPA attention by the row's name."""
    recipe = copy.deepcopy(base)
    if impl == "mffzoo-mae":
        recipe.model.fusion_layers = [recipe.model.depth - 1]
    elif impl == "mffzoo-sdpa":
        recipe.train.attention = "sdpa"
    return recipe


def recipe_compiles(recipe: Any) -> bool:
    """Whether a run of ``recipe`` may compile: ``true``, or ``auto`` (whose choice depends on the run's length and
    this configuration's measurements, :mod:`mffzoo.train.compile`): the bench then shows both rows."""
    return recipe.train.compile is not False


def hf_config(mc: Any) -> Any:
    """``ViTMAEConfig`` with the dimensions of a resolved ``ModelConfig`` (MLP ratio 4 as in timm's ViT).

    LayerNorm eps is set to timm's 1e-6 (HF's default is 1e-12): same model, and eps does not change speed."""
    from transformers import ViTMAEConfig  # optional dependency (mffzoo[bench]): only the peer needs it

    return ViTMAEConfig(
        hidden_size=mc.embed_dim, num_hidden_layers=mc.depth, num_attention_heads=mc.num_heads,
        intermediate_size=4 * mc.embed_dim, decoder_hidden_size=mc.decoder_dim,
        decoder_num_hidden_layers=mc.decoder_depth, decoder_num_attention_heads=mc.decoder_heads,
        decoder_intermediate_size=4 * mc.decoder_dim, mask_ratio=mc.mask_ratio, norm_pix_loss=mc.norm_pix_loss,
        image_size=mc.img_size, patch_size=mc.patch_size, num_channels=3, layer_norm_eps=1e-6,
    )


def build_model(impl: str, size: str = "s", overrides: Sequence[str] = (), *,
                recipe: Any = None) -> tuple[Any, Callable[[Any, Any], Any], Any]:
    """(model, loss_fn(module, images), recipe) for one implementation; ``recipe`` (a loaded recipe) replaces the
    size's defaults.

    mffzoo is built and stepped by the training engine's own ``PretrainTask`` (per-sample mask noise included);
    the peer gets the recipe's model dimensions and computes its own masking, as its users would run it."""
    if impl not in IMPLS:
        raise ConfigError(f"unknown implementation '{impl}'; allowed: {', '.join(IMPLS)}")
    recipe = impl_recipe(recipe if recipe is not None else resolve_recipe(size, overrides), impl)
    if impl.startswith("mffzoo"):
        task = PretrainTask(recipe)
        model = task.build_model()

        def loss_fn(module: Any, x: Any) -> Any:
            n = x.shape[0]
            seeds = torch.arange(n, dtype=torch.int64)
            batch = Batch(images=x, targets=torch.full((n,), -1, dtype=torch.int64), seeds=seeds)
            return task.step(module, batch)[0]

        return model, loss_fn, recipe
    from transformers import ViTMAEForPreTraining  # optional dependency (mffzoo[bench]): only the peer needs it

    model = ViTMAEForPreTraining(hf_config(recipe.model))
    return model, lambda module, x: module(pixel_values=x).loss, recipe


def count_params(model: Any) -> tuple[int, int]:
    """(all, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def default_batch(size: str, device: str) -> int:
    return (DEFAULT_BATCH_GPU if device == "cuda" else DEFAULT_BATCH)[size]


def preimport(impls: Iterable[str]) -> None:
    """Import the peer up front: library code must not count as a model's memory or first step."""
    if any(i in PEERS for i in impls):
        import transformers.models.vit_mae.modeling_vit_mae  # noqa: F401  (optional dependency, mffzoo[bench])


# --- one implementation, ready to step ------------------------------------------------------------------------
@dataclass
class _Numerics:
    """How one implementation steps: autocast dtype, GradScaler, TF32 flags, optimizer and gradient clipping."""

    amp_dtype: torch.dtype | None
    use_scaler: bool
    flags: Tf32
    opt: Any
    opt_name: str
    clip: float | None
    attention: str


def _ours(model: Any, loss_fn: Callable[[Any, Any], Any], recipe: Any, images: Any, device: str,
          batch: int) -> _Numerics:
    """Exactly what the engine does with the recipe: its precision, TF32, attention choice and optimizer."""
    dev = torch.device(device)
    amp_dtype, use_scaler = resolve_precision(recipe.train.precision, dev)
    flags = Tf32.for_run(dev, amp_dtype)  # as a run holds it; only around this implementation's steps

    def forward() -> None:
        with flags, torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss_fn(model, images)

    with torch.random.fork_rng(devices=[]):
        attention = "timm " + choose_attention(model, recipe.train.attention, dev, amp_dtype, forward).kernel
    opt = build_optimizer(model, recipe.optim, batch)
    opt_name = f"timm {recipe.optim.opt}" + (" fused" if opt.defaults.get("fused") else "")
    return _Numerics(amp_dtype, use_scaler, flags, opt, opt_name, recipe.optim.clip_grad, attention)


def _peer(model: Any, impl: str, recipe: Any, device: str, batch: int) -> _Numerics:
    """The peer: fp32 (its default), or under the autocast of the precision its row names, with plain
    ``torch.optim.AdamW`` as its users would build it (the recipe's hyper-parameters: they do not change speed)."""
    want = PEERS[impl]
    supported = want != "bf16" or device == "cpu" or torch.cuda.is_bf16_supported()
    amp_dtype = _PEER_DTYPES.get(want) if supported else None
    # fp32: torch's defaults (no TF32); AMP: what mffzoo's AMP rows get
    flags = Tf32.for_run(torch.device(device), amp_dtype)
    oc = recipe.optim
    opt = torch.optim.AdamW(model.parameters(), lr=oc.resolved_lr(batch), betas=tuple(oc.betas), eps=oc.eps,
                            weight_decay=oc.weight_decay)
    attention = f"transformers {model.config._attn_implementation}"
    return _Numerics(amp_dtype, amp_dtype == torch.float16, flags, opt, "torch AdamW", None, attention)


def setup_impl(impl: str, spec: Mapping[str, Any], base: Any = None) -> ImplSetup:
    """Model, optimizer, AMP and ``step()`` closures for one implementation of ``spec`` (``device``, ``batch``,
    ``seed`` and the recipe, :func:`base_recipe`; ``base`` is that recipe when already loaded)."""
    device, batch = spec["device"], int(spec["batch"])
    torch.manual_seed(int(spec.get("seed", 0)))
    model, loss_fn, recipe = build_model(impl, recipe=base if base is not None else base_recipe(spec))
    model.to(device).train()
    size = recipe.model.img_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if impl.startswith("mffzoo"):
        num = _ours(model, loss_fn, recipe, images, device, batch)
    else:
        num = _peer(model, impl, recipe, device, batch)
    compiled = compile_for_training(model, impl in EAGER_TWIN)  # the engine's own compile
    autocast = torch.autocast(device, dtype=num.amp_dtype or torch.float32, enabled=num.amp_dtype is not None)
    scaler = torch.amp.GradScaler(device, enabled=num.use_scaler)
    opt, clip = num.opt, num.clip

    def make_step(module: Any) -> Callable[[], None]:
        def step() -> None:  # the same forward/backward/optimizer step as the training engine, one micro-batch
            with num.flags:
                with autocast:
                    loss = loss_fn(module, images)
                scaler.scale(loss).backward()
                if clip is not None:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)

        return step

    with num.flags:  # what the matmuls of a step run in: the MFU peak to divide by
        tf32 = device == "cuda" and torch.backends.cuda.matmul.allow_tf32
    total, trainable = count_params(model)
    precision = precision_name(num.amp_dtype)
    return ImplSetup(impl=impl, step=make_step(compiled), eager_step=make_step(model),
                     precision="tf32" if tf32 and precision == "fp32" else precision, attention=num.attention,
                     optimizer=num.opt_name, compiled=impl in EAGER_TWIN, params=total, trainable_params=trainable)
