"""Training data: which sample, under which seed, read how, augmented how, batched how.

Randomness is a function of the *sample*, not of the process: the sampler hands out ``(index, seed)`` pairs
where ``seed`` derives from (recipe seed, epoch, dataset index), and the augmentation and the mask noise (the
task) are drawn from that seed. So a run gives the same result on 1 or N processes with the same global batch,
in any number of loader workers, and a run resumed mid-epoch continues exactly where it stopped.

One job per module:

- :mod:`.seeds` - :func:`derive_seed` and :func:`sample_seed`, the seed of every random draw below;
- :mod:`.dataset` - the dataset: timm's readers (image folder, ``.tar``, Hugging Face datasets) opened safely,
  indexed by ``(index, seed)`` (:class:`SampleDataset`, :func:`build_dataset`);
- :mod:`.unreadable` - unreadable files, counted once per file over a run (:class:`UnreadableFiles`);
- :mod:`.augment` - the augmentations, and the same draws decoded cheaply (:class:`FastPretrainTransform`);
- :mod:`.sampler` - :class:`GlobalBatchSampler`, the same global batches on any world size, from any step;
- :mod:`.loader` - :class:`Batch`, what the loader yields, and :func:`build_loader` with its worker seeding.

A new dataset goes beside :mod:`.dataset` and a new sampler beside :mod:`.sampler`, each in its own module.
"""

from .augment import AugParams, FastPretrainTransform, plain_pretrain_transform, pretrain_transform, preview_transform
from .dataset import SampleDataset, ScannedImageFolder, build_dataset, open_image_dataset, resolve_root
from .loader import Batch, build_loader, collate
from .sampler import GlobalBatchSampler
from .seeds import derive_seed, sample_seed
from .unreadable import UnreadableFiles

__all__ = [
    "Batch", "SampleDataset", "GlobalBatchSampler", "build_dataset", "build_loader", "collate", "pretrain_transform",
    "preview_transform", "resolve_root", "sample_seed", "derive_seed", "UnreadableFiles", "plain_pretrain_transform",
    "FastPretrainTransform", "AugParams", "open_image_dataset", "ScannedImageFolder",
]
