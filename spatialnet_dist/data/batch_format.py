"""Batch format: the rows the task streams make and the sub-batches `collate` builds from them.

A row is one visit of one image for one task: {"image": (C, S, S) float32, "image_id": str, ...}.
A sub-batch is `collate` of B rows of one task, the same in training and evaluation:

    every task       "image" (B, C, S, S), "image_id" [B]
    captioning       per caption (C = the B images' captions together): "tokens" (C, Lc) int64:
                     BOS w.. EOS PAD.., "image_index" (C,) int64 in [0, B); evaluation adds, per image,
                     "references" [B] lists of str and "label_name" [B] (str or None: the class oracle's key)
    classification   "label" (B,) int64, -1 for a class outside the vocabulary
    vqa              per question (Q = the B images' questions together):
                     "question" (Q, Lq) int64 PAD-padded, "answer" (Q,) int64 (-1: outside the answer
                     vocabulary), "qtype" [Q], "qid" [Q], "answer_raw" [Q] str,
                     "image_index" (Q,) int64 in [0, B): the row of "image" the question is about
    regression       per count question: "question" (Q, Lq), "count" (Q,) float32, "image_index" (Q,)

vqa and regression rows carry their questions as a list of per-question dicts under `QUESTIONS`,
captioning rows their captions under `CAPTIONS`; the encoder runs once per image and the heads gather
each question's (caption's) image by "image_index", so one encoder pass serves all the questions
(reference captions) a visit trains. A training batch (data/batches.py) is
{task: sub-batch, ..., "stats": {...}}; `tasks.<task>.batch_size` counts rows, i.e. images.
"""

from __future__ import annotations

import torch

QUESTIONS = "questions"  # the row key of a vqa/regression visit's question dicts
CAPTIONS = "captions"  # the row key of a captioning visit's caption dicts
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
    """Q, the questions of a vqa/regression sub-batch (0 for the other tasks, captioning's captions included)."""
    return len(sub_batch["image_index"]) if "question" in sub_batch else 0
