"""The batch contract: the rows the task streams make and the sub-batches `collate` builds from them.

A row is one visit of one image for one task: {"image": (C, S, S) float32, "image_id": str, ...} plus the
fields of the task's `row` (spatialnet_dist/tasks/<task>.py). A sub-batch is `collate` of B rows of one
task, the same in training and evaluation: "image" (B, C, S, S), "image_id" [B] and the task's fields;
each task writes its sub-batch down as a TypedDict with the shapes (e.g. tasks/vqa.py `VQABatch`).

Per-image items (vqa and regression questions, captioning captions) travel in a row as a list of dicts
under `QUESTIONS` or `CAPTIONS`; collate stacks them over the B images (Q or C items in all) and adds
"image_index" (Q,) int64 in [0, B), the row of "image" each item is about. The encoder runs once per
image and the heads gather each item's image by "image_index", so one encoder pass serves all the
questions (captions) a visit trains. A training batch (data/batches.py) is {task: sub-batch, ...};
`tasks.<task>.batch_size` counts rows, i.e. images.

Training rows also carry IMAGE_KEY, a string that names their image as transformed (the stored sample and
its symmetry), "" when no other row can share it. Rows of one micro-batch with the same key hold the same
image, so the model encodes it once for all of them (model/spatialnet.py): tasks reading the same corpora
visit the same images in the same order (data/order.py).

A task whose head encodes a masked image (tasks/mae.py; its head's `visible_tokens`, model/spatialnet.py) may
carry MASK_NOISE in its sub-batch: (B, N) float, each image's noise over its N patch tokens, whose lowest
values name the patches the encoder sees; without it the model draws the noise from torch's RNG.
"""

from __future__ import annotations

import torch

QUESTIONS = "questions"  # the row key of a vqa/regression visit's question dicts
CAPTIONS = "captions"  # the row key of a captioning visit's caption dicts
IMAGE_KEY = "image_key"  # a training row's image identity; rows with the same non-empty key hold the same image
MASK_NOISE = "mask_noise"  # a masked task's sub-batch key: (B, N) noise choosing each image's visible patches
FAN_OUT = (QUESTIONS, CAPTIONS)  # row keys of per-image items that collate lays out with "image_index"


def _stack(items: list[dict]) -> dict:
    """Dicts with the same keys -> tensors stacked, ints int64, floats float32, strings and lists kept as lists."""
    out = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, int):
            out[key] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, float):
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:
            out[key] = values
    return out


def collate(rows: list[dict]) -> dict:
    """Rows of one task -> its sub-batch (image-level fields of length B, question/caption-level ones of length Q/C)."""
    out = _stack([{k: v for k, v in row.items() if k not in FAN_OUT} for row in rows])
    for key in (k for k in FAN_OUT if k in rows[0]):
        out.update(_stack([item for row in rows for item in row[key]]))
        out["image_index"] = torch.tensor([i for i, row in enumerate(rows) for _ in row[key]], dtype=torch.int64)
    return out


def question_count(sub_batch: dict) -> int:
    """Q, the questions of the sub-batch of a task that asks questions (Task.asks_questions): its QUESTIONS items,
    which collate laid out with "image_index"."""
    return len(sub_batch["image_index"])
