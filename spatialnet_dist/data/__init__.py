"""Data: vocabularies, image transforms, per-task shard rows and the loaders that batch them.

    vocabs = data.vocab.build_vocabs(cfg)
    loader = data.batches.make_train_loader(cfg, vocabs, rank, world_size, start=micro_batches_done)
    batch = next(loader); loader.skipped; loader.position()   # {task: n}; what a checkpoint saves
    for sub_batch in data.batches.make_eval_loader(cfg, vocabs, "vqa", "test", rank, world_size): ...

This init imports nothing: config imports data.transforms without loading the loaders, which read the task
registry (tests/test_layering.py).
"""
