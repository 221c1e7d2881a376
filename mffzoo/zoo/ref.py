"""What a MODEL argument names: the one parser of every form mffzoo accepts.

Forms (the CLI's MODEL, ``load_model``'s ``spec``, export's ``--weights``, eval's ``--update-zoo``):

- ``hf-hub:org/name``: a Hugging Face Hub repo (kind ``hub``);
- ``local-dir:PATH``, or any existing folder: a timm model folder (kind ``folder``; ``config.json`` +
  weights, what ``mffzoo convert``/``train`` write);
- a weights file: ``.safetensors``/``.pth``/``.pt``/``.bin``/``.ckpt``, there or not, or any existing file (kind
  ``file``; converted from any supported format);
- something written as a path (a separator, a leading ``.`` or ``~``) that is not there (kind ``missing``);
- anything else: a timm model name, with or without a tag: ``mff_vit_small``, ``mff_vit_small.demo`` (a zoo
  tag), ``mff_vit_base.mff_in1k_800e`` (an official tag), ``vit_base_patch16_224.mae`` (kind ``name``).

The parser only classifies (it reads nothing but whether a path is a folder or a file); what a kind needs
(config.json in a folder, a readable checkpoint, a registered tag) is checked by whoever loads it, with that
site's one-line error.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..archs import ARCHS, canonical_arch
from ..config import check_path
from ..errors import ConfigError

__all__ = ["ModelRef", "parse_model_ref", "parse_model_name", "HUB_PREFIX", "LOCAL_DIR_PREFIX", "WEIGHT_SUFFIXES"]

HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")

Kind = Literal["name", "folder", "file", "hub", "missing"]


@dataclass(frozen=True)
class ModelRef:
    """One parsed MODEL argument.

    ``spec`` is what the user wrote; ``name``/``tag`` are set for ``name`` refs (the timm name as written, alias
    or long, mff or any timm model), ``path`` for ``folder``/``file``/``missing``, ``hub_id`` for ``hub``.
    """

    kind: Kind
    spec: str
    name: str | None = None
    tag: str | None = None
    path: Path | None = None
    hub_id: str | None = None

    @property
    def arch(self) -> str | None:
        """The registered long name of an mff name (``mff_vit_small`` -> ``mff_vit_small_patch16_224``), the name
        itself for other timm models; None for paths and hub repos."""
        return canonical_arch(self.name) if self.name is not None else None

    @property
    def registered(self) -> bool:
        """A name of an architecture mffzoo registers with timm (any ``mff_vit_*``, alias or long)."""
        return self.arch in ARCHS

    @property
    def timm_name(self) -> str:
        """What ``timm.create_model`` is given for this ref (a file has no timm name: its tensors decide the
        architecture, so it is its path)."""
        if self.kind == "hub":
            return f"{HUB_PREFIX}{self.hub_id}"
        if self.kind == "folder":
            return f"{LOCAL_DIR_PREFIX}{self.path}"
        if self.kind == "name":
            return f"{self.name}.{self.tag}" if self.tag else str(self.name)
        return str(self.path)

    def with_tag(self, tag: str) -> ModelRef:
        """This name with another tag (``mff_vit_small.demo`` + ``mff_in1k_300e``)."""
        if self.kind != "name":
            raise ConfigError(f"'{self.spec}' is a {self.kind}, not a model name, so it has no tag '{tag}'; pass a "
                              "model name (e.g. mff_vit_small) with the tag, or the weights' path instead of the tag")
        return dataclasses.replace(self, spec=f"{self.name}.{tag}", tag=tag)


def parse_model_name(name: str) -> ModelRef:
    """A timm model name ``arch[.tag]``, read as a name whatever the file system holds (a zoo folder's name)."""
    base, _, tag = name.partition(".")
    return ModelRef("name", name, name=base, tag=tag or None)


def _written_as_path(s: str) -> bool:
    return "/" in s or os.sep in s or (os.altsep is not None and os.altsep in s) or s.startswith((".", "~"))


def parse_model_ref(spec: str | os.PathLike[str] | ModelRef, key: str = "MODEL") -> ModelRef:
    """Classify a MODEL argument (see the module's docstring); a :class:`ModelRef` is returned as it is.

    ``key`` names the argument in the one-line error for a path the file system cannot hold (over-long, NUL).
    """
    if isinstance(spec, ModelRef):
        return spec
    s = os.fspath(spec)
    p = check_path(s, key, existing=True)  # an over-long name: exists() itself would raise ENAMETOOLONG
    if s.startswith(HUB_PREFIX):
        return ModelRef("hub", s, hub_id=s[len(HUB_PREFIX):])
    if s.startswith(LOCAL_DIR_PREFIX):
        return ModelRef("folder", s, path=Path(s[len(LOCAL_DIR_PREFIX):]).expanduser())
    if p.is_dir():
        return ModelRef("folder", s, path=p)
    if p.suffix in WEIGHT_SUFFIXES or p.is_file():
        return ModelRef("file", s, path=p)
    if _written_as_path(s):
        return ModelRef("missing", s, path=p)
    return parse_model_name(s)
