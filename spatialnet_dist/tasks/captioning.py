"""captioning: a sentence about the image. Teacher-forced word cross-entropy in training; beam search
and the COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr) in evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import torch

from spatialnet_dist.batch_format import CAPTIONS
from spatialnet_dist.metrics.baselines import class_oracle_captions, most_frequent, training_text
from spatialnet_dist.metrics.captions import format_caption_table, score_captions
from spatialnet_dist.networks.heads import CaptionDecoder
from spatialnet_dist.symmetry import map_sides
from spatialnet_dist.tasks.base import Task, cross_entropy
from spatialnet_dist.text import PAD_ID


class CaptioningBatch(TypedDict, total=False):
    image: torch.Tensor  # (B, C, S, S) float32
    image_id: list[str]  # [B]
    tokens: torch.Tensor  # (C, Lc) int64, per caption (C: the B images' captions together): BOS w.. EOS PAD..
    image_index: torch.Tensor  # (C,) int64 in [0, B): the row of "image" the caption is about
    references: list[list[str]]  # [B] evaluation only: all captions of the image
    label_name: list  # [B] evaluation only: str or None, the class oracle's key


def generate(model, images: torch.Tensor, beam_size: int = 1, length_penalty: float = 0.0,
             max_len: int = 0) -> list[list[int]]:
    """images (B, C, H, W) -> per image the word ids of its caption (decode with vocabs.words.decode)."""
    tokens, _ = model.encode(images)
    return model.heads["captioning"].generate(tokens, max_len, beam_size, length_penalty)


class Captioning(Task):
    name = "captioning"
    former_names = ("captions",)
    needs = "captions"
    per_visit_key = "captions_per_image"
    reads_words = True
    headline_keys = ("CIDEr", "BLEU-4")
    report_heading = "Captioning (Table I columns)"
    score_packages = ("pycocoevalcap",)
    default_inference_place = 3

    def has_content(self, manifest, split):
        return split.get("captions", 0) > 0

    def epoch_rows(self, manifest, split):
        return split["captions"]

    def texts(self, sample):
        return sample.captions

    def row(self, s, rows, rng, symmetry):
        if not s.captions:
            return None
        captions = [{"tokens": torch.tensor(rows.vocabs.words.encode(map_sides(c, symmetry), rows.caption_max_len))}
                    for c in rows.picked(s.captions, rng)]
        row = {CAPTIONS: captions}
        return row if rows.train else {**row, "references": list(s.captions), "label_name": s.label_name}

    def head(self, encoder_dim, preset, sizes, model_cfg, task_cfg):
        return CaptionDecoder(encoder_dim, preset, sizes.words, model_cfg.caption_max_len)

    def example_sub_batch(self, image, model_cfg):
        return {"image": image, "tokens": torch.ones(1, model_cfg.caption_max_len, dtype=torch.long),
                "image_index": torch.zeros(1, dtype=torch.long)}

    def loss(self, out, sub, cfg, state):
        # A mean over the words of the sub-batch's C captions: a visit that trains all references of its image
        # weighs like the same captions each with its own copy of the image.
        logits = out["logits"]  # (C, Lc-1, V) predicting tokens[:, 1:]
        target = sub["tokens"][:, 1:]  # (C, Lc-1)
        return cross_entropy(logits.flatten(0, 1), target.flatten(), ignore=PAD_ID)

    def predict(self, model, sub, images, cfg, vocabs):
        words = generate(model, images, cfg.eval.beam_size, cfg.eval.length_penalty, cfg.model.caption_max_len)
        return [
            {"image_id": i, "caption": vocabs.words.decode(w), "references": refs, "label_name": label}
            for i, w, refs, label in zip(sub["image_id"], words, sub["references"], sub["label_name"])
        ]

    def score(self, rows, cfg, vocabs):
        preds = [{"image_id": r["image_id"], "caption": r["caption"]} for r in rows]
        return score_captions(preds, {r["image_id"]: r["references"] for r in rows}, spice=cfg.eval.spice)

    def baselines(self, rows, cfg, vocabs):
        """"fixed_caption": the most frequent training caption for every image; "class_oracle": the most
        frequent training caption of each image's true class (what recognising the class alone reaches)."""
        text = training_text(cfg, vocabs, captions=[self.name])
        if not text.captions:
            return {}
        refs = {r["image_id"]: r["references"] for r in rows}
        fixed = most_frequent(text.captions)
        out = {"fixed_caption": {
            **score_captions([{"image_id": r["image_id"], "caption": fixed} for r in rows], refs),
            "name": f"most frequent training caption: {fixed!r}",
        }}
        if text.captions_by_class:
            out["class_oracle"] = {**score_captions(class_oracle_captions(rows, text), refs),
                                   "name": "most frequent training caption of the true class"}
        return out

    def prediction_files(self, rows, vocabs):
        # the `spatialnet eval captions` inputs
        return {"captions.json": [{"image_id": r["image_id"], "caption": r["caption"]} for r in rows],
                "captions_references.json": {r["image_id"]: r["references"] for r in rows}}

    def sample_fields(self, rows, vocabs):
        return {"caption": rows[0]["caption"], "references": rows[0]["references"]}

    def report_section(self, scores, out_dir: Path):
        return [format_caption_table(scores), ""]

    def infer(self, model, images, questions, question_texts, cfg, vocabs, class_probabilities):
        words = generate(model, images, cfg.eval.beam_size, cfg.eval.length_penalty, cfg.model.caption_max_len)
        return [{"caption": vocabs.words.decode(w)} for w in words]

    def infer_fields(self):
        import pyarrow as pa

        return [("caption", pa.string())]


TASK = Captioning()
