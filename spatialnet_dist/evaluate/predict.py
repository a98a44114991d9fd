"""`spatialnet predict`: caption, land-use class and answers for image files, from a checkpoint or an
exported bundle, on CPU. Images of any size and band count go through the evaluation transform
(resized and normalised as in training), so a PNG, JPEG, TIFF or NPY file is read as the shards are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spatialnet_dist import tasks as registry
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import SchemaError, as_hwc, check_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
CHUNK = 16  # images per forward pass


def load_image(path: str | Path) -> np.ndarray:
    """-> (H, W, C) array; a missing, unsupported or unreadable file, or one above the pixel limit, is a
    UserError naming it."""
    p = Path(path)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{p}: not an image this command reads ({', '.join(IMAGE_SUFFIXES)})")
    if not p.is_file():
        raise UserError(f"{p}: no such image")
    try:
        if p.suffix.lower() == ".npy":
            array = np.load(p, mmap_mode="r", allow_pickle=False)  # the header only, until checked
            if array.ndim >= 2:
                check_pixels(*array.shape[:2])
            return as_hwc(np.array(array))
        with Image.open(p) as im:
            check_pixels(im.height, im.width)
            # palettes and alpha become RGB, as the corpus adapters store them
            return as_hwc(
                np.asarray(im.convert("RGB") if im.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr") else im)
            )
    except SchemaError as e:
        raise UserError(f"{p}: {e}") from None
    except Image.DecompressionBombError as e:  # from Image.open, at twice schema.MAX_IMAGE_PIXELS
        raise UserError(f"{p}: image too large ({e})") from None
    except (OSError, ValueError, SyntaxError, UserError) as e:
        raise UserError(f"{p}: unreadable image ({e})") from None


def input_transform(cfg):
    """The model's input transform, the evaluation one (no augmentation): (H, W, C) [, band_norm] -> (C, S, S)."""
    from spatialnet_dist.data.transforms import ImageTransform, model_image_size

    return ImageTransform(model_image_size(cfg.model), cfg.model.in_chans)


class Predictor:
    """One model's predictions for batches of images: what `spatialnet predict` and `spatialnet infer` both run,
    so that a tile predicted by infer equals the same pixels given to predict.

    `preprocess` turns an (H, W, C) array into the model's input (the evaluation transform: resized to the
    model's size, normalised: uint8 by fixed scaling, other dtypes by `band_norm` when given, else per image);
    `predict` a (B, C, S, S) batch into one dict per image with each asked-for head's `Task.infer` fields (e.g.
    classification's "class", "probability", "class_topk"; vqa's "answers" [{"question", "answer", "probability"}]),
    the heads that take no question first, in registry order, then those that ask questions; "embedding" (the pooled
    encoder vector) with `embeddings`. On a GPU under bf16 autocast."""

    def __init__(self, model, cfg, vocabs, tasks: list[str] | None = None, questions: list[str] | None = None,
                 embeddings: bool = False, source: str = "the model", class_probabilities: bool = False):
        self.model, self.cfg, self.vocabs, self.embeddings = model, cfg, vocabs, embeddings
        self.class_probabilities = class_probabilities  # every class's probability too (infer --class-map)
        self.questions = list(questions or [])
        heads = set(model.heads)
        if tasks is None:  # default: the heads that need no text, and those that ask questions with --question
            by_place = sorted((t for t in registry.all_tasks() if t.default_inference_place),
                              key=lambda t: t.default_inference_place)
            tasks = [t.name for t in by_place if t.name in heads and (self.questions or not t.asks_questions)]
        if self.questions and not any(t in registry.names() and registry.get(t).asks_questions for t in tasks):
            answering = " or ".join(t.name for t in registry.all_tasks() if t.asks_questions and t.default_inference_place)
            raise UserError(f"{source}: the model has no {answering} head to answer questions "
                            f"(heads: {', '.join(sorted(heads))})")
        missing = [t for t in tasks if t not in heads]
        if missing:
            raise UserError(f"--tasks {','.join(missing)}: {source} has no such head (heads: {', '.join(sorted(heads))})")
        silent = [t for t in tasks if type(registry.get(t)).infer is registry.Task.infer]  # mae: pretraining only
        if silent:
            raise UserError(f"--tasks {silent[0]}: the {silent[0]} head gives no predictions (heads that do: "
                            f"{', '.join(sorted(t for t in heads if t not in silent))})")
        needing = [t for t in tasks if registry.get(t).asks_questions and not self.questions]
        if needing:
            raise UserError(f"--tasks {needing[0]}: answers questions: give them with --question")
        self.tasks = tasks
        # the order of each image's keys: the heads that take no question, then those that ask (registry order)
        self._inferring = sorted((t for t in registry.all_tasks() if t.name in tasks), key=lambda t: t.asks_questions)
        self.transform = input_transform(cfg)
        self.encoded = torch.tensor([vocabs.words.encode(q, cfg.model.question_max_len, bos_eos=False)
                                     for q in self.questions], dtype=torch.long)  # (Qn, Lq)

    def preprocess(self, image: np.ndarray, band_norm=None) -> torch.Tensor:
        """(H, W, C) -> (C, S, S) float32."""
        return self.transform(image, band_norm=band_norm)

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> list[dict]:
        param = next(self.model.parameters())
        batch = batch.to(param.device)  # (B, C, S, S)
        with torch.autocast("cuda", torch.bfloat16, enabled=param.device.type == "cuda"):
            return self._predict(batch)

    def _predict(self, batch: torch.Tensor) -> list[dict]:
        results: list[dict] = [{} for _ in range(len(batch))]
        questions = self.encoded.to(batch.device)  # (Qn, Lq): every question about every image
        for task in self._inferring:
            outputs = task.infer(self.model, batch, questions, self.questions, self.cfg, self.vocabs,
                                 self.class_probabilities)
            for r, out in zip(results, outputs):
                r.update(out)
        if self.embeddings:
            pooled = self.model.encode(batch)[1].float()  # (B, D)
            for r, e in zip(results, pooled.tolist()):
                r["embedding"] = e
        return results


def predict_images(checkpoint: str, images: list[str], questions: list[str] | None = None) -> list[dict]:
    """-> per image {"image": path, and the Predictor's keys of the model's heads}: "caption", "class",
    "probability", "class_topk", "tags", "tag_scores", "answers" (always, [] without questions)."""
    from spatialnet_dist.checkpoint_weights import load_model

    arrays = [load_image(p) for p in images]  # bad files fail before the model loads
    model, cfg, vocabs = load_model(checkpoint)
    predictor = Predictor(model, cfg, vocabs, questions=questions, source=checkpoint)
    results = []
    for start in range(0, len(arrays), CHUNK):
        batch = torch.stack([predictor.preprocess(a) for a in arrays[start : start + CHUNK]])  # (B, C, S, S)
        results += predictor.predict(batch)
    return [{"image": str(p), **r, "answers": r.get("answers", [])} for p, r in zip(images, results)]


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"])
        if "caption" in r:
            lines.append(f"  caption: {r['caption']}")
        if "class" in r:
            lines.append(f"  land use: {r['class']} ({100 * r['probability']:.1f}%)")
        for a in r["answers"]:
            lines.append(f"  Q: {a['question']}\n  A: {a['answer']} ({100 * a['probability']:.1f}%)")
    return "\n".join(lines)
