"""How results read for people: Markdown tables, images any viewer can draw, one sample's Markdown.

Below evaluate/ (the report) and train/ (the run's TensorBoard mirror, train.tracking), which show the
same samples the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def markdown_table(headers: list[str], rows: list[list[str]], numbers_from: int = 1) -> str:
    """A pipe table with padded columns: readable in a terminal and in any Markdown viewer.

    Columns from index `numbers_from` on hold numbers and are right-aligned; the others read left to right.
    """
    headers = [str(h).replace("|", "\\|") for h in headers]
    rows = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return (
            "| "
            + " | ".join(c.rjust(w) if i >= numbers_from else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    rule = (
        "|"
        + "|".join("-" * (w + 1) + ":" if i >= numbers_from else ":" + "-" * (w + 1) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def displayable(image) -> np.ndarray:
    """(H, W, C) array of any dtype and band count, or an image/NPY file path -> what imshow can draw:
    (H, W) or (H, W, 3), uint8 as is, anything else stretched to [0, 1] per image."""
    if isinstance(image, (str, Path)):
        if str(image).lower().endswith(".npy"):
            image = np.load(image, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(image) as im:
                image = np.asarray(im)
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3] if image.shape[-1] >= 3 else image[..., 0]  # extra bands are not drawn
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float64)
    low, high = np.nanmin(image), np.nanmax(image)
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def sample_markdown(sample: dict) -> list[str]:
    """Markdown lines for one sample (write_report's `samples` format): its generated caption, references,
    class and questions; the report and TensorBoard's text panel show the same."""
    lines = [f"### {sample['image_id']}", ""]
    if sample.get("caption") is not None:
        lines += [f"Generated caption: *{sample['caption']}*", ""]
    if sample.get("references"):
        lines += ["References:", "", *(f"- {r}" for r in sample["references"]), ""]
    if sample.get("label") is not None or sample.get("predicted_label") is not None:
        lines += [
            f"Land use: predicted **{sample.get('predicted_label', '-')}**, true **{sample.get('label', '-')}**",
            "",
        ]
    if sample.get("tags") is not None:
        lines += [f"Tags: predicted **{', '.join(sample.get('predicted_tags', [])) or '-'}**, "
                  f"true **{', '.join(sample['tags']) or '-'}**", ""]
    if sample.get("reconstruction_MSE") is not None:
        lines += [f"Masked patches reconstructed with MSE **{sample['reconstruction_MSE']:.4f}**"
                  + (" (original, masked, reconstructed)" if sample.get("reconstruction") is not None else ""), ""]
    if sample.get("qa"):
        rows = [[qa["question"], str(qa["prediction"]), str(qa["answer"])] for qa in sample["qa"]]
        lines += [markdown_table(["question", "predicted", "true"], rows, numbers_from=3), ""]
    return lines
