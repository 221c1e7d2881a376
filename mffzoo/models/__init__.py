"""Models: the MFF/MAE pretraining model (nn modules only). The timm backbones are registered by
:mod:`mffzoo.zoo.mff_vision_transformer`; the architecture tables live in :mod:`mffzoo.archs` (re-exported here)."""

from ..archs import ALIASES, ARCHS, PRETRAIN_DEFAULTS, ZOO_TAGS, canonical_arch
from .mff import MFFPretrainModel, MultiLevelFusion, PretrainOutput, create_pretrain_model

__all__ = [
    "ARCHS", "ALIASES", "PRETRAIN_DEFAULTS", "ZOO_TAGS", "canonical_arch",
    "MFFPretrainModel", "MultiLevelFusion", "PretrainOutput", "create_pretrain_model",
]
