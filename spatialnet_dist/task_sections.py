"""The config sections a task reads: tasks.<task> (TaskConfig), model (ModelConfig) and loss (LossConfig).

They live here, not in config/schema.py with the other sections, because config stands on the task registry
(schema.py makes the tasks.<task> sections from it): a task module that named config, even for a type checker
only, would close a cycle between the packages. This module imports no other module of the package, so tasks/
imports it at run time, and config re-exports the three (`from spatialnet_dist.config import ModelConfig`).
Each key's comment is read from this source as schema.py's are (docs/hooks.py walks every class's source).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TaskConfig:
    enabled: bool = True
    corpora: list[str] = field(default_factory=lambda: ["synthetic"])
    batch_size: int = 8  # sub-batch per worker per micro-step (derived when global_batch_size is set)
    # 0: batch_size x train.num_workers x optim.grad_accum (or the resumed checkpoint's). Else the task's samples
    # per optimizer step over all workers, whatever their number: each worker's batch_size = global_batch_size /
    # (its world size x optim.grad_accum) (train.plan: recorded by the driver, split in every worker).
    global_batch_size: int = 0
    corpus_weights: dict[str, float] = field(default_factory=dict)
    augment: str = "symmetry"  # one of AUGMENT_POLICIES
    erase_prob: float = 0.0  # random erasing after a strong or trivial policy: the chance of one erased box
    questions_per_image: int = 0  # vqa/regression: questions one visit answers; 0: all, up to a cap (data code)
    captions_per_image: int = 0  # captioning: reference captions one visit trains; 0: all, up to the same cap


@dataclass
class ModelConfig:
    preset: str = "tiny"
    image_size: int = 0  # 0: the preset's size
    patch_size: int = 0  # 0: the preset's; tokens per image = (image_size / patch_size)^2
    # How images become tokens: patch (one strided convolution, timm's ViT) | conv (a stack of 3x3 stride-2
    # convolutions to the same token grid; little data trains it better, networks/encoder.py ConvStemEmbed)
    stem: str = "patch"
    # The pooled image vector the classification and tagging heads read: token (the class token,
    # as published ViT checkpoints were trained) | avg (the mean of the patch tokens, timm's global_pool="avg":
    # on little data it carries every patch's evidence instead of one token's learned summary)
    global_pool: str = "token"
    in_chans: int = 3
    activation: str = ""  # "": the preset's FFN activation (gelu, relu)
    # Where the encoder starts: "" from scratch; a local .pth/.safetensors file or "hub" (timm's weights, bands
    # adapted); a checkpoint directory or exported bundle of this project, local or s3:// (its pretraining: the
    # encoder loads, the heads start fresh, its band count must be model.in_chans)
    pretrained: str = ""
    # Fine-tuning: patch embedding, position/class tokens and the first N encoder blocks stay fixed
    # (N = the preset's depth: the whole trunk but its final norm). 0: everything trains.
    freeze_encoder_blocks: int = 0
    drop_path: float = 0.0
    caption_max_len: int = 24  # tokens, BOS/EOS included
    question_max_len: int = 20
    min_word_count: int = 1
    max_answers: int = 1000
    answer_rule: str = "rsvqa-lr"  # how raw answers map to classes: rsvqa-lr | exact


@dataclass
class LossConfig:
    # lambda_t of each task t (loss.balance); a task not named weighs 1.0. A run's config starts with every
    # registered task's at 1.0
    weights: dict[str, float] = field(default_factory=dict)
    regularization: str = "decoupled"  # decoupled (AdamW weight decay) | l2 (explicit lambda_reg term)
    l2: float = 0.0  # lambda_reg when regularization == l2
    label_smoothing: float = 0.0
    # fixed: L = sum_t lambda_t * L_t. uncertainty: each task also learns a log-variance s_t that weighs its loss
    # (Kendall et al. 2018, objective.TaskBalance), so no hand-tuned lambda_t has to put the losses on one scale.
    balance: str = "fixed"
