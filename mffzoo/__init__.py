"""mffzoo: MFF-pretrained Vision Transformers as timm models, with pretraining recipes and exporters.

``import mffzoo`` registers ``mff_vit_{small,base,large}[_patch16_224]`` with timm (timm has no plugin
discovery, so the import is what makes ``timm.create_model("mff_vit_small")`` work).
"""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers the timm architectures)
from .models import MFFPretrainModel, create_pretrain_model  # noqa: E402
from .zoo import convert_checkpoint, load_model, zoo_home  # noqa: E402

__all__ = ["__version__", "MFFPretrainModel", "create_pretrain_model", "convert_checkpoint", "load_model", "zoo_home"]
