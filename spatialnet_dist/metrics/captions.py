"""Caption metrics exactly as pycocoevalcap computes them (the seed paper's Table I).

Both sides go through pycocoevalcap's PTB tokenizer (Stanford CoreNLP, java), then Bleu(4), Meteor()
(a java process), Rouge() and Cider(): the numbers are the library's, never re-implemented here.
Scores are fractions and CIDEr is unscaled; `format_caption_table` prints them as the paper does.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from spatialnet_dist import versions
from spatialnet_dist.display import markdown_table
from spatialnet_dist.errors import UserError
from spatialnet_dist.metrics import (
    bootstrap_interval,
    name_some,
    read_json,
    run_and_baselines,
    with_interval,
)

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def check_captions(preds, refs, pred_name: str = "predictions", refs_name: str = "references") -> None:
    """Refuse anything pycocoevalcap would score wrongly or assert on: wrong shapes, no predictions,
    duplicate ids, predictions without references and references without a prediction."""
    if not isinstance(preds, list):
        raise UserError(f'{pred_name}: expected a list of {{"image_id", "caption"}}, got {type(preds).__name__}')
    if not preds:
        raise UserError(f"{pred_name}: no predictions")
    for i, row in enumerate(preds):
        if not isinstance(row, dict):
            raise UserError(f'{pred_name}: row {i} is not an object {{"image_id", "caption"}}')
        for key in ("image_id", "caption"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{pred_name}: row {i} lacks a string {key!r}")
    if not isinstance(refs, dict):
        raise UserError(f'{refs_name}: expected an object {{"<image_id>": [str, ...]}}, got {type(refs).__name__}')
    for image_id, captions in refs.items():
        if not (isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions)):
            raise UserError(f"{refs_name}: image {image_id!r} needs a non-empty list of caption strings")

    seen: dict[str, int] = {}
    for row in preds:
        seen[row["image_id"]] = seen.get(row["image_id"], 0) + 1
    duplicated = [i for i, n in seen.items() if n > 1]
    if duplicated:
        raise UserError(f"{pred_name}: {len(duplicated)} image_id(s) predicted more than once: {name_some(duplicated)}")
    unreferenced = [i for i in seen if i not in refs]
    if unreferenced:
        raise UserError(
            f"{pred_name}: {len(unreferenced)} prediction(s) have no references in {refs_name}: {name_some(unreferenced)}"
        )
    unpredicted = [i for i in refs if i not in seen]
    if unpredicted:
        raise UserError(
            f"{refs_name}: {len(unpredicted)} image(s) have references but no prediction in {pred_name}: "
            f"{name_some(unpredicted)}"
        )


def load_caption_files(pred_path: str | Path, refs_path: str | Path) -> tuple[list[dict], dict[str, list[str]]]:
    """PRED `[{"image_id", "caption"}]` and REFS `{"<image_id>": [str, ...]}`, checked against each other."""
    preds, refs = read_json(pred_path), read_json(refs_path)
    check_captions(preds, refs, str(pred_path), str(refs_path))
    return preds, refs


def _spice():
    """pycocoevalcap's Spice scorer, refused with a clear message where its first-use download cannot work."""
    from pycocoevalcap.spice import get_stanford_models as models
    from pycocoevalcap.spice.spice import Spice

    offline = (
        "SPICE needs Stanford CoreNLP ({}), which pycocoevalcap downloads from nlp.stanford.edu on first use "
        "(about 400 MB), and {}: run once with network access, or leave SPICE off"
    )
    if not os.path.exists(os.path.join(models.SPICEDIR, models.SPICELIB, f"{models.JAR}.jar")):
        try:  # cheap check first: an offline machine fails here in milliseconds instead of mid-download
            socket.create_connection(("nlp.stanford.edu", 80), timeout=5).close()
        except OSError:
            raise UserError(offline.format(models.CORENLP, "nlp.stanford.edu cannot be reached")) from None
    try:
        return Spice()
    except OSError as e:  # urllib's URLError and partial downloads
        raise UserError(offline.format(models.CORENLP, f"the download failed ({e})")) from None


_METEOR = None  # this process's pycocoevalcap Meteor scorer (one java process), started by the first score


@contextmanager
def _meteor():
    """This process's Meteor scorer, started on first use and kept: its java process loads a paraphrase table
    for ~13 s before the first score, and one evaluation scores the run and two baselines (three starts were
    40 s of the demo's 46 s evaluation). The java process ends with this one (at EOF on its stdin). When
    scoring fails half-way it is ended at once and the next call starts another (Meteor.__del__ would
    otherwise wait forever on the lock compute_score still holds)."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        _METEOR = Meteor()
    try:
        yield _METEOR
    except BaseException:
        meteor, _METEOR = _METEOR, None
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        raise


def score_captions(preds: list[dict], refs: dict[str, list[str]], spice: bool = False) -> dict:
    """-> {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} (+ "SPICE" when asked),
    then "CIDEr_ci": the 95% bootstrap interval [lo, hi] of CIDEr over the images.

    preds: [{"image_id": str, "caption": str}], one per image; refs: {image_id: [reference captions]}
    for exactly the predicted images. METEOR's java process is started once per process (`_meteor`).
    """
    check_captions(preds, refs)
    versions.require("pycocoevalcap")
    versions.require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    spice_scorer = _spice() if spice else None  # before the slow part, so that a refusal comes at once
    # The same inputs, in the same order, as COCOEvalCap.evaluate builds them.
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({p["image_id"]: [{"caption": c} for c in refs[p["image_id"]]] for p in preds})
    res = tokenizer.tokenize({p["image_id"]: [{"caption": p["caption"]}] for p in preds})

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose would print to stdout, spoiling --json
    with _meteor() as meteor:
        meteor_score, _ = meteor.compute_score(gts, res)
    scores = dict(zip(CAPTION_METRICS[:4], bleu))
    scores["METEOR"] = meteor_score
    scores["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    # Corpus CIDEr is the mean of the per-image scores (the IDF comes from all references, kept fixed here).
    scores["CIDEr"], per_image = Cider().compute_score(gts, res)  # per_image: (n,)
    if spice_scorer is not None:
        scores["SPICE"], _ = spice_scorer.compute_score(gts, res)
    scores = {name: float(value) for name, value in scores.items()}  # numpy floats -> JSON-ready floats
    per_image = np.asarray(per_image, dtype=float)
    return {**scores, "CIDEr_ci": bootstrap_interval(lambda idx: per_image[idx].mean(1), len(per_image))}


def format_caption_table(scores: dict) -> str:
    """The paper's Table I columns (BLEU-1..4, METEOR, ROUGE-L, CIDEr) in percent, CIDEr x100 with its
    95% interval when known. Each of scores["baselines"] ({key: the same keys plus a "name"}) is a row
    under this run's."""
    columns = [*CAPTION_METRICS, *(["SPICE"] if "SPICE" in scores else [])]
    named = run_and_baselines(scores)

    def cells(s: dict) -> list[str]:
        return [with_interval(s.get(c), s.get(f"{c}_ci")) for c in columns]

    if len(named) == 1:
        table = markdown_table(columns, [cells(scores)], numbers_from=0)
    else:
        table = markdown_table(["captions", *columns], [[name, *cells(s)] for name, s in named])
    interval = "; [lo, hi]: 95% bootstrap interval over the images" if "CIDEr_ci" in scores else ""
    return f"{table}\n\nScores in percent, CIDEr x100, as the paper prints them{interval}."
