"""The zoo: the timm entrypoints (mff_vision_transformer, named as timm names its model families' modules, so
``timm.list_models(module="mff_vision_transformer")`` lists them), where weights live (home), where they come from
(weights), and how foreign formats map (convert). Importing the package registers the ``mff_vit_*`` models with timm."""

from . import mff_vision_transformer  # noqa: F401  (registers mff_vit_* with timm; mffzoo._register_models needs it)
from .checkpoint_io import atomic_torch_save, load_checkpoint_file
from .convert import Converted, convert_checkpoint, convert_state_dict
from .home import ZooEntry, entry_dir, list_local, write_model_folder, zoo_home
from .ref import ModelRef, parse_model_ref
from .weights import load_model, parse_model_spec, resolve_pretrained

__all__ = [
    "atomic_torch_save", "load_checkpoint_file", "Converted", "convert_checkpoint", "convert_state_dict",
    "ZooEntry", "entry_dir", "list_local", "write_model_folder", "zoo_home",
    "ModelRef", "parse_model_ref", "load_model", "parse_model_spec", "resolve_pretrained",
]
