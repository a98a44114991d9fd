"""The DeepSpeed engine: the only module that imports deepspeed.

Below train/ (which builds, steps and saves the engine), spatialnet_dist.checkpoint (which reshards a checkpoint
to load on another number of ranks) and spatialnet_dist.checkpoint_weights (whose model loading consolidates ZeRO
shards for evaluate/ too), so that deepspeed stays in this one file.

Builds DeepSpeed's JSON config from ours, the AdamW parameter groups, the warm-up + cosine schedule,
and wraps `deepspeed.initialize`, checkpoint save/load and ZeRO consolidation.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys

import torch

from spatialnet_dist import versions
from spatialnet_dist.config import Config

versions.require("deepspeed")  # the ZeRO-3 internals below are those of the versions it accepts
# DeepSpeed reads DS_ACCELERATOR when it is first imported; a CPU-only process must say so first.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles its CPU all-reduce op on first use with the `ninja` on PATH (cached in TORCH_EXTENSIONS_DIR).
# A venv's bin first, as its `activate` puts it (and the Makefile, and Ray workers, which inherit PATH): the
# venv's ninja and a system one write build logs the other cannot read, so each rebuilt (~60 s) what the other built.
if sys.prefix != sys.base_prefix and os.environ.get("PATH", "").split(os.pathsep)[0] != os.path.dirname(sys.executable):
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

import deepspeed  # noqa: E402
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E402


def precision(cfg: Config) -> str:
    """bf16-autocast on GPU, fp32 on CPU, unless the config names one."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16-autocast" if cfg.train.use_gpu else "fp32"


def compiled(cfg: Config) -> bool:
    """train.compile: auto compiles on GPU only (on CPU the compile costs more than it saves in a short run)."""
    if cfg.train.compile == "auto":
        return cfg.train.use_gpu
    return cfg.train.compile == "true"


def micro_batch_size(cfg: Config) -> int:
    """Samples one rank sees per micro-step: the sum of the enabled tasks' sub-batches."""
    return sum(getattr(cfg.tasks, t).batch_size for t in cfg.tasks.enabled())


def deepspeed_config(cfg: Config, world_size: int, model: torch.nn.Module) -> dict:
    zero: dict = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage >= 1:
        # ZeRO-3 keeps a reduce bucket of this many elements alive between steps: a fixed 5e7 would
        # outweigh a small model's whole partition (bench/zero_memory.py), so scale it with the model.
        n_params = sum(p.numel() for p in model.parameters())
        bucket = int(min(5e7, max(1e6, n_params // 8)))
        # contiguous_gradients copies every gradient into one buffer as backward makes it, to spare a GPU's
        # allocator fragmentation; on CPU ZeRO-1/2 that copy is pure cost (a world of one at 64 px: 0.72-0.75 of
        # a bare step with it, 0.79-0.87 without; bench/RESULTS.md, fixed per-step costs). ZeRO-3 keeps it.
        contiguous = cfg.train.use_gpu or cfg.train.zero_stage == 3
        zero.update(overlap_comm=cfg.train.use_gpu, contiguous_gradients=contiguous, reduce_bucket_size=bucket)
    if cfg.train.zero_stage == 3:
        # ZeRO-3 keeps parameters under this many elements whole on every rank, to spare their gathers.
        # DeepSpeed's 1e5 keeps a narrow model's projection matrices whole too (tiny: 4.9 of 24 MiB);
        # keep only the vectors (biases, norms, tokens) and partition every matrix.
        zero["stage3_param_persistence_threshold"] = max((p.numel() for p in model.parameters() if p.ndim <= 1), default=0)
    if cfg.train.offload_optimizer and cfg.train.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.train.use_gpu}
    if cfg.train.offload_params and cfg.train.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.train.use_gpu}
    micro = micro_batch_size(cfg)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": micro * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision(cfg) == "bf16"},
        "torch_autocast": {"enabled": precision(cfg) == "bf16-autocast", "dtype": "bfloat16"},
        "fp16": {"enabled": False},
        # Each node writes its own ranks' files; Ray Train merges them in run storage.
        "checkpoint": {"use_node_local_storage": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position/class tokens and embeddings; with layer_decay < 1
    one group per lr factor as well (model.lr_scales), each group's lr = lr x its `lr_scale`. LambdaLR
    multiplies every group's own initial lr, so the schedule keeps the ratios. Frozen parameters stay out.
    The scale-1 groups (heads) come first: the logged lr (group 0's) is the peak one."""
    no_decay = set(model.no_weight_decay_names()) if hasattr(model, "no_weight_decay_names") else set()
    scales = model.lr_scales(layer_decay) if layer_decay != 1.0 else {}
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim <= 1 or name in no_decay)
        groups.setdefault((scales.get(name, 1.0), decayed), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale, "lr_scale": scale}
        for (scale, decayed), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
    ]


def lr_lambda(cfg: Config):
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak at max_steps."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def init_distributed(use_gpu: bool) -> None:
    """Join the process group Ray Train (or torchrun) made; create it when none exists yet."""
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", dist_init_required=None)


def close_distributed() -> None:
    """Leave the process group once every rank is done. A rank that exits with gloo's threads still up can die of
    `terminate called without an active exception` (SIGABRT) while a peer is still in its last collective."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def create_engine(cfg: Config, model: torch.nn.Module, world_size: int):
    """-> DeepSpeed engine with AdamW, the LR schedule and ZeRO from cfg."""
    if cfg.train.activation_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.layer_decay)
    ds_config = deepspeed_config(cfg, world_size, model)
    adam = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": 1e-8, "weight_decay": cfg.optim.weight_decay}
    if cfg.loss.regularization == "l2":
        adam["weight_decay"] = 0.0  # the objective adds lambda_reg * ||theta||^2 instead
        for g in groups:
            g["weight_decay"] = 0.0
    optimizer = None
    if cfg.train.offload_optimizer:
        # Offloaded ZeRO needs DeepSpeed's own CPU Adam; DeepSpeed builds it from the config.
        ds_config["optimizer"] = {"type": "AdamW", "params": adam}
    else:
        # On GPU torch's fused AdamW (one kernel for all tensors): DeepSpeed's own FusedAdam needs compiled
        # ops, which a pure-python DeepSpeed wheel lacks. CPU keeps the for-each implementation.
        optimizer = torch.optim.AdamW(groups, lr=adam["lr"], betas=adam["betas"], eps=adam["eps"],
                                      fused=True if cfg.train.use_gpu else None)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        config=ds_config,
        dist_init_required=False,
    )
    share_fp32_master_partitions(engine.optimizer)
    if compiled(cfg):
        compile_engine(engine)
    return engine


def compile_engine(engine) -> None:
    """torch.compile the engine's module in place (nn.Module.compile, through engine.compile).

    In place, not torch.compile(model) before deepspeed.initialize: the module keeps its parameter names
    (no `_orig_mod.` prefix), so checkpoints and ZeRO consolidation are those of an eager run, and
    DeepSpeed's ZeRO-3 gather/release hooks stay on the real submodules, where DeepSpeed marks them
    compiler-disabled (a graph break per hooked module under ZeRO-3; one graph under ZeRO-0/1/2).
    Shapes are left to dynamo (first shape static; a second one recompiles with dynamic sizes), since
    the vqa/regression question count varies from batch to batch.
    """
    engine.compile()


def share_fp32_master_partitions(optimizer) -> None:
    """fp32 ZeRO-3: make the optimizer's master partitions the parameter partitions themselves.

    DeepSpeed 0.19 means to skip the master copy when the partitions are already fp32 on the optimizer's
    device ("we don't need another copy of the weights", stage3.py), but it compares a torch.device with
    the accelerator's device name, a str, which is never equal; so every rank keeps a second fp32 copy of
    its partition: 4 bytes per parameter for nothing (bench/zero_memory.py). Pointing each master at its
    partition's storage gives the layout DeepSpeed intended; the optimizer keeps its tensors, and their
    state, by identity, and the step's master -> partition copy becomes a copy onto itself.
    """
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    partitions = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not partitions or getattr(optimizer, "offload_optimizer", False):
        return  # not ZeRO-3, or offloaded: DeepSpeed's CPU optimizer owns its own fp32 copy
    for master, partition in zip(masters, partitions, strict=True):
        if (master is not partition and master.dtype == partition.dtype and master.device == partition.device
                and master.shape == partition.shape):
            master.data = partition.data


def save_checkpoint(engine, directory: str, tag: str, client_state: dict) -> None:
    """Every rank writes its ZeRO shard under directory/tag (rank 0 also the module states)."""
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=True)


def load_checkpoint(engine, directory: str, tag: str, weights_only: bool = False, universal: bool = False) -> dict:
    """-> the client_state saved with it. weights_only: fine-tuning start, fresh optimizer. universal: the
    files are DeepSpeed's universal checkpoint (`to_universal`), which loads on any number of ranks."""
    # DeepSpeed reads `checkpoint.load_universal` from the engine's config at load time only: set it for this
    # load rather than build the engine (before anyone knows what it resumes from) with it.
    engine._config.load_universal_checkpoint = universal
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups] \
        if universal and engine.zero_optimization_stage() == 3 else None
    try:
        path, client_state = engine.load_checkpoint(
            directory,
            tag=tag,
            load_module_only=weights_only,
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
        )
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(os.path.join(directory, tag))
    if groups is not None:
        # ZeRO-3's universal load gives every parameter group the first group's hyperparameters (stage3.py);
        # ours differ (no weight decay on norms and biases, lr_scale per layer): put each group's back, with
        # its lr as the restored schedule sets it.
        lrs = engine.lr_scheduler.get_last_lr()
        for group, saved, lr in zip(engine.optimizer.param_groups, groups, lrs, strict=True):
            group.update({**saved, "lr": lr})
    return client_state or {}


def to_universal(directory: str, tag: str, out_dir: str) -> None:
    """DeepSpeed's universal checkpoint (one fp32 file per parameter and per Adam moment) of the ZeRO-1/2/3
    checkpoint `directory/tag`, written to `out_dir/tag`: what loads on another number of ranks. Reads every
    rank's shard and writes ~12 bytes per parameter; serial (no process pool inside a training worker)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=os.path.join(directory, tag), output_folder=os.path.join(out_dir, tag),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # our engine records no universal_checkpoint_info (a Megatron notion); the
                              # converter then needs its version key only
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        ds_to_universal.main(args)
    with open(os.path.join(out_dir, "latest_universal"), "w") as f:
        f.write(tag)


def consolidated_state_dict(directory: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from the ranks' ZeRO shards of any stage (DeepSpeed's own consolidation for stages 1-3).
    ZeRO-0 writes no shards: rank 0's model states file holds the whole module, which DeepSpeed's
    consolidation cannot read (it fails on the absent parameter shapes)."""
    states = os.path.join(directory, tag, "mp_rank_00_model_states.pt")  # ZeRO-3 names its files per rank
    if os.path.isfile(states):
        saved = torch.load(states, map_location="cpu", weights_only=False)
        if saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 0:
            return {k: v.float() for k, v in saved["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(directory, tag=tag)


def full_model(engine, build) -> torch.nn.Module:
    """A model whose forward needs no collectives, for evaluation on each rank independently.

    Stages 0-2 keep whole parameters on every rank: the engine's module is that model. Under ZeRO-3
    a forward would all-gather per module, and beam search runs a different number of forwards per
    rank, so gather the parameters once (a collective: every rank calls this) into a plain copy.
    """
    if engine.zero_optimization_stage() < 3:
        return engine.module
    model = build().to(engine.device)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        model.load_state_dict({k: v.detach().float() for k, v in engine.module.state_dict().items()})
    # The gather leaves ZeRO-3's recorded parameter-fetch order stale; the next training step would
    # prefetch from it and fail ("tracing error"). Let it record the order afresh.
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
    return model
