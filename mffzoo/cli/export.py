"""``mffzoo export``: a thin click layer over :func:`mffzoo.export.export_model` / ``check_artefact``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..table import print_table
from .options import FEATURES, IMG_SIZE, IN_PATH, LEVELS, MODEL, OUT_PATH


def _print_report(report: Any) -> None:
    rows, header = report.table()
    print_table(rows, header)


@click.command("export")
@click.argument("model", type=MODEL, required=False)
@click.option("--format", "fmt", metavar="FORMAT", default=None,
              help="Artefact format, a name in the export-format registry (mffzoo.export.formats): onnx (the "
                   "profile default), openvino (an IR, .xml + .bin), trt; checked when the profile is loaded.")
@click.option("--profile", default=None,
              help="Export profile: a YAML path or a name in profiles/ (default: profiles/default.yaml).")
@click.option("--weights", default=None, help="A pretrained tag of MODEL or a weights path (folder or checkpoint).")
@click.option("--random-init", is_flag=True, default=None, help="Random weights (seeded), for smoke tests and speed.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default=None)
@click.option("--batch", default=None, help="Dynamic batch range MIN:OPT:MAX (e.g. 1:8:32).")
@click.option("--img-size", type=IMG_SIZE, default=None, help="Input resolution (a multiple of the patch size).")
@click.option("--output", "-o", type=OUT_PATH, default=None,
              help="Artefact path (default: exports/<model>-<features>-<precision>.onnx|.engine|.xml).")
@click.option("--overwrite", is_flag=True, help="Replace an existing artefact (refused otherwise).")
@click.option("--features", type=FEATURES, default=None,
              help="Output: pooled embedding, all tokens, logits (auto: logits for classifiers, else pooled), or "
                   "levels: one (B, C, H/p, W/p) map per --levels block, for dense heads (docs/dense.md).")
@click.option("--levels", type=LEVELS, default=None,
              help="With --features levels: 0-based encoder blocks, increasing (default: the arch's, e.g. 3,5,7,11 "
                   "for 12 blocks, 7,11,15,23 for 24).")
@click.option("--levels-norm", is_flag=True, default=None,
              help="With --features levels: apply the final norm to every level (default: off, as mmseg's MAE).")
@click.option("--dynamic-size", default=None, metavar="MIN:OPT:MAX",
              help="Any input height and width in MIN..MAX px (multiples of the patch size) in one artefact; "
                   "OPT is what TensorRT tunes for (e.g. 224:512:1024).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 20).")
@click.option("--quantize", type=click.Choice(["dynamic", "static"]), default=None,
              help="int8 mode of ONNX Runtime (OpenVINO's NNCF int8 is always calibrated).")
@click.option("--calib-images", type=IN_PATH, default=None,
              help="Image folder for int8 calibration (openvino, or --quantize static; default: the demo data).")
@click.option("--check-images", type=IN_PATH, default=None,
              help="Image folder for the parity check (default: the built-in demo dataset).")
@click.option("--no-check", is_flag=True, help="Skip the parity check (the sidecar then says so).")
@click.option("--check-only", "check_only", type=IN_PATH, default=None,
              help="Re-check an existing ARTEFACT against the weights its sidecar names; export nothing.")
@click.option("--triton-repo", type=OUT_PATH, default=None,
              help="Also add the artefact to this Triton model repository (config.pbtxt + next version).")
@click.option("--triton-preprocess", is_flag=True, default=None,
              help="With --triton-repo: add a preprocessing model + ensemble, so clients send encoded images.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any profile key.")
def export(model: str | None, fmt: str | None, profile: str | None, weights: str | None, random_init: bool | None,
           precision: str | None, batch: str | None, img_size: int | None, output: Path | None, overwrite: bool,
           features: str | None, levels: list[int] | None, levels_norm: bool | None, dynamic_size: str | None,
           opset: int | None, quantize: str | None, calib_images: Path | None, check_images: Path | None,
           no_check: bool, check_only: Path | None, triton_repo: Path | None, triton_preprocess: bool | None,
           overrides: tuple[str, ...]) -> None:
    """Export MODEL (name[.tag], model folder or checkpoint) to ONNX, TensorRT or OpenVINO, then check parity.

    Writes the artefact, <artefact>.json (sidecar: input, preprocessing, output, provenance, parity) and
    <artefact>.parity.json. Exit code 1 if a parity gate is missed (artefact and report kept), 2 on bad input.
    """
    from ..export import check_artefact, export_model
    from ..export.parity import ParityFailed
    from ..export.profile import BatchRange, SizeRange, load_profile

    try:
        if check_only is not None:
            given = [flag for flag, v in (
                ("MODEL", model), ("--format", fmt), ("--profile", profile), ("--weights", weights),
                ("--random-init", random_init), ("--precision", precision), ("--batch", batch),
                ("--img-size", img_size), ("--output", output), ("--features", features), ("--levels", levels),
                ("--levels-norm", levels_norm), ("--dynamic-size", dynamic_size), ("--opset", opset),
                ("--quantize", quantize), ("--calib-images", calib_images), ("--overwrite", overwrite),
                ("--no-check", no_check), ("--set", overrides),
                ("--triton-repo", triton_repo), ("--triton-preprocess", triton_preprocess),
            ) if v not in (None, False, ())]
            if given:
                raise ConfigError(f"--check-only re-checks an artefact with the settings recorded in its sidecar: "
                                  f"drop {', '.join(given)} (only --check-images combines with it)")
            report = check_artefact(check_only, images=check_images)
            _print_report(report)
            click.echo(f"parity passed: {check_only}")
            return
        check: dict[str, Any] = {}
        if no_check:
            check["enabled"] = False
        if check_images is not None:
            check["images"] = check_images
        prof = load_profile(
            profile, list(overrides), model=model, format=fmt, weights=weights, random_init=random_init,
            precision=precision, batch=BatchRange.parse(batch) if batch else None, img_size=img_size, output=output,
            features=features, levels=levels, levels_norm=levels_norm,
            dynamic_size=SizeRange.parse(dynamic_size) if dynamic_size else None, opset=opset, check=check or None,
            quantize={k: v for k, v in (("mode", quantize), ("calibration_images", calib_images)) if v} or None,
            triton={k: v for k, v in (("repo", triton_repo), ("preprocess", triton_preprocess)) if v} or None,
        )
        if quantize and prof.precision != "int8":  # dynamic is the default mode, so the profile cannot see this
            raise ConfigError(f"--quantize {quantize} applies to --precision int8 only (this export is "
                              f"{prof.precision}); add --precision int8 or drop --quantize")
        result = export_model(profile=prof, overwrite=overwrite)
    except ParityFailed as exc:
        _print_report(exc.report)
        raise
    if result.report is not None:
        _print_report(result.report)
    click.echo(f"wrote {result.artefact} and {result.sidecar.name}"
               + ("" if result.report else " (parity NOT checked: --no-check)"))
    if prof.triton.repo is not None:
        repo = prof.triton.repo.expanduser()
        click.echo(f"Triton repository {repo}: " + ", ".join(
            str(p.relative_to(repo)) for p in result.files if p.is_relative_to(repo)))
