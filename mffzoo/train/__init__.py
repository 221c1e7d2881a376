"""Pretraining (``mffzoo train``) and the engine other objectives reuse.

``train(recipe, overrides)`` runs MFF/MAE pretraining from a recipe; ``run(recipe, task)`` runs any
:class:`Task` (e.g. fine-tuning) through the same loop. See :mod:`mffzoo.train.engine` for the task interface.
"""

from .data import Batch
from .engine import RunContext, Task, TrainingDiverged, TrainResult, run
from .pretrain import PretrainTask, train
from .publish import push_to_hub
from .recipe import EngineRecipe, PretrainRecipe, load_recipe

__all__ = [
    "Batch", "EngineRecipe", "PretrainRecipe", "PretrainTask", "RunContext", "Task", "TrainResult",
    "TrainingDiverged", "load_recipe", "push_to_hub", "run", "train",
]
