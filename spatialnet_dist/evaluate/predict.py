"""`spatialnet predict`: caption, land-use class and answers for image files, from a checkpoint or an
exported bundle, on CPU. Images of any size and band count go through the evaluation transform
(resized and normalised as in training), so a PNG, JPEG, TIFF or NPY file is read as the shards are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import SchemaError, as_hwc, check_pixels
from spatialnet_dist.tasks.captioning import generate
from spatialnet_dist.tasks.classification import class_logits
from spatialnet_dist.tasks.vqa import answer_logits

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


@torch.no_grad()
def predict_images(checkpoint: str, images: list[str], questions: list[str] | None = None) -> list[dict]:
    """-> per image {"image": path, "caption", "class", "probability", "answers": [{"question", "answer",
    "probability"}]}, each key present when the model has that head (answers: the vqa head and questions)."""
    from spatialnet_dist.checkpoint import load_model
    from spatialnet_dist.data.transforms import ImageTransform, model_image_size

    questions = list(questions or [])
    arrays = [load_image(p) for p in images]  # bad files fail before the model loads
    model, cfg, vocabs = load_model(checkpoint)
    transform = ImageTransform(model_image_size(cfg.model), cfg.model.in_chans)
    heads = set(model.heads)
    if questions and "vqa" not in heads:
        raise UserError(
            f"{checkpoint}: the model has no vqa head to answer questions (heads: {', '.join(sorted(heads))})"
        )
    encoded = torch.tensor([vocabs.words.encode(q, cfg.model.question_max_len, bos_eos=False) for q in questions])

    results = [{"image": str(p)} for p in images]
    for start in range(0, len(arrays), CHUNK):
        batch = torch.stack([transform(a) for a in arrays[start : start + CHUNK]])  # (B, C, S, S)
        chunk = results[start : start + CHUNK]
        if "captioning" in heads:
            words = generate(model, batch, cfg.eval.beam_size, cfg.eval.length_penalty, cfg.model.caption_max_len)
            for r, w in zip(chunk, words):
                r["caption"] = vocabs.words.decode(w)
        if "classification" in heads:
            probs, best = class_logits(model, batch).float().softmax(-1).max(-1)  # (B,), (B,)
            for r, p, b in zip(chunk, probs.tolist(), best.tolist()):
                r.update({"class": vocabs.classes[b], "probability": p})
        for r in chunk:
            r["answers"] = []
        if questions:  # every question about every image of the chunk, against one encoder pass
            B, Qn = len(batch), len(questions)
            index = torch.arange(B).repeat_interleave(Qn)  # (B*Qn,) image-major
            logits = answer_logits(model, batch, encoded.repeat(B, 1), index)  # (B*Qn, A)
            probs, best = logits.float().softmax(-1).max(-1)
            for r, ps, bs in zip(chunk, probs.view(B, Qn).tolist(), best.view(B, Qn).tolist()):
                r["answers"] = [{"question": q, "answer": vocabs.answers.decode(b), "probability": p}
                                for q, p, b in zip(questions, ps, bs)]
    return results


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
