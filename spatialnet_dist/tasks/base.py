"""What a task is: one object that declares everything the rest of the system asks of it.

Data (data/streams.TaskSamples) asks which corpora it can read (`has_content`), which texts of a sample
it reads (`texts`, for the symmetry check) and the row it draws from a sample (`row`); batch_format
`collate` stacks rows into the task's sub-batch, whose keys and shapes each task writes down as a
TypedDict (the batch contract in code); a task with MIX_OPTIONS may have its training images mixed in
pairs (data/mixing.py), which asks it for the mixed rows' targets (`mix_targets`). The model builds
`head` and calls it as `head(tokens (B, N, D), pooled (B, D), sub_batch) -> outputs` (a masked head, mae's, with the
kept tokens alone and their indices); the objective weighs `loss`; evaluation
calls `predict`, `score`, `baselines`, `prediction_files`, `sample_fields` and `report_section`, and
training's validation reads the score keys in `validation_keys`. Inference on unlabelled images
(evaluate/predict.Predictor, run by `spatialnet predict` and `spatialnet infer`) calls `infer`, and infer's
Parquet columns are each task's `infer_fields`. `name` is the task's one name: its
config key (`tasks.<name>`, `loss.weights.<name>`), loss key (`<name>_loss`), metric and RESULT key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from spatialnet_dist.symmetry import SYMMETRIES
from spatialnet_dist.task_sections import LossConfig, ModelConfig, TaskConfig

if TYPE_CHECKING:  # types only signatures name (data.streams cannot be imported at run time: data/ imports tasks/)
    from spatialnet_dist.data.streams import TaskSamples
    from spatialnet_dist.networks.heads import VocabSizes
    from spatialnet_dist.networks.presets import Preset
    from spatialnet_dist.store.schema import Sample
    from spatialnet_dist.symmetry import Symmetry
    from spatialnet_dist.text import TextVocabs


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore: int, label_smoothing: float = 0.0,
                  row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over the non-ignored targets, each item's CE times its `row_weight` (N,) when given (a mixed
    image's share of that target); 0 (still attached to the graph) when all are ignored, where
    F.cross_entropy's mean would be 0/0 = NaN. Computed in fp32 also for bf16 logits."""
    per_item = F.cross_entropy(logits.float(), target, ignore_index=ignore, label_smoothing=label_smoothing, reduction="none")
    if row_weight is not None:
        per_item = per_item * row_weight
    return per_item.sum() / (target != ignore).sum().clamp(min=1)


# The options of a task whose training images may be mixed in pairs (timm's Mixup, data/mixing.py): such a
# task takes them in its `options` and says in `mix_targets` what a mixed image's targets are.
MIX_OPTIONS = {
    "mixup": 0.0,  # alpha of mixup's Beta(alpha, alpha) share lambda: a row is lambda x_i + (1 - lambda) x_j; 0: off
    "cutmix": 0.0,  # alpha of cutmix's lambda: a box of 1 - lambda of the area pasted from x_j; 0: off
    "mix_prob": 1.0,  # the share of micro-batches mixed; with both alphas > 0, half of those use each
}


TTA_MODES = ("none", "symmetry")  # eval.tta


def tta_probabilities(probabilities: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                      tta: str) -> torch.Tensor:
    """`probabilities` (images (B, C, S, S) -> (B, K)) of `images`; with eval.tta "symmetry", their mean over
    the 8 symmetries of the square, for predictions whose label holds of a turned or mirrored image (a
    land-use class, a tag). One batch per symmetry: 8x the memory of one forward pass would not fit every model."""
    if tta == "none":
        return probabilities(images)
    return torch.stack([probabilities(symmetry.apply(images)) for symmetry in SYMMETRIES]).mean(0)  # (B, K)


class Task:
    name: str = ""
    former_names: tuple[str, ...] = ()  # names it went by before: a config key under one is an error naming `name`
    needs: str = ""  # what a corpus must hold for the task, as an error names it ("captions")
    default_enabled: bool = True  # its default tasks.<name>.enabled
    augment: str = "symmetry"  # its default tasks.<name>.augment
    strong_augment: bool = False  # may it use augment: strong (crops and recolours change counts and texts)
    per_visit_key: str = ""  # the TaskConfig field capping the items (questions, captions) one visit trains
    # its rows are questions about an image (batch_format.QUESTIONS): training counts them, and at inference it
    # answers the --question texts (and runs only with some)
    asks_questions: bool = False
    reads_words: bool = False  # its texts are words of the word vocabulary
    loss_reads_images: bool = False  # its loss compares with the pixels of its images (mae's reconstruction)
    reads_answers: bool = False  # its corpora's answer counts make the answer vocabulary (vocabs.answers)
    # the manifest key listing its corpora's label names, and the TextVocabs field of their union ("classes")
    label_vocab: str = ""
    validation_keys: tuple[str, ...] = ()  # score keys cheap enough for every validation (val/<name>_<key>)
    headline_keys: tuple[str, ...] = ()  # score keys in Ray's result (test/<name>_<key>)
    # prediction-row keys only a report sample shows (mae's reconstruction image): evaluation keeps them on the
    # rows of the report's images alone and leaves them out of the prediction files
    sample_only_keys: tuple[str, ...] = ()
    report_heading: str = ""
    score_packages: tuple[str, ...] = ()  # the versions.FEATURE_PACKAGES its `score` imports (the preflight's)
    # its place (from 1) among the heads that predict and infer run when --tasks is not given, 0: not one of them
    # (one that asks questions runs by default only with --question). The order of infer's default columns, which
    # the settings in an OUT's manifest record (a resume compares them)
    default_inference_place: int = 0
    maps_classes: bool = False  # its `infer` gives "class_probabilities": what infer --class-map averages
    options: dict[str, Any] = {}  # its own config keys under tasks.<name> and their defaults

    # ---- data ----

    def has_content(self, manifest: dict, split: dict) -> bool:
        """Does a corpus (its manifest and the split's entry in it) hold anything for the task?"""
        raise NotImplementedError

    def epoch_rows(self, manifest: dict, split: dict) -> int:
        """The task's rows in a corpus split, as an epoch counts them (train.epochs): its images unless
        the task trains several items per image (then those items)."""
        return split["samples"]

    def texts(self, sample: Sample) -> list[str]:
        """Every text of `sample` the task may read (a symmetry must be able to map them all)."""
        return []

    def row(self, sample: Sample, rows: TaskSamples, rng, symmetry: Symmetry) -> dict | None:
        """The task's fields of one visit of `sample` (besides "image" and "image_id"), or None when the
        sample has nothing for it. Per-image items (questions, captions) go in a list under
        batch_format.QUESTIONS or CAPTIONS, which collate lays out with "image_index"."""
        raise NotImplementedError

    # ---- model and objective ----

    def head(self, encoder_dim: int, preset: Preset, sizes: VocabSizes, model_cfg: ModelConfig,
             task_cfg: TaskConfig) -> nn.Module:
        """The task's head; `task_cfg` is its tasks.<name> section (its `options` may shape the head). A head
        with an int attribute `visible_tokens` K > 0 asks for a masked encoding of its own images: the encoder
        sees K random patch tokens of each (model/spatialnet.py), and the head is called with their indices."""
        raise NotImplementedError

    def example_sub_batch(self, image: torch.Tensor, model_cfg: ModelConfig) -> dict:
        """A one-image sub-batch with the longest texts, for the model summary's FLOP count."""
        return {"image": image}

    def loss_state(self, cfg, vocabs: TextVocabs) -> Any:
        """What `loss` needs beyond the config, prepared once per run (read from the manifests)."""
        return None

    def loss(self, out: dict, sub: dict, cfg: LossConfig, state: Any) -> torch.Tensor:
        raise NotImplementedError

    def mix_targets(self, sub: dict, partner: torch.Tensor, lam: float) -> dict:
        """The target fields of a training sub-batch whose row i shows lam x_i + (1 - lam) x_partner[i]
        (partner (B,) int64; data/mixing.py), replacing or added to those of `sub`. Only a task with
        MIX_OPTIONS mixes."""
        raise NotImplementedError

    def loss_size(self, sub: dict) -> int:
        """What the loss averages over in `sub` (images, or questions for the question tasks)."""
        return len(sub["image_id"])

    def train_metrics(self, out: dict, sub: dict) -> dict[str, torch.Tensor]:
        """Extra detached training metrics of one step."""
        return {}

    # ---- evaluation ----

    def predict(self, model, sub: dict, images: torch.Tensor, cfg, vocabs: TextVocabs) -> list[dict]:
        """Prediction rows of one evaluation sub-batch (images on the model's device and dtype)."""
        raise NotImplementedError

    def row_key(self, row: dict) -> str:
        """A prediction row's identity: rows are put in this order whatever the ranks' order."""
        return str(row["image_id"])

    def score(self, rows: list[dict], cfg, vocabs: TextVocabs) -> dict | None:
        """-> the task's metrics (None when no row can be scored)."""
        raise NotImplementedError

    def baselines(self, rows: list[dict], cfg, vocabs: TextVocabs) -> dict:
        """-> {baseline key: scores of score's shape with a "name"}, from the training split."""
        return {}

    def prediction_files(self, rows: list[dict], vocabs: TextVocabs) -> dict[str, object]:
        return {f"{self.name}.json": rows}

    def sample_fields(self, rows: list[dict], vocabs: TextVocabs) -> dict:
        """The rows of one image -> fields of its report sample (evaluate.report.sample_markdown)."""
        return {}

    def report_section(self, scores: dict, out_dir: Path) -> list[str]:
        """Markdown lines of the task's section of the report (figures written to out_dir)."""
        raise NotImplementedError

    # ---- inference ----

    def infer(self, model, images: torch.Tensor, questions: torch.Tensor, question_texts: list[str], cfg,
              vocabs: TextVocabs, class_probabilities: bool) -> list[dict]:
        """The task's output fields for each image of `images` (B, C, S, S), unlabelled (on the model's device,
        under the Predictor's autocast). A task that asks questions answers each of `question_texts` [Qn] of every
        image: `questions` (Qn, Lq) int64, their word ids on the images' device (`asked_of_every_image`).
        `class_probabilities`: a task that maps classes adds every class's probability."""
        raise NotImplementedError

    def infer_fields(self) -> list[tuple]:
        """The (name, pyarrow type) columns of infer's Parquet for the keys `infer` gives, in their order (pyarrow
        imported in the method: only infer's output needs it)."""
        raise NotImplementedError


def asked_of_every_image(questions: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """questions (Qn, Lq), each asked of each of `images` B images -> (B*Qn, Lq) word ids and their (B*Qn,)
    image_index, image-major: a question task's sub-batch inputs."""
    index = torch.arange(images, device=questions.device).repeat_interleave(len(questions))  # (B*Qn,)
    return questions.repeat(images, 1), index
