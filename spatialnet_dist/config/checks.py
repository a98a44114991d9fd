"""What values a config may hold: the range of each key, the rules of each task section, and which names may
stand under tasks. and loss.weights. (the registry's tasks; a task's former name is an error naming its new one).

`validate` runs after every load and override (config.load, config.from_dict); its errors are `ConfigError`
with one line that names the key. It reads a `config.Config` by attribute and imports none of the package's other
modules, which import it: dependencies point one way.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from spatialnet_dist import tasks as registry
from spatialnet_dist.data.transforms import AUGMENT_POLICIES, CROPPING_POLICIES
from spatialnet_dist.errors import ConfigError
from spatialnet_dist.networks.encoder import meta_encoder
from spatialnet_dist.networks.presets import POOLS, PRESETS, STEMS
from spatialnet_dist.tasks.base import TTA_MODES
from spatialnet_dist.tasks.mae import DECODER_HEAD_WIDTH

FAULT_KINDS = ("exit", "error", "user_error", "nan_loss")  # faults.kind: see schema.FaultsConfig
KNN_METRIC = "knn_accuracy"  # what eval.knn logs at each validation (val/knn_accuracy); eval.keep_best takes it

# Range checks: key -> (predicate, what is allowed).
CHECKS: dict[str, tuple[Callable, str]] = {
    "run.name": (lambda v: bool(v) and "/" not in v, "a non-empty name without '/'"),
    "run.keep_checkpoints": (lambda v: v >= 0, ">= 0"),
    "data.loader_workers": (lambda v: v >= 0, ">= 0"),
    "data.prefetch": (lambda v: v >= 1, ">= 1"),
    "data.image_cache_mb": (lambda v: v >= 0, ">= 0"),
    "data.corpus_mix": (lambda v: v in ("size", "temperature", "explicit"), "size, temperature or explicit"),
    "data.mix_temperature": (lambda v: v > 0, "> 0"),
    "data.synth_images": (lambda v: v >= 10, ">= 10"),
    "data.max_bad_fraction": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "data.s3_retry_seconds": (lambda v: v >= 0, ">= 0"),
    "model.preset": (lambda v: v in PRESETS, ", ".join(PRESETS)),
    "model.image_size": (lambda v: v == 0 or v >= 32, "0 or >= 32, a multiple of the patch size"),
    "model.patch_size": (lambda v: v == 0 or v >= 2, "0 or >= 2"),
    "model.stem": (lambda v: v in STEMS, ", ".join(STEMS)),
    "model.global_pool": (lambda v: v in POOLS, ", ".join(POOLS)),
    "model.in_chans": (lambda v: v >= 1, ">= 1"),
    "model.activation": (lambda v: v in ("", "gelu", "relu"), "gelu or relu"),
    "model.drop_path": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.caption_max_len": (lambda v: v >= 4, ">= 4"),
    "model.question_max_len": (lambda v: v >= 4, ">= 4"),
    "model.min_word_count": (lambda v: v >= 1, ">= 1"),
    "model.max_answers": (lambda v: v >= 2, ">= 2"),
    "model.answer_rule": (lambda v: v in ("rsvqa-lr", "exact"), "rsvqa-lr or exact"),
    "loss.regularization": (lambda v: v in ("decoupled", "l2"), "decoupled or l2"),
    "loss.l2": (lambda v: v >= 0, ">= 0"),
    "loss.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "loss.balance": (lambda v: v in ("fixed", "uncertainty"), "fixed or uncertainty"),
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "optim.grad_clip": (lambda v: v >= 0, ">= 0 (0: off)"),
    "optim.grad_accum": (lambda v: v >= 1, ">= 1"),
    "optim.layer_decay": (lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
    "optim.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "model.freeze_encoder_blocks": (lambda v: v >= 0, ">= 0 (0: none)"),
    "train.max_steps": (lambda v: v >= 0, ">= 1, or 0 with train.epochs"),
    "train.epochs": (lambda v: v >= 0, "> 0, or 0 with train.max_steps"),
    "train.checkpoint_every": (lambda v: v >= 1, ">= 1"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.elastic_resize_check_s": (lambda v: v > 0, "> 0"),
    "train.preemption_grace_s": (lambda v: v > 0, "> 0"),
    "train.cpus_per_worker": (lambda v: v >= 1, ">= 1"),
    "train.torch_threads": (lambda v: v >= 0, ">= 0"),
    "train.zero_stage": (lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3"),
    "train.precision": (lambda v: v in ("auto", "fp32", "bf16", "bf16-autocast"), "auto, fp32, bf16 or bf16-autocast"),
    "train.compile": (lambda v: v in ("auto", "true", "false"), "auto, true or false"),
    "train.max_failures": (lambda v: v >= -1, ">= 0, or -1 for unlimited"),
    "train.mode": (lambda v: v in ("all", "alternate"), "all or alternate"),
    "eval.every": (lambda v: v >= 0, ">= 0"),
    "eval.val_batches": (lambda v: v >= 1, ">= 1"),
    "eval.split": (lambda v: bool(v), "a split name"),
    "eval.beam_size": (lambda v: v >= 1, ">= 1"),
    "eval.max_samples": (lambda v: v >= 0, ">= 0"),
    "eval.count_rule": (lambda v: v in ("rsvqa-lr", "exact"), "rsvqa-lr or exact"),
    "eval.tta": (lambda v: v in TTA_MODES, " or ".join(TTA_MODES)),
    "eval.knn.k": (lambda v: v >= 1, ">= 1"),
    "eval.knn.max_train": (lambda v: v >= 1, ">= 1"),
    "log.mlflow_experiment": (lambda v: bool(v), "an experiment name"),
    "faults.fail_at_step": (lambda v: v >= 0, ">= 0 (0: never)"),
    "faults.kind": (lambda v: v in FAULT_KINDS, ", ".join(FAULT_KINDS)),
}

# Range checks of task options (tasks/base.py `options`): tasks.<task>.<option> of every task that takes it.
OPTION_CHECKS: dict[str, tuple[Callable, str]] = {
    "mixup": (lambda v: v >= 0, ">= 0 (0: off)"),
    "cutmix": (lambda v: v >= 0, ">= 0 (0: off)"),
    "mix_prob": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    # mae (tasks/mae.py): the encoder must see a patch and miss one; the decoder's heads are DECODER_HEAD_WIDTH wide
    "mask_ratio": (lambda v: 0 < v < 1, "in (0, 1)"),
    "decoder_depth": (lambda v: v >= 1, ">= 1"),
    "decoder_dim": (lambda v: v >= DECODER_HEAD_WIDTH and v % DECODER_HEAD_WIDTH == 0,
                    f"a multiple of {DECODER_HEAD_WIDTH}, >= {DECODER_HEAD_WIDTH}"),
}


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg):
    for key, (ok, allowed) in CHECKS.items():
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key {key}: {value!r} is not allowed (expected {allowed})")
    workers = cfg.train.num_workers
    if isinstance(workers, int) and workers < 1 or isinstance(workers, list) and (
            len(workers) != 2 or not 1 <= workers[0] <= workers[1]):
        raise ConfigError(f"config key train.num_workers: {workers!r} is not allowed "
                          "(expected a number >= 1, or [min, max] with 1 <= min <= max)")
    _validate_patches(cfg.model)
    strong = [t.name for t in registry.all_tasks() if t.strong_augment]
    for task in registry.all_tasks():
        _validate_task(getattr(cfg.tasks, task.name), task, strong)
    if cfg.loss.regularization == "l2" and cfg.train.zero_stage == 3:
        # ZeRO-3 partitions the parameters outside forward: the explicit L2 term would read placeholders.
        raise ConfigError("config key loss.regularization: l2 is not supported with train.zero_stage=3 "
                          "(use decoupled weight decay)")
    if cfg.optim.ema_decay > 0 and cfg.train.zero_stage == 3:
        # ZeRO-3 partitions the parameters: no rank holds the whole weights the average reads.
        raise ConfigError("config key optim.ema_decay: an EMA of the weights is not supported with "
                          "train.zero_stage=3 (use ZeRO 0-2)")
    if not cfg.tasks.enabled():
        raise ConfigError("config key tasks: at least one task must be enabled")
    if cfg.eval.keep_best:
        _validate_keep_best(cfg)
    if cfg.train.max_steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("config keys train.max_steps and train.epochs: both 0; set one of them")
    for task, w in cfg.loss.weights.items():
        if task not in registry.names():
            check_renamed("loss.weights.", task)
            raise ConfigError(f"unknown config key loss.weights.{task}{closest(task, registry.names())}")
        if w < 0:
            raise ConfigError(f"config key loss.weights.{task}: {w!r} is not allowed (expected >= 0)")
    return cfg


def _validate_patches(model) -> None:
    defaults = meta_encoder(model.preset).patch_embed
    size, patch = model.image_size or defaults.img_size[0], model.patch_size or defaults.patch_size[0]
    if size % patch:
        raise ConfigError(f"config key model.image_size: {size} is not a multiple of the patch size {patch} "
                          "(model.patch_size)")
    if model.stem == "conv" and (patch & (patch - 1)):
        raise ConfigError(f"config key model.stem: conv halves the image log2(patch) times; the patch size {patch} "
                          "is not a power of 2")


def _validate_keep_best(cfg) -> None:
    metric, every = cfg.eval.keep_best, cfg.eval.every
    logged = registry.validation_metrics(cfg.tasks.enabled()) + ([KNN_METRIC] if cfg.eval.knn.corpus else [])
    if metric not in logged:
        raise ConfigError(f"config key eval.keep_best: {metric!r} is not a validation metric of the enabled tasks "
                          f"(expected one of {', '.join(logged)}){closest(metric, logged)}")
    if every == 0 or every % cfg.train.checkpoint_every:
        raise ConfigError(f"config key eval.keep_best: needs every validation to be a checkpoint (eval.every > 0 and "
                          f"a multiple of train.checkpoint_every); got eval.every={every}, "
                          f"train.checkpoint_every={cfg.train.checkpoint_every}")


def _validate_task(tc, task, strong: list[str]) -> None:
    name = task.name
    if tc.batch_size < 1:
        raise ConfigError(f"config key tasks.{name}.batch_size: {tc.batch_size!r} is not allowed (expected >= 1)")
    if tc.augment not in AUGMENT_POLICIES:
        raise ConfigError(f"config key tasks.{name}.augment: {tc.augment!r} is not allowed "
                          f"(expected {', '.join(AUGMENT_POLICIES)})")
    if tc.augment in CROPPING_POLICIES and not task.strong_augment:
        raise ConfigError(f"config key tasks.{name}.augment: {tc.augment} crops and recolours images, which can "
                          f"change counts and what texts say; only {', '.join(strong)} may use it")
    if not 0 <= tc.erase_prob <= 1:
        raise ConfigError(f"config key tasks.{name}.erase_prob: {tc.erase_prob!r} is not allowed (expected in [0, 1])")
    if tc.erase_prob and tc.augment not in CROPPING_POLICIES:
        raise ConfigError(f"config key tasks.{name}.erase_prob: erasing goes with augment "
                          f"{' or '.join(CROPPING_POLICIES)}, not {tc.augment}")
    for key, (ok, allowed) in OPTION_CHECKS.items():
        if key in task.options and not ok(getattr(tc, key)):
            raise ConfigError(f"config key tasks.{name}.{key}: {getattr(tc, key)!r} is not allowed (expected {allowed})")
    if tc.global_batch_size < 0:
        raise ConfigError(f"config key tasks.{name}.global_batch_size: {tc.global_batch_size!r} is not allowed "
                          "(expected >= 1, or 0: off)")
    for key in ("questions_per_image", "captions_per_image"):  # a cap on the items one visit trains
        value = getattr(tc, key)
        if value < 0:
            raise ConfigError(f"config key tasks.{name}.{key}: {value!r} is not allowed (expected >= 0; 0: all "
                              "of an image's items)")
        if value and key != task.per_visit_key:
            users = [t.name for t in registry.all_tasks() if t.per_visit_key == key]
            raise ConfigError(f"config key tasks.{name}.{key}: only {' and '.join(users)} take it")
    if tc.enabled and not tc.corpora:
        raise ConfigError(f"config key tasks.{name}.corpora: an enabled task needs at least one corpus")
    for corpus, w in tc.corpus_weights.items():
        if corpus not in tc.corpora or w < 0:
            raise ConfigError(f"config key tasks.{name}.corpus_weights.{corpus}: must name a listed corpus, weight >= 0")


def check_renamed(prefix: str, key: str) -> None:
    """A task's former name under tasks. or loss.weights. is an error naming the name it has now."""
    new = registry.renamed().get(key) if prefix in ("tasks.", "loss.weights.") else None
    if new:
        raise ConfigError(f"config key {prefix}{key}: the task is now named {new!r}; use {prefix}{new}")


def closest(name: str, candidates) -> str:
    """" (did you mean X?)" for the candidate closest to a mistyped `name`, or ""."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
