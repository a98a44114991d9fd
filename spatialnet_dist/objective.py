"""The weighted multi-task objective: L = sum_t lambda_t * L_t (+ lambda_reg * ||theta||^2 when loss.regularization=l2).

L_t is task t's `loss` (spatialnet_dist/tasks/<t>.py), lambda_t its `loss.weights.<t>` (default 1).
Decoupled weight decay (AdamW) is the default regulariser and lives in the optimizer; the explicit L2 term
is the seed's formulation and penalises the same parameters AdamW would decay.

loss.balance=uncertainty learns the task weights (Kendall, Gal & Cipolla 2018): each task has a log-variance
s_t (`TaskBalance`, init 0) and L = sum_t lambda_t * (exp(-s_t) * L_t + s_t). Kendall et al. derive
0.5 * exp(-s) * L + 0.5 * s for a Gaussian (regression) and exp(-s) * L + 0.5 * s for a softmax (classification)
likelihood; we take the one form most re-implementations use for every task because (1) at s = 0 it is the
fixed objective, value and gradients, so a run starts where a fixed run does, and (2) its optimum in s_t,
exp(-s_t) = 1 / L_t, is the same rule for every task whatever likelihood its loss comes from. lambda_t stays a
prior on top (0 still switches a task's loss off). "loss" is then on another scale than a fixed run's (at its
optimum a task's term is 1 + log L_t, negative once L_t < 1/e): compare runs by their per-task losses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spatialnet_dist import tasks as registry
from spatialnet_dist.batch_format import task_images
from spatialnet_dist.config import LossConfig


def loss_states(cfg, vocabs, tasks: list[str]) -> dict[str, Any]:
    """What each task's loss needs beyond the config (e.g. tagging's positive weights), prepared once."""
    return {t: registry.get(t).loss_state(cfg, vocabs) for t in tasks}


class TaskBalance(nn.Module):
    """loss.balance=uncertainty's learned part: one log-variance s_t per task, 0 at init (weight exp(-s_t) = 1).

    The model owns it (`model.loss_balance`, model.spatialnet.assemble_model) so that the engine that optimises
    the network optimises s too: ZeRO partitions it, checkpoints save it, a resume restores it. It is called
    as a module (not read as a tensor) so that ZeRO-3 gathers its parameter for the call. A 1-D parameter:
    neither weight decay (engine.param_groups) nor the explicit L2 term (SpatialNetViT.no_weight_decay_names).
    """

    def __init__(self, tasks: list[str]):
        super().__init__()
        self.tasks = list(tasks)
        self.log_variances = nn.Parameter(torch.zeros(len(self.tasks)))  # (T,): s_t in `tasks` order

    def forward(self, task_losses: dict[str, torch.Tensor], weights: dict[str, float]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """{task: L_t} of the tasks present, {task: lambda_t} -> (sum_t lambda_t * (exp(-s_t) * L_t + s_t),
        {task: exp(-s_t)} of every task, detached)."""
        s = self.log_variances.float()  # (T,); fp32 also where the engine keeps bf16 weights
        precision = torch.exp(-s)  # (T,)
        total = None
        for i, task in enumerate(self.tasks):
            if task in task_losses:
                term = weights[task] * (precision[i] * task_losses[task] + s[i])
                total = term if total is None else total + term
        return total, {task: precision[i].detach() for i, task in enumerate(self.tasks)}


class MultiTaskObjective:
    """`objective(outputs, batch, model) -> {"loss", "<task>_loss", ...}`; only "loss" drives backward.

    A task absent from the batch contributes nothing. Also returns each task's extra training metrics
    (`Task.train_metrics`, e.g. "regression_mae"), "l2_loss" under l2 and each task's learned weight
    exp(-s_t) as "balance/<task>" under uncertainty. `states`: loss_states().
    """

    def __init__(self, loss_cfg: LossConfig, states: dict[str, Any] | None = None):
        self.cfg, self.states = loss_cfg, states or {}

    def report_keys(self, tasks: list[str]) -> list[str]:
        """The keys of its result that a training report averages over its window (train/trainer.py)."""
        keys = ["loss"] + [f"{t}_loss" for t in tasks]
        return keys + [f"balance/{t}" for t in tasks] if self.cfg.balance == "uncertainty" else keys

    def task_losses(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        """{task: L_t} of the tasks in `outputs`, unweighted: what validation reports. A task whose loss reads
        pixels (Task.loss_reads_images) gets its sub-batch with its "image" (B, C, S, S)."""
        losses = {}
        for name, out in outputs.items():
            task = registry.get(name)
            sub = {**batch[name], "image": task_images(batch, name)} if task.loss_reads_images else batch[name]
            losses[name] = task.loss(out, sub, self.cfg, self.states.get(name))
        return losses

    def __call__(self, outputs: dict, batch: dict, model=None) -> dict[str, torch.Tensor]:
        if not outputs:
            raise ValueError("no task outputs to compute a loss from")
        task_losses = self.task_losses(outputs, batch)
        metrics: dict[str, torch.Tensor] = {f"{name}_loss": loss.detach() for name, loss in task_losses.items()}
        for name, out in outputs.items():
            metrics.update(registry.get(name).train_metrics(out, batch[name]))
        weights = {name: self.cfg.weights.get(name, 1.0) for name in task_losses}
        if self.cfg.balance == "uncertainty" and model is not None:
            balance = getattr(model, "loss_balance", None)
            if balance is None:
                raise ValueError("loss.balance=uncertainty needs a model built with its task balance "
                                 "(build_model(..., balance=True))")
            total, learned = balance(task_losses, weights)
            metrics.update({f"balance/{t}": w for t, w in learned.items()})
        else:  # fixed; without a model uncertainty's too
            total = None
            for name, task_loss in task_losses.items():
                weighted = weights[name] * task_loss
                total = weighted if total is None else total + weighted
        if self.cfg.regularization == "l2" and self.cfg.l2 > 0:
            if model is None:
                raise ValueError("loss.regularization=l2 needs the model to penalise its weights")
            l2 = self.cfg.l2 * sum(p.float().pow(2).sum() for p in model.decayed_parameters())
            total = total + l2
            metrics["l2_loss"] = l2.detach()
        return {"loss": total, **metrics}
