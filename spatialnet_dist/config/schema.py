"""The schema of a run's config: one dataclass per section (run, data, tasks.<task>, model, loss, optim, train,
eval, eval.knn, log, faults) and `Config`, which nests them. Each key is a field; its default is the field's; what
it means is the `#` comment above the field or after it on its line; a section's docstring says what the section is.
The sections a task reads (TaskConfig, ModelConfig, LossConfig) are in spatialnet_dist/task_sections.py, below
the task registry that this module imports, so that no task module has to import config.

`tasks.<task>` has one section per registered task (spatialnet_dist/tasks): the section's class is made from the
registry when a Config is made (`tasks_config_class`), with the task's own options (`Task.options`) beside the
common TaskConfig keys.

Listing every key with its type, default and comment (docs/hooks.py does so for the configuration reference):
walk `dataclasses.fields(section)` from an instance, `Config()` (the same defaults `config.load(None, [])` gives),
recursing into a field whose value is a dataclass (eval.knn too). A key's type is
`typing.get_type_hints(type(section))[name]` (the annotations here are strings, so `field.type` is not the type);
its default is `getattr(section, name)` (a `default_factory` field has no `field.default`); its comment is read
from `inspect.getsource` of the section's class and of each dataclass base in its MRO, tokenized. A class made
from the registry has no source: a task section's common keys have TaskConfig's comments, its own options are
documented in `options` in spatialnet_dist/tasks/<task>.py.

What values each key may hold is checks.py's; reading YAML files and `--set` overrides into a Config, loader.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from spatialnet_dist import tasks as registry
from spatialnet_dist.config.coercion import merge
from spatialnet_dist.store.s3 import DEFAULT_RETRY_SECONDS
from spatialnet_dist.task_sections import LossConfig, ModelConfig, TaskConfig


@dataclass
class RunConfig:
    name: str = "demo"
    storage: str = "runs"  # local dir or s3://bucket/prefix
    seed: int = 0
    keep_checkpoints: int = 2  # complete checkpoints kept (partial ones are deleted); 0 keeps all


@dataclass
class DataConfig:
    root: str = "shards"  # local dir or s3://bucket/prefix
    loader_workers: int = 1  # DataLoader worker processes per training worker
    prefetch: int = 2
    image_cache_mb: int = 256  # decoded training images each loader worker keeps (0: none)
    # Node-local folder for S3 training shards, each downloaded once and then read by position; "": a folder
    # under the system temp dir (data/indexed.py). Needs room for the training shards of the enabled tasks.
    cache_dir: str = ""
    corpus_mix: str = "size"  # size | temperature | explicit (tasks.<t>.corpus_weights)
    mix_temperature: float = 2.0
    synth_images: int = 600  # size of the synthetic corpus generated on first use
    synth_seed: int = 0
    max_bad_fraction: float = 0.5  # stop when more than this fraction of a stream's samples fail
    # How long one S3 operation (a shard read, a metrics write, an upload) keeps retrying, with backoff, through
    # an outage of the endpoint before the run stops naming it; a read resumes at its byte offset (store/storage.py).
    s3_retry_seconds: float = DEFAULT_RETRY_SECONDS


@dataclass
class TasksConfig:
    """One TaskConfig field per registered task, in registry order (the class is made by tasks_config_class)."""

    def enabled(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name).enabled]

    def __reduce__(self):  # the made class is not importable by name: pickle (Ray, copies) rebuilds it from values
        return _tasks_config_from_dict, (dataclasses.asdict(self),)


def _tasks_config_from_dict(data: dict) -> TasksConfig:
    tasks = tasks_config_class()()
    merge(tasks, data, Config, "tasks.")
    return tasks


_TASKS_CONFIG_CLASSES: dict[tuple, type] = {}


def _task_config_class(task) -> type:
    """TaskConfig with the task's own options (`Task.options`, e.g. tagging's pos_weight) as extra keys."""
    if not task.options:
        return TaskConfig
    return dataclasses.make_dataclass(f"{task.name.title()}TaskConfig",
                                      [(k, type(v), field(default=v)) for k, v in task.options.items()],
                                      bases=(TaskConfig,))


def tasks_config_class() -> type:
    """The TasksConfig class of the registered tasks (made once per set of tasks)."""
    tasks = registry.all_tasks()
    key = tuple(id(t) for t in tasks)
    if key not in _TASKS_CONFIG_CLASSES:
        fields = []
        for t in tasks:
            cls, defaults = _task_config_class(t), {"enabled": t.default_enabled, "augment": t.augment}
            fields.append((t.name, cls, field(default_factory=lambda cls=cls, d=defaults: cls(**d))))
        _TASKS_CONFIG_CLASSES[key] = dataclasses.make_dataclass("TasksConfig", fields, bases=(TasksConfig,))
    return _TASKS_CONFIG_CLASSES[key]


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    # Layer-wise lr decay (BEiT/MAE fine-tuning): encoder block i (0-based) gets lr x decay^(depth - i),
    # the embeddings decay^(depth + 1), the final norm and the heads lr. 1.0: off.
    layer_decay: float = 1.0
    # An exponential moving average of the weights with this decay, updated after every optimizer step with a
    # warm-up (train/ema.py, as timm's ModelEmaV3): often a better model than the last step's. Validation, the
    # end-of-run evaluation, eval run, predict and export use it; checkpoints carry it. 0.0: off. Not with ZeRO-3,
    # whose ranks hold shards of the parameters, not the whole weights to average.
    ema_decay: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps of the whole run; 0: from train.epochs
    # Alternative to max_steps: passes over the largest enabled task's training rows (train.plan turns it
    # into max_steps before workers start; the resolved config carries both). Giving both is an error.
    epochs: float = 0.0
    checkpoint_every: int = 50
    log_every: int = 10
    # Ray Train workers: a number, or [min, max] for an elastic run (Ray Train V2's elastic scaling): it starts
    # with as many as fit, at least min, continues on fewer from the last checkpoint when workers are lost and
    # cannot be replaced, and grows back when resources return (checked every elastic_resize_check_s).
    num_workers: int | list[int] = 2
    elastic_resize_check_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: int = 1
    torch_threads: int = 0  # 0: cpus_per_worker
    zero_stage: int = 2
    # auto (bf16-autocast on GPU, fp32 on CPU) | fp32 | bf16 (DeepSpeed's: bf16 weights and gradients, fp32
    # master copy) | bf16-autocast (torch.autocast through DeepSpeed: fp32 weights and optimizer, bf16 matmuls;
    # on an H200 its step ran 34% faster at 128 rows than DeepSpeed's bf16 optimizer, whose step syncs the host
    # ~300 times: bench/RESULTS.md, GPU)
    precision: str = "auto"
    # torch.compile of the model inside the DeepSpeed engine: auto (on GPU yes, on CPU no) | true | false.
    # The first steps pay the compile (about a minute for `paper`); a new batch shape recompiles once.
    compile: str = "auto"
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    max_failures: int = 2
    # SIGTERM to a worker (spot reclaim, Kubernetes eviction): every rank checkpoints at the next step boundary
    # and the group restarts from there, within this many seconds (else Ray restarts it from the checkpoint
    # before). Neither counts against max_failures (train/preemption.py).
    preemption_grace_s: float = 30.0
    resume: str = ""  # checkpoint URL to start a new run from
    resume_weights_only: bool = False
    mode: str = "all"  # all: every task every step | alternate: one task per step

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) Ray Train workers; the same number twice for a fixed train.num_workers."""
        workers = self.num_workers
        return (workers[0], workers[1]) if isinstance(workers, list) else (workers, workers)


@dataclass
class KnnConfig:
    """eval.knn: how well the frozen encoder already separates a labelled corpus's classes, at every validation,
    without fine-tuning (the k-nearest-neighbour accuracy self-supervised frameworks report, evaluate/knn.py):
    watches a pretraining run (tasks.mae) that has no accuracy of its own. Logged as val/knn_accuracy."""

    # A corpus of data.root with classes: the pooled encoder vectors of its train images are the neighbours, its
    # val images are scored; "": off. Any corpus, whether or not a task trains on it.
    corpus: str = ""
    k: int = 20  # neighbours that vote on a val image's class, each by exp(cosine similarity / 0.07) (DINO's)
    # At most this many train images (spread over the train split's shards) are embedded at each validation: the
    # bank's cost in encoder passes; the val split is embedded whole
    max_train: int = 5000


@dataclass
class EvalConfig:
    every: int = 0  # validation every N steps; 0: off
    val_batches: int = 4
    at_end: bool = True
    split: str = "test"
    beam_size: int = 3
    length_penalty: float = 0.6
    max_samples: int = 0  # 0: the whole split
    count_rule: str = "rsvqa-lr"
    spice: bool = False
    # A validation metric, as the run logs it without "val/" (classification_accuracy, tagging_mAP_macro,
    # captioning_loss: tasks.validation_metrics); "": off. The checkpoint of the validation where it was best
    # so far is kept whatever run.keep_checkpoints says, recorded in <run dir>/best.json (a resumed run knows
    # it), evaluated at the end and named by RESULT's checkpoint and best_step. Best is the highest, but the
    # lowest for losses (*_loss) and errors (*_MAE, *_RMSE): tasks.higher_is_better. Every validation must be a
    # checkpoint: eval.every > 0, a multiple of train.checkpoint_every.
    keep_best: str = ""
    # Test-time augmentation of classification and tagging: none | symmetry (their class or tag probabilities
    # averaged over the 8 flips and quarter turns of each image, whose labels none of them changes; 8 forward
    # passes per batch, at validation too).
    tta: str = "none"
    knn: KnnConfig = field(default_factory=KnnConfig)


@dataclass
class LogConfig:
    """Where rank 0 mirrors the run's metrics besides metrics.jsonl (train/tracking.py)."""

    tensorboard: bool = True  # event files in <run dir>/tensorboard/: every metric, sample images at evaluations
    # An MLflow run: the resolved config as params, the metrics, the report and plots as artifacts. The
    # tracking URI is MLFLOW_TRACKING_URI, else sqlite:///<run.storage>/mlflow.db (a local run.storage only).
    mlflow: bool = False
    mlflow_experiment: str = "spatialnet"


@dataclass
class FaultsConfig:
    """Test faults, fired by rank 0 at `fail_at_step` (0: never). `kind`: exit: the process dies abruptly, once
    per run (a transient failure: Ray restarts the group); error: a RuntimeError at that step on every attempt
    (the same step fails twice); user_error: a UserError; nan_loss: that step's loss becomes NaN."""

    fail_at_step: int = 0
    kind: str = "exit"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TasksConfig = field(default_factory=lambda: tasks_config_class()())
    model: ModelConfig = field(default_factory=ModelConfig)
    # Every registered task's weight, so the resolved config lists them (task_sections cannot: it is below the registry)
    loss: LossConfig = field(default_factory=lambda: LossConfig(weights={t: 1.0 for t in registry.names()}))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
