"""``mffzoo eval`` (knn, linear, seg, finetune), ``mffzoo analyze`` (freq, filter, fusion), ``mffzoo reproduce``.

Thin click layers over :mod:`mffzoo.eval` and :mod:`mffzoo.analysis`: every command prints a table and writes
JSON (and a PNG for analyses) so results can be compared and archived.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..config import check_path
from ..errors import DataError
from ..io import check_output_file, check_output_folder, write_json  # stdlib only: `mffzoo --help` stays torch-free
from ..table import print_table
from .options import IMG_SIZE, LEVELS, MODEL, OUT_PATH, FiniteFloat, count, recipe_run

POSITIVE = FiniteFloat(min=0, min_open=True)

DEFAULT_OUT = Path("runs") / "eval"


def _quiet_timm() -> None:
    """timm logs every weight load at INFO; keep that for -v only so results stay readable."""
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("timm").setLevel(logging.WARNING)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text).replace("local-dir:", "")).strip("_.")[-80:] or "model"


def _data_root(data: str) -> Path:
    """``demo`` = the built-in demo dataset (generated on first use), else the folder as given."""
    if data == "demo":
        from ..data.demo import default_demo_root, write_demo_dataset

        try:
            return write_demo_dataset(default_demo_root())
        except ValueError as exc:
            raise DataError(f"demo dataset: {exc}") from None
    return check_path(data, "--data", existing=True)  # an over-long name: exists() itself would raise


def _marked(label: str, random_init: bool) -> str:
    """A table label that says when the numbers are an architecture's, not its weights' (as ``eval`` does)."""
    return label + (" (random init)" if random_init else "")


def _check_result_path(out: Path | None) -> None:
    """-o names the JSON file: a folder there (or a file above it) is refused before the evaluation runs."""
    if out is not None:
        check_output_file(out, "-o/--output")
    else:
        check_output_folder(DEFAULT_OUT, "the default results folder", fix="pass -o FILE.json")


def _emit(result: dict[str, Any], out: Path | None, default_name: str, update_zoo: bool, spec: str) -> None:
    from ..eval.results import result_rows, update_zoo_metrics

    rows, header = result_rows(result)
    print_table(rows, header)
    path = write_json(out or DEFAULT_OUT / default_name, result)
    click.echo(f"\nresults: {path}")
    if update_zoo:
        folder = update_zoo_metrics(spec, result)
        click.echo(f"zoo entry updated: {folder / 'mffzoo.json'}")


# auto, cpu, cuda or cuda:N; checked (one line on error) by mffzoo.eval.features.resolve_device
DEVICE_OPTION = click.option("--device", default="auto", show_default=True,
                             help="Where the encoder runs: auto (a CUDA GPU when one is visible), cpu, cuda, cuda:N.")


def _frozen_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the frozen-feature evaluations."""
    opts = [
        click.argument("model", type=MODEL),
        click.option("--data", "data", default="demo", show_default=True,
                     help="ImageNet-style folder with train/<class>/ and val/<class>/ ('demo': built-in data)."),
        click.option("--img-size", type=IMG_SIZE, default=None, help="Input size (default: the model's own)."),
        click.option("--random-init", is_flag=True, help="Use the architecture without weights (smoke tests)."),
        click.option("--batch-size", type=count(1), default=128, show_default=True, help="Images per encoder forward."),
        click.option("--workers", type=count(0), default=0, show_default=True, help="DataLoader worker processes."),
        click.option("--bf16", is_flag=True, help="bf16 autocast for the encoder (fast on AMX CPUs / GPUs)."),
        DEVICE_OPTION,
        click.option("--no-cache", is_flag=True, help="Do not read or write the feature cache."),
        click.option("--output", "-o", type=OUT_PATH, default=None,
                     help=f"JSON result file (default: {DEFAULT_OUT}/<task>-<model>.json)."),
        click.option("--update-zoo", is_flag=True,
                     help="Record the metrics in the model's local zoo entry (mffzoo.json)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


# ----------------------------------------------------------------------------------------------------- eval
@click.group("eval")
def eval_group() -> None:
    """Evaluate a backbone: k-NN and linear probe on frozen features, or full fine-tuning.

    \b
    MODEL is anything timm.create_model accepts (e.g. vit_base_patch16_224.mae, mff_vit_small.demo),
    hf-hub:/local-dir: names, a model folder, or a checkpoint file.
    """


@eval_group.command("knn")
@_frozen_options
@click.option("--k", type=count(1), default=20, show_default=True, help="Neighbours (DINO: 20).")
@click.option("--temperature", type=POSITIVE, default=0.07, show_default=True, help="Vote temperature (DINO: 0.07).")
def knn(model: str, data: str, img_size: int | None, random_init: bool, batch_size: int, workers: int, bf16: bool,
        device: str, no_cache: bool, output: Path | None, update_zoo: bool, k: int, temperature: float) -> None:
    """Weighted k-NN top-1/top-5 on frozen cls-token and avg-pooled features."""
    from ..eval.knn import knn_eval

    _check_result_path(output)
    _quiet_timm()
    result = knn_eval(model, _data_root(data), k=k, temperature=temperature, img_size=img_size,
                      random_init=random_init, batch_size=batch_size, workers=workers, bf16=bf16, cache=not no_cache,
                      device=device)
    _emit(result, output, f"knn-{_slug(model)}.json", update_zoo, model)


@eval_group.command("linear")
@_frozen_options
@click.option("--epochs", type=count(1), default=90, show_default=True)
@click.option("--probe-batch", type=count(2), default=256, show_default=True, help="Batch size of the probe.")
@click.option("--blr", type=POSITIVE, default=0.1, show_default=True,
              help="Base lr; lr = blr x probe batch / 256.")
@click.option("--lr", type=POSITIVE, default=None, help="Absolute lr (overrides --blr).")
@click.option("--optimizer", type=click.Choice(["lars", "sgd"]), default="lars", show_default=True,
              help="LARS as MAE/MFF; SGD suits small datasets (few iterations).")
@click.option("--warmup-epochs", type=count(0), default=10, show_default=True)
@click.option("--weight-decay", type=FiniteFloat(min=0), default=0.0, show_default=True)
@click.option("--pool", type=click.Choice(["cls", "avg"]), default="cls", show_default=True)
@click.option("--augment", is_flag=True, help="RandomResizedCrop + flip every step (runs the encoder; no cache).")
@click.option("--seed", type=count(0), default=0, show_default=True)
def linear(model: str, data: str, img_size: int | None, random_init: bool, batch_size: int, workers: int, bf16: bool,
           device: str, no_cache: bool, output: Path | None, update_zoo: bool, epochs: int, probe_batch: int,
           blr: float, lr: float | None, optimizer: str, warmup_epochs: int, weight_decay: float, pool: str,
           augment: bool, seed: int) -> None:
    """Linear probe (BatchNorm without affine + linear on the frozen cls token), as in MAE/MFF."""
    from ..config import from_dict
    from ..eval.linear import LinearProbeConfig, linear_probe

    _quiet_timm()
    cfg = from_dict(LinearProbeConfig, dict(epochs=epochs, batch_size=probe_batch, blr=blr, lr=lr,
                                            optimizer=optimizer, warmup_epochs=warmup_epochs,
                                            weight_decay=weight_decay, pool=pool, augment=augment, seed=seed))

    def log(rec: dict[str, Any]) -> None:
        if rec["epoch"] % 10 == 0 or rec["epoch"] == cfg.epochs:
            acc = f"  top-1 {rec['top1']:.2f}" if "top1" in rec else ""
            click.echo(f"epoch {rec['epoch']}/{cfg.epochs}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}{acc}", err=True)

    _check_result_path(output)
    result = linear_probe(model, _data_root(data), cfg, img_size=img_size, random_init=random_init,
                          batch_size=batch_size, workers=workers, bf16=bf16, cache=not no_cache, device=device,
                          log=log)
    _emit(result, output, f"linear-{_slug(model)}.json", update_zoo, model)


def _seg_data_help(cmd: click.Command) -> click.Command:
    """The shared --data option, described for an ADE20K-layout folder."""
    for p in cmd.params:
        if p.name == "data" and isinstance(p, click.Option):
            p.help = ("ADE20K-layout folder: images/{training,validation}/*.jpg and annotations/{training,validation}"
                      "/*.png, label 0 = ignore ('demo': built-in data).")
    return cmd


@_seg_data_help
@eval_group.command("seg")
@_frozen_options
@click.option("--levels", type=LEVELS, default=None,
              help="Comma-separated encoder blocks the head reads (default: 3,5,7,11 of 12, 7,11,15,23 of 24).")
@click.option("--num-classes", type=count(1), default=None,
              help="Classes (mask labels 1..K; default: the demo's own, else 150 as ADE20K).")
@click.option("--epochs", type=count(1), default=40, show_default=True)
@click.option("--probe-batch", type=count(2), default=16, show_default=True, help="Batch size of the head.")
@click.option("--lr", type=POSITIVE, default=1e-3, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--weight-decay", type=FiniteFloat(min=0), default=1e-4, show_default=True)
@click.option("--warmup-epochs", type=count(0), default=None, help="Linear warm-up (default: 1; 0 with --epochs 1).")
@click.option("--seed", type=count(0), default=0, show_default=True)
def seg(model: str, data: str, img_size: int | None, random_init: bool, batch_size: int, workers: int, bf16: bool,
        device: str, no_cache: bool, output: Path | None, update_zoo: bool, levels: list[int] | None,
        num_classes: int | None, epochs: int, probe_batch: int, lr: float, optimizer: str, weight_decay: float,
        warmup_epochs: int | None, seed: int) -> None:
    """Linear segmentation probe (BatchNorm + 1x1 conv on frozen blocks, DINOv2-style): mIoU, pixel accuracy."""
    from ..config import from_dict
    from ..eval.results import update_zoo_metrics
    from ..eval.seg import SegProbeConfig, demo_seg_data, seg_probe, seg_rows

    _quiet_timm()
    cfg = from_dict(SegProbeConfig, dict(epochs=epochs, batch_size=probe_batch, lr=lr, optimizer=optimizer,
                                         weight_decay=weight_decay, seed=seed,
                                         warmup_epochs=min(1, epochs - 1) if warmup_epochs is None else warmup_epochs))
    cfg.levels = levels

    def log(rec: dict[str, Any]) -> None:
        if rec["epoch"] % 10 == 0 or rec["epoch"] == cfg.epochs or "miou" in rec:
            miou = f"  mIoU {rec['miou']:.2f}" if "miou" in rec else ""
            click.echo(f"epoch {rec['epoch']}/{cfg.epochs}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}{miou}", err=True)

    _check_result_path(output)
    root = demo_seg_data() if data == "demo" else check_path(data, "--data", existing=True)
    res = seg_probe(model, root, cfg, img_size=img_size, random_init=random_init,
                    num_classes=num_classes, batch_size=batch_size, workers=workers, bf16=bf16, cache=not no_cache,
                    device=device, log=log).to_dict()
    rows, header = seg_rows(res)
    print_table(rows, header)
    path = write_json(output or DEFAULT_OUT / f"seg-{_slug(model)}.json", res)
    click.echo(f"\nresults: {path}")
    if update_zoo:
        click.echo(f"zoo entry updated: {update_zoo_metrics(model, res) / 'mffzoo.json'}")


@eval_group.command("finetune")
@recipe_run("--set model.pretrained=mff_vit_small.demo")
@click.option("--update-zoo", is_flag=True, help="Record the fine-tune accuracy in the pretrained model's zoo entry.")
def finetune(recipe: str, overrides: tuple[str, ...], output: Path | None, update_zoo: bool) -> None:
    """Fine-tune end to end from RECIPE (recipes/finetune_*.yaml) with the shared training engine.

    \b
    One process:  mffzoo eval finetune recipes/finetune_demo.yaml
    GPUs:         torchrun --nproc_per_node=8 -m mffzoo eval finetune recipes/finetune_vitb.yaml \\
                      --set model.pretrained=mff_vit_base.mff_in1k_800e --set data.root=/data/imagenet
    Resume:       rerun the same command
    """
    import os

    from ..eval.finetune import finetune as run_finetune
    from ..eval.finetune import load_finetune_recipe
    from ..train.data import resolve_root

    _quiet_timm()
    rec = load_finetune_recipe(recipe, list(overrides))
    result = run_finetune(recipe, list(overrides), output_dir=output)  # the file + overrides: marks a cut schedule
    if int(os.environ.get("RANK", "0")) != 0:
        raise SystemExit(result.exit_code)
    if not result.completed:  # exit 128 + signal number, as `mffzoo train`
        click.echo(result.stop_message)
        raise SystemExit(result.exit_code)
    x = result.extra
    res = {"task": "finetune", "model": rec.model.pretrained, "random_init": rec.model.random_init,
           "data": str(resolve_root(rec.data)), "epochs": result.epoch, "schedule": x.get("schedule"),
           "results": {"finetuned": {"top1": x["top1"], "top5": x["top5"], "best_top1": x["best_top1"]}},
           "run_dir": str(result.run_dir), "model_dir": str(x.get("model_dir"))}
    from ..eval.results import result_rows, update_zoo_metrics

    rows, header = result_rows(res)
    print_table(rows, header)
    path = write_json(result.run_dir / "finetune_result.json", res)
    md = x.get("model_dir")
    click.echo(f"\nresults: {path}\nclassifier: {md} (timm.create_model('local-dir:{md}', pretrained=True))")
    if update_zoo:
        folder = update_zoo_metrics(rec.model.pretrained, res)
        click.echo(f"zoo entry updated: {folder / 'mffzoo.json'}")


# -------------------------------------------------------------------------------------------------- analyze
@click.group("analyze")
def analyze() -> None:
    """Analyses from the MFF paper: latent frequency content, filtered-input accuracy, fusion weights."""


def _analysis_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.argument("models", type=MODEL, nargs=-1, required=True),
        click.option("--data", "data", default="demo", show_default=True,
                     help="ImageNet-style folder ('demo': built-in data)."),
        click.option("--label", "labels", multiple=True, help="Display name per MODEL (repeat, in order)."),
        click.option("--img-size", type=IMG_SIZE, default=None, help="Input size (default: each model's own)."),
        click.option("--random-init", is_flag=True, help="Use the architectures without weights (smoke tests)."),
        click.option("--num-images", type=count(1), default=None, help="Validation images to use (default: see each)."),
        DEVICE_OPTION,
        click.option("--out-dir", type=OUT_PATH, default=None,
                     help="Where the PNG and JSON go (default: runs/analysis)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@analyze.command("freq")
@_analysis_options
def freq(models: tuple[str, ...], data: str, labels: tuple[str, ...], img_size: int | None, random_init: bool,
         num_images: int | None, device: str, out_dir: Path | None) -> None:
    """Relative log amplitude of each block's feature-map spectrum (one panel per MODEL)."""
    from ..analysis.freq import frequency_analysis, plot_frequency

    check_output_folder(out_dir or Path("runs") / "analysis", "--out-dir")
    _quiet_timm()
    res = frequency_analysis(list(models), _data_root(data), num_images=num_images or 256, img_size=img_size,
                             random_init=random_init, labels=list(labels) or None, device=device)
    out_dir = out_dir or Path("runs") / "analysis"
    rows = []
    for label, m in res["models"].items():
        hf = m["high_freq"]
        rows.append([_marked(label, random_init), f"{m['grid'][0]}x{m['grid'][1]}", str(len(hf)), f"{hf[0]:+.3f}",
                     f"{hf[-1]:+.3f}", f"{m['mean_high_freq']:+.3f}"])
    print_table(rows, ["model", "grid", "blocks", "Δ@high first", "Δ@high last", "Δ@high mean"])
    png = plot_frequency(res, out_dir / "freq.png")
    js = write_json(out_dir / "freq.json", res)
    click.echo(f"\nplot: {png}\nnumbers: {js}\n(Δ@high: log-amplitude at the highest frequency below Nyquist minus "
               "DC; lower = more low-pass features)")


@analyze.command("filter")
@_analysis_options
@click.option("--head", type=click.Choice(["knn", "linear"]), default="knn", show_default=True)
@click.option("--radii", default=None, help="Comma-separated cut-off radii (x Nyquist), e.g. 0.1,0.25,0.5,1.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the feature cache.")
def filter_cmd(models: tuple[str, ...], data: str, labels: tuple[str, ...], img_size: int | None,
               random_init: bool, num_images: int | None, device: str, out_dir: Path | None, head: str,
               radii: str | None, no_cache: bool) -> None:
    """Top-1 on low-/high-pass filtered validation images across cut-off radii."""
    from ..analysis.filters import DEFAULT_RADII, filter_accuracy, plot_filters

    check_output_folder(out_dir or Path("runs") / "analysis", "--out-dir")
    _quiet_timm()
    try:
        rs = [float(r) for r in radii.split(",")] if radii else list(DEFAULT_RADII)
    except ValueError:
        raise DataError(f"--radii '{radii}' is not a comma-separated list of numbers (e.g. 0.1,0.25,0.5)") from None
    res = filter_accuracy(list(models), _data_root(data), radii=rs, head=head, labels=list(labels) or None,
                          img_size=img_size, random_init=random_init, num_images=num_images, cache=not no_cache,
                          device=device)
    out_dir = out_dir or Path("runs") / "analysis"
    rows = []
    for label, m in res["models"].items():
        for mode in ("low", "high"):
            rows.append([_marked(label, random_init), f"{mode}-pass", f"{m['clean']:.1f}",
                         *[f"{v:.1f}" for v in m[mode]]])
    print_table(rows, ["model", "filter", "clean", *[f"r={r:g}" for r in res["radii"]]])
    png = plot_filters(res, out_dir / "filter.png")
    js = write_json(out_dir / "filter.json", res)
    click.echo(f"\nplot: {png}\nnumbers: {js}")


@analyze.command("fusion")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out-dir", type=OUT_PATH, default=None,
              help="Where the PNG and JSON go (default: runs/analysis).")
def fusion(sources: tuple[str, ...], out_dir: Path | None) -> None:
    """Softmax fusion weights of MFF checkpoints, zoo folders or run directories (+ evolution for runs)."""
    from ..analysis.fusion import fusion_report, plot_fusion

    check_output_folder(out_dir or Path("runs") / "analysis", "--out-dir")
    res = fusion_report(list(sources))
    out_dir = out_dir or Path("runs") / "analysis"
    rows = []
    for src, m in res["models"].items():
        layers = m["fusion_layers"]
        names = [f"b{i}" for i in layers] if layers else [f"l{i}" for i in range(len(m["weights"]))]
        rows.append([src, " ".join(f"{n}={w:.3f}" for n, w in zip(names, m["weights"])),
                     str(len(m["history"]["step"])) if m.get("history") else "-"])
    print_table(rows, ["source", "softmax weights", "logged steps"])
    png = plot_fusion(res, out_dir / "fusion.png")
    js = write_json(out_dir / "fusion.json", res)
    click.echo(f"\nplot: {png}\nnumbers: {js}")


# ------------------------------------------------------------------------------------------------ reproduce
@click.command("reproduce")
@click.option("--output", "-o", type=OUT_PATH, default=Path("runs") / "reproduce", show_default=True,
              help="Where runs, JSON, table and plots go (reruns reuse finished runs).")
@click.option("--seeds", type=count(1), default=3, show_default=True)
@click.option("--epochs", type=count(1), default=None, help="Pretraining epochs per run (default: the budgeted value).")
@click.option("--quick", is_flag=True, help="A ~1-minute smoke run on 2 CPU cores (tiny data, 1 epoch); not a result.")
@click.option("--workers", type=count(1), default=None, help="Parallel runs (default: one per core, at most 2).")
def reproduce(output: Path, seeds: int, epochs: int | None, quick: bool, workers: int | None) -> None:
    """MAE vs MFF at small scale on the demo data: same recipe except fusion_layers, several seeds.

    Prints mean ± std of k-NN / linear-probe accuracy, reconstruction loss and high-frequency content, and writes
    reproduction.json, table.md and freq.png to --output. Budgeted for < 30 minutes on a 2-core CPU.
    """
    from ..analysis.reproduce import reproduce as run_reproduce
    from ..analysis.reproduce import summary_rows

    check_output_folder(output, "-o/--output")
    _quiet_timm()
    res = run_reproduce(output, seeds=seeds, epochs=epochs, quick=quick, workers=workers,
                        log=lambda s: click.echo(s, err=True))
    rows, header = summary_rows(res)
    if res.get("note"):  # --quick: said above and below the table, as in table.md and reproduction.json
        click.echo(f"{res['note']}\n")
    print_table(rows, header)
    if res.get("note"):
        click.echo(f"\n{res['note']}")
    click.echo(f"\nwall time {res['wall_s'] / 60:.1f} min; results {output / 'reproduction.json'}; "
               f"table {output / 'table.md'}; frequency plot {output / 'freq.png'}")
