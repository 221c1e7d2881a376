"""mffzoo: MFF-pretrained Vision Transformers as timm models, with pretraining recipes and exporters.

``import mffzoo`` registers ``mff_vit_{small,base,large}[_patch16_224]`` with timm (timm has no plugin
discovery, so the import is what makes ``timm.create_model("mff_vit_small")`` work). The import itself stays
light (no torch): the architectures (:mod:`mffzoo.zoo.mff_vision_transformer`, from the tables in
:mod:`mffzoo.archs`) are registered the moment timm is imported (at once if it already is), and the torch-backed
API below loads on first use. That keeps ``mffzoo --help`` instant, since the CLI lives in this package and Python
imports this file before any of it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from . import models, zoo  # noqa: F401
    from .models import MFFPretrainModel, create_pretrain_model
    from .zoo import convert_checkpoint, load_model, zoo_home

# Public names that need torch: attribute -> module that defines it (loaded by __getattr__).
_LAZY = {
    "models": "mffzoo.models", "zoo": "mffzoo.zoo",
    "MFFPretrainModel": "mffzoo.models", "create_pretrain_model": "mffzoo.models",
    "convert_checkpoint": "mffzoo.zoo", "load_model": "mffzoo.zoo", "zoo_home": "mffzoo.zoo",
}

__all__ = ["__version__", "MFFPretrainModel", "create_pretrain_model", "convert_checkpoint", "load_model", "zoo_home"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mffzoo' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if module.__name__ == f"mffzoo.{name}" else getattr(module, name)


def _register_models() -> None:
    # mffzoo.zoo imports its entrypoints module (mff_vision_transformer); an import of it already under way (it may
    # be what imported timm) registers the models itself, and importing it again here would meet its
    # half-initialised modules.
    if "mffzoo.zoo" not in sys.modules:
        importlib.import_module("mffzoo.zoo")


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it makes the loader of ``timm`` call :func:`_register_models` once timm is loaded.

    It stays in place until timm actually loads: a mere ``importlib.util.find_spec("timm")`` (availability checks
    in other libraries) must not use it up.
    """

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        for finder in sys.meta_path:  # the finders after this one, as the import system would ask them
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            exec_timm(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_models()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader instance
        return spec


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if "timm" in sys.modules:
    _register_models()
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
