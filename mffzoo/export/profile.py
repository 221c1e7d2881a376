"""Export profiles: one typed dataclass tree on the shared :mod:`mffzoo.config` machinery.

A profile says everything an export needs (model, format, precision, shape range, parity gates), so
``mffzoo export --profile export/trt-fp16.yaml`` is reproducible and a typo fails before the model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..archs import check_level_order
from ..config import MAX_BATCH, MAX_IMG_SIZE, check_name, check_path, load_config, read_yaml, require, to_dict
from ..errors import ConfigError

__all__ = [
    "BatchRange", "SizeRange", "Gates", "GateSet", "CheckConfig", "QuantizeConfig", "TrtConfig", "TritonConfig",
    "ExportProfile", "PRECISIONS", "load_profile", "find_profile",
]

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
Precision = Literal["fp32", "fp16", "bf16", "int8"]


@dataclass
class BatchRange:
    """Dynamic batch range of the artefact; ``opt`` is what TensorRT tunes its kernels for."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def validate(self) -> None:
        require(self.min >= 1, "batch.min", f"must be >= 1, got {self.min}")
        require(self.min <= self.opt <= self.max, "batch",
                f"needs min <= opt <= max, got {self.min}:{self.opt}:{self.max}; write e.g. --batch 1:8:32")
        # the parity check runs the model at the maximum batch: beyond this it dies in an allocation, not here
        require(self.max <= MAX_BATCH, "batch.max", f"must be at most {MAX_BATCH}, got {self.max}; write e.g. "
                "--batch 1:8:32")

    def check_batches(self) -> list[int]:
        """Minimum, an odd middle and maximum: odd sizes catch shape bugs that powers of two hide."""
        mid = (self.min + self.max) // 2
        if mid % 2 == 0:
            mid = mid + 1 if mid + 1 < self.max else mid - 1
        return sorted({b for b in (self.min, mid, self.max) if self.min <= b <= self.max})

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """``"MIN:OPT:MAX"``, ``"MIN:MAX"`` (opt = max) or ``"N"`` (fixed)."""
        out = cls(*_range_parts(text, "--batch", "1:8:32", lengths=(1, 2, 3)))
        out.validate()
        return out


def _range_parts(text: str, flag: str, example: str, lengths: tuple[int, ...]) -> tuple[int, int, int]:
    """``"MIN:OPT:MAX"`` (or, where ``lengths`` allows, ``"MIN:MAX"``, opt = max, and ``"N"``) as three ints."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) not in lengths:
        raise ConfigError(f"{flag} '{text}' is not MIN:OPT:MAX; write e.g. {flag} {example}")
    return parts[0], (parts[1] if len(parts) == 3 else parts[-1]), parts[-1]


@dataclass
class SizeRange:
    """``--dynamic-size MIN:OPT:MAX``: one artefact for any input height and width (each independently) in
    MIN..MAX pixels, multiples of the patch size (checked where the model is known); ``opt`` is what TensorRT
    tunes for. The position embedding is interpolated inside the graph (timm's ``dynamic_img_size``)."""

    min: int
    opt: int
    max: int

    def validate(self) -> None:
        require(1 <= self.min <= self.opt <= self.max <= MAX_IMG_SIZE, "dynamic_size",
                f"needs 1 <= min <= opt <= max <= {MAX_IMG_SIZE}, got {self.min}:{self.opt}:{self.max}; write e.g. "
                "--dynamic-size 224:512:1024")
        require(self.min < self.max, "dynamic_size", f"min and max are both {self.min}: for one fixed size use "
                f"--img-size {self.min} instead of --dynamic-size")

    def check_sizes(self, native: tuple[int, int], patch: int) -> list[tuple[int, int]]:
        """(height, width) pairs the parity check runs besides ``native`` (the full check there): the minimum
        square, and a non-square one: 480x640 (HxW) where the range holds it, else min x opt (or min x max).
        The maximum is not checked (at 1024 px a ViT-S check on a small CPU takes minutes)."""
        lo, hi = self.min, self.max
        wide = (480, 640) if lo <= 480 and 640 <= hi and 480 % patch == 0 and 640 % patch == 0 else \
            (lo, self.opt if self.opt != lo else hi)
        return [s for s in dict.fromkeys([(lo, lo), wide]) if s != native]

    @classmethod
    def parse(cls, text: str) -> SizeRange:
        out = cls(*_range_parts(text, "--dynamic-size", "224:512:1024", lengths=(3,)))
        out.validate()
        return out


@dataclass
class Gates:
    """Thresholds one comparison must meet; ``null`` disables a metric."""

    max_abs: float | None = None  # upper bound
    mean_abs: float | None = None  # upper bound
    cosine: float | None = None  # lower bound on the worst sample's cosine similarity
    top1: float | None = None  # lower bound on top-1 agreement (classifiers only)

    def check_range(self, prefix: str) -> None:
        """Range checks, named by the full key (``check.gates.fp32.max_abs``): only the profile knows the path."""
        for k in ("max_abs", "mean_abs"):
            v = getattr(self, k)
            require(v is None or v >= 0, f"{prefix}.{k}", f"must be >= 0 or null, got {v}")
        for k in ("cosine", "top1"):
            v = getattr(self, k)
            require(v is None or -1.0 <= v <= 1.0, f"{prefix}.{k}", f"must be in [-1, 1] or null, got {v}")


@dataclass
class GateSet:
    """Gates per precision, applied to the artefact vs fp32 PyTorch (what a user's model is)."""

    fp32: Gates = field(default_factory=lambda: Gates(max_abs=1e-4, cosine=0.99999, top1=1.0))
    fp16: Gates = field(default_factory=lambda: Gates(mean_abs=2e-3, cosine=0.999, top1=0.99))
    # bf16 keeps 8 mantissa bits (fp16: 10), so its mean error is ~4x fp16's; the cosine gate is the same.
    bf16: Gates = field(default_factory=lambda: Gates(mean_abs=1e-2, cosine=0.999, top1=0.98))
    int8: Gates = field(default_factory=lambda: Gates(cosine=0.99, top1=0.9))

    def for_precision(self, precision: str) -> Gates:
        return getattr(self, precision)


@dataclass
class CheckConfig:
    """Parity check run after every export (random tensors AND real images)."""

    enabled: bool = True
    images: Path | None = None  # image folder; default: the built-in demo dataset (written on first use)
    seed: int = 0
    gates: GateSet = field(default_factory=GateSet)


@dataclass
class TritonConfig:
    """Also add the artefact to a Triton model repository (see mffzoo/export/triton.py)."""

    repo: Path | None = None  # the model repository folder; null: no Triton output
    name: str | None = None  # Triton model name; default: the artefact's file name without suffix
    preprocess: bool = False  # add a Python-backend preprocessing model + ensemble: encoded images in
    kind: Literal["auto", "cpu", "gpu"] = "auto"  # instance_group kind; auto: CPU for ONNX, GPU for TensorRT
    instances: int = 1

    def validate(self) -> None:
        require(self.instances >= 1, "triton.instances", f"must be >= 1, got {self.instances}")
        if self.name is not None:  # the model's folder in the repository (+ <name>_preprocess, <name>_ensemble)
            check_name(self.name, "triton.name")
            require(all(c.isascii() and (c.isalnum() or c in "_.-") for c in self.name) and self.name[0] != ".",
                    "triton.name", f"'{self.name}' must be letters, digits, '_', '-', '.' (not first), e.g. mff_vits")
        if self.repo is not None:
            check_path(self.repo, "triton.repo")
        require(self.repo is not None or not self.preprocess, "triton.preprocess",
                "needs a repository: add --triton-repo DIR")


@dataclass
class QuantizeConfig:
    """int8 quantisation for CPU serving: ONNX Runtime's quantiser (onnx) or NNCF (openvino, always calibrated)."""

    mode: Literal["dynamic", "static"] = "dynamic"  # onnx only: NNCF (openvino) always calibrates
    # --calib-images; default: onnx static: the parity image folder, openvino: the built-in demo data
    calibration_images: Path | None = None
    num_calibration: int = 64
    per_channel: bool = True  # per-output-channel weight scales: what export/onnx-int8-cpu.yaml and the bench measure
    reduce_range: bool | None = None  # 7-bit weights; null: auto, on unless the CPU has VNNI (see quantize.py);
    # openvino: NNCF's overflow_fix (enable / disable)

    def validate(self) -> None:
        require(self.num_calibration >= 1, "quantize.num_calibration", f"must be >= 1, got {self.num_calibration}")


@dataclass
class TrtConfig:
    """TensorRT engine build settings (precision itself comes from the ONNX dtypes: strongly typed network)."""

    workspace_gb: float = 4.0
    timing_cache: Path | None = None  # folder or file, keyed per TensorRT + GPU (default ~/.cache/mffzoo/trt-timing/)
    tf32: bool = False  # off keeps fp32 engines inside the fp32 parity gate
    optimization_level: int = 3

    def validate(self) -> None:
        require(self.workspace_gb > 0, "trt.workspace_gb", f"must be > 0, got {self.workspace_gb}")
        require(0 <= self.optimization_level <= 5, "trt.optimization_level",
                f"must be 0..5, got {self.optimization_level}")


@dataclass
class ExportProfile:
    """Everything ``mffzoo export`` does, as data. CLI flags are overrides of these keys."""

    model: str = "mff_vit_small"  # registered name[.tag], model folder, checkpoint file, hf-hub:/local-dir:
    weights: str | None = None  # a tag of ``model`` or a weights path; overrides the weights ``model`` implies
    random_init: bool = False  # explicit random weights (smoke tests, speed); otherwise weights must exist
    seed: int = 0  # seeds random_init, so a random-init artefact can be re-checked later
    model_args: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs, e.g. a tiny test model
    format: str = "onnx"  # a name of mffzoo.export.formats.FORMATS: onnx | trt | openvino
    precision: Precision = "fp32"
    # auto: logits for classifiers, else pooled; levels: one NCHW map per block of ``levels`` (docs/dense.md)
    features: Literal["auto", "pooled", "tokens", "logits", "levels"] = "auto"
    levels: list[int] | None = None  # block indices (0-based) for features: levels; default: archs.DENSE_LEVELS
    levels_norm: bool = False  # apply the final norm to every level (timm's norm=True); mmseg's MAE does not
    batch: BatchRange = field(default_factory=BatchRange)
    img_size: int | None = None  # default: the model's (with dynamic_size: its position-embedding grid)
    dynamic_size: SizeRange | None = None  # any H and W in min..max px in one artefact; null: fixed img_size
    opset: int = 20
    slim: bool = True  # onnxslim pass (keeps the dynamic batch)
    output: Path | None = None  # default: exports/<model>-<features>-<precision>.<onnx|engine|xml>
    triton: TritonConfig = field(default_factory=TritonConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    trt: TrtConfig = field(default_factory=TrtConfig)

    def validate(self) -> None:
        require(bool(self.model), "model", "must name a model, e.g. mff_vit_small or a model folder")
        check_path(self.model, "model", existing=True)  # a name or a path: either way it must fit a file name
        require(17 <= self.opset <= 23, "opset",
                f"must be 17..23 (>= 17 for exact LayerNorm, 20 recommended), got {self.opset}")
        from .formats import FORMATS  # the formats read no profile at import: no cycle

        fmt = FORMATS.get(self.format)
        require(fmt is not None, "format",
                f"expected one of {', '.join(repr(n) for n in FORMATS)}, got {self.format!r}")
        assert fmt is not None
        require(self.precision in fmt.precisions, "precision", fmt.precision_error(self.precision))
        require(self.quantize.calibration_images is None or fmt.needs_calibration(self), "quantize.calibration_images",
                "calibration images apply to int8 with --format openvino or --quantize static only; drop "
                "--calib-images or add --precision int8")
        require(self.img_size is None or 0 < self.img_size <= MAX_IMG_SIZE, "img_size",
                f"must be in 1..{MAX_IMG_SIZE} (a multiple of the patch size), got {self.img_size}")
        if self.output is not None:
            check_path(self.output, "output")
        require(self.quantize.mode == "dynamic" or self.precision == "int8", "quantize.mode",
                f"'{self.quantize.mode}' quantisation applies to precision int8 only (this profile is "
                f"{self.precision}); add --precision int8 or drop --quantize {self.quantize.mode}")
        for p in PRECISIONS:
            self.check.gates.for_precision(p).check_range(f"check.gates.{p}")
        self.validate_dense()

    def validate_dense(self) -> None:
        """``levels``/``levels_norm`` need ``features: levels``; an ``img_size`` must lie in ``dynamic_size``."""
        for key, given, flag in (("levels", self.levels is not None, "--levels"),
                                 ("levels_norm", self.levels_norm, "--levels-norm")):
            require(not given or self.features == "levels", key, f"applies to features: levels only (this profile "
                    f"has features: {self.features}); add --features levels or drop {flag}")
        if self.levels is not None:
            check_level_order(self.levels)
        d = self.dynamic_size
        if d is not None and self.img_size is not None:
            require(d.min <= self.img_size <= d.max, "img_size",
                    f"{self.img_size} lies outside dynamic_size {d.min}:{d.opt}:{d.max}; --img-size sets the "
                    "position-embedding grid and must be a servable size: pass one in that range or drop it")


def find_profile(name: str | os.PathLike[str]) -> Path:
    """A profile path, or a bare name (``onnx-fp16``) looked up in ./profiles/ and the source checkout's profiles/."""
    p = check_path(name, "--profile", existing=True)  # an over-long name: is_file() itself would raise
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
    check_path(stem, "--profile", existing=True)
    for root in (Path.cwd() / "profiles", Path(__file__).resolve().parents[2] / "profiles"):
        if (root / stem).is_file() and (p.parent == Path(".") or p.parent == Path("profiles")):
            return root / stem
    raise ConfigError(f"export profile '{name}' not found; pass a YAML path or a name from profiles/ "
                      f"(e.g. onnx-fp32, onnx-fp16, onnx-int8-cpu, trt-fp16)")


def default_profile_path() -> Path | None:
    """``profiles/default.yaml`` (cwd, then the source checkout); None means the dataclass defaults."""
    try:
        return find_profile("default")
    except ConfigError:
        return None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_profile(
    profile: str | os.PathLike[str] | ExportProfile | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **fields: Any,
) -> ExportProfile:
    """Profile file (default ``export/default.yaml``) + Python ``fields`` (nested dicts ok) + ``a.b=v`` overrides."""
    if isinstance(profile, ExportProfile):
        data: dict[str, Any] = to_dict(profile)
    else:
        path = find_profile(profile) if profile is not None else default_profile_path()
        data = read_yaml(path) if path is not None else {}
    data = _merge(data, to_dict({k: v for k, v in fields.items() if v is not None}))
    return load_config(ExportProfile, data, overrides)
