"""The batch contract: the rows the task streams make and the sub-batches `collate` builds from them.

A row is one visit of one image for one task: {"image": (C, S, S) float32, "image_id": str, ...} plus the
fields of the task's `row` (spatialnet_dist/tasks/<task>.py). A sub-batch is `collate` of B rows of one
task: "image" (B, C, S, S), "image_id" [B] and the task's fields (in training its images move to the
micro-batch's one tensor, below); each task writes its sub-batch down as a TypedDict with the shapes (e.g. tasks/vqa.py `VQABatch`).

Per-image items (vqa and regression questions, captioning captions) travel in a row as a list of dicts
under `QUESTIONS` or `CAPTIONS`; collate stacks them over the B images (Q or C items in all) and adds
"image_index" (Q,) int64 in [0, B), the row of "image" each item is about. The encoder runs once per
image and the heads gather each item's image by "image_index", so one encoder pass serves all the
questions (captions) a visit trains. A training micro-batch (data/batches.py) is {IMAGES, task: sub-batch,
...}; `tasks.<task>.batch_size` counts rows, i.e. images.

Training rows also carry IMAGE_KEY, a string that names their image as transformed (the stored sample and
its symmetry), "" when no other row can share it: tasks reading the same corpora visit the same images in the
same order (data/order.py), so rows of several tasks show the same images. A training micro-batch
(`micro_batch`) therefore holds one image tensor, IMAGES (U, C, S, S): the distinct images of all its rows
(one per non-empty key, one per keyless row), stacked once. Its sub-batches carry no "image" but IMAGE_ROW
(B,) int64 in [0, U), the row of IMAGES each of their images is; the model encodes IMAGES once and each head
picks its rows (`own_rows`). A sub-batch on its own (evaluation, prediction) keeps its "image" (B, C, S, S)
and no IMAGE_ROW: its tokens are its own rows in order.

A task whose head encodes a masked image (tasks/mae.py; its head's `visible_tokens`, model/spatialnet.py) may
carry MASK_NOISE in its sub-batch: (B, N) float, each image's noise over its N patch tokens, whose lowest
values name the patches the encoder sees; without it the model draws the noise from torch's RNG.
"""

from __future__ import annotations

import torch

QUESTIONS = "questions"  # the row key of a vqa/regression visit's question dicts
CAPTIONS = "captions"  # the row key of a captioning visit's caption dicts
IMAGE_KEY = "image_key"  # a training row's image identity; rows with the same non-empty key hold the same image
IMAGES = "images"  # a training micro-batch's key: (U, C, S, S) the distinct images its sub-batches' rows show
IMAGE_ROW = "image_row"  # a training sub-batch's key: (B,) int64, the row of IMAGES (of the encoding) per image
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


def collate(rows: list[dict], stack_images: bool = True) -> dict:
    """Rows of one task -> its sub-batch (image-level fields of length B, question/caption-level ones of length Q/C).
    Without `stack_images` its "image" stays the rows' list of (C, S, S) tensors, for `micro_batch` to stack once."""
    out = _stack([{k: v for k, v in row.items() if k not in FAN_OUT and (stack_images or k != "image")}
                  for row in rows])
    if not stack_images:
        out["image"] = [row["image"] for row in rows]
    for key in (k for k in FAN_OUT if k in rows[0]):
        out.update(_stack([item for row in rows for item in row[key]]))
        out["image_index"] = torch.tensor([i for i, row in enumerate(rows) for _ in row[key]], dtype=torch.int64)
    return out


def question_count(sub_batch: dict) -> int:
    """Q, the questions of the sub-batch of a task that asks questions (Task.asks_questions): its QUESTIONS items,
    which collate laid out with "image_index"."""
    return len(sub_batch["image_index"])


def micro_batch(subs: dict[str, dict]) -> dict:
    """Training sub-batches, each with its "image" (a (B, C, S, S) tensor or a list of B (C, S, S) ones) and
    IMAGE_KEY [B] -> one micro-batch {IMAGES: (U, C, S, S), task: sub-batch with IMAGE_ROW (B,) in place of its
    "image"}: the first row of each non-empty key gives the image, later rows with that key point at it."""
    images: list[torch.Tensor] = []  # U of (C, S, S)
    slot: dict[str, int] = {}  # non-empty key -> its row of IMAGES
    batch: dict = {}
    for task, sub in subs.items():
        rows = []
        for image, key in zip(sub["image"], sub[IMAGE_KEY]):
            if key not in slot:
                if key:
                    slot[key] = len(images)
                rows.append(len(images))
                images.append(image)
            else:
                rows.append(slot[key])
        rest = {k: v for k, v in sub.items() if k != "image"}
        batch[task] = {**rest, IMAGE_ROW: torch.tensor(rows, dtype=torch.int64)}
    return {IMAGES: torch.stack(images), **batch}


def sub_batches(batch: dict) -> dict[str, dict]:
    """A batch's {task: sub-batch}, without a micro-batch's IMAGES."""
    return {task: sub for task, sub in batch.items() if task != IMAGES}


def images_and_rows(batch: dict, tasks: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """-> (the images to encode (U, C, S, S), each task's IMAGE_ROW (B,) into them, None: all U in order).
    A training micro-batch gives its IMAGES; sub-batches on their own give their "image", several of them
    concatenated (so one encoder pass serves them all)."""
    if IMAGES in batch:
        return batch[IMAGES], {t: batch[t][IMAGE_ROW] for t in tasks}
    if len(tasks) == 1:
        return batch[tasks[0]]["image"], {tasks[0]: None}
    images = torch.cat([batch[t]["image"] for t in tasks])  # (U, C, S, S)
    sizes = torch.tensor([0] + [len(batch[t]["image"]) for t in tasks]).cumsum(0).tolist()
    return images, {t: torch.arange(a, b, device=images.device) for t, a, b in zip(tasks, sizes, sizes[1:])}


def own_rows(encoded: torch.Tensor, sub_batch: dict) -> torch.Tensor:
    """A head's view of the encoding: (U, ...) -> (B, ...) the rows of its sub-batch's images (IMAGE_ROW), or
    the encoding itself when the sub-batch is on its own."""
    rows = sub_batch.get(IMAGE_ROW)
    return encoded if rows is None else encoded[rows]


def item_rows(sub_batch: dict) -> torch.Tensor:
    """(Q,) or (C,): the row of the encoding each question (caption) is about: its "image_index", through
    IMAGE_ROW when the sub-batch is part of a micro-batch."""
    rows = sub_batch.get(IMAGE_ROW)
    index = sub_batch["image_index"]
    return index if rows is None else rows[index]


def task_images(batch: dict, task: str) -> torch.Tensor:
    """(B, C, S, S) the images of `task`'s rows: its own "image", or its rows of the micro-batch's IMAGES (a copy;
    for the tasks whose loss reads pixels, Task.loss_reads_images)."""
    sub = batch[task]
    return sub["image"] if "image" in sub else batch[IMAGES][sub[IMAGE_ROW]]
