"""Models: the timm backbones (registered on import) and the MFF/MAE pretraining model."""

from . import mff_vision_transformer  # noqa: F401  (registers mff_vit_* with timm)
from .mff_vision_transformer import ALIASES, ARCHS, PRETRAIN_DEFAULTS, ZOO_TAGS, canonical_arch
from .pretrain import MFFPretrainModel, MultiLevelFusion, PretrainOutput, create_pretrain_model

__all__ = [
    "ARCHS", "ALIASES", "PRETRAIN_DEFAULTS", "ZOO_TAGS", "canonical_arch",
    "MFFPretrainModel", "MultiLevelFusion", "PretrainOutput", "create_pretrain_model",
]
