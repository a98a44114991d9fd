"""Data: vocabularies, image transforms, per-task shard streams and the loaders that batch them.

    vocabs = build_vocabs(cfg)
    loader = make_train_loader(cfg, vocabs, rank, world_size, seed_offset=restarts, state=saved_state)
    batch = next(loader); stats = batch.pop("stats")   # {"skipped": {task: n}}
    for sub_batch in make_eval_loader(cfg, vocabs, "vqa", "test", rank, world_size): ...
"""

from spatialnet_dist.data.batches import StreamState, TrainLoader, make_eval_loader, make_train_loader
from spatialnet_dist.data.transforms import ImageTransform, model_image_size
from spatialnet_dist.data.vocab import build_vocabs

__all__ = [
    "ImageTransform",
    "StreamState",
    "TrainLoader",
    "build_vocabs",
    "make_eval_loader",
    "make_train_loader",
    "model_image_size",
]
