"""Data: vocabularies, image transforms, per-task shard streams and the loaders that batch them.

    vocabs = build_vocabs(cfg)
    loader = make_train_loader(cfg, vocabs, rank, world_size, start=micro_batches_done)
    batch = next(loader); loader.skipped; loader.position()   # {task: n}; what a checkpoint saves
    for sub_batch in make_eval_loader(cfg, vocabs, "vqa", "test", rank, world_size): ...
"""

from spatialnet_dist.data.batches import TrainLoader, make_eval_loader, make_train_loader
from spatialnet_dist.data.transforms import ImageTransform, model_image_size
from spatialnet_dist.data.vocab import build_vocabs

__all__ = [
    "ImageTransform",
    "TrainLoader",
    "build_vocabs",
    "make_eval_loader",
    "make_train_loader",
    "model_image_size",
]
