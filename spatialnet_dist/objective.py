"""The weighted multi-task objective: L = sum_t lambda_t * L_t (+ lambda_reg * ||theta||^2 when loss.regularization=l2).

L_t is task t's `loss` (spatialnet_dist/tasks/<t>.py), lambda_t its `loss.weights.<t>` (default 1).
Decoupled weight decay (AdamW) is the default regulariser and lives in the optimizer; the explicit L2 term
is the seed's formulation and penalises the same parameters AdamW would decay.
"""

from __future__ import annotations

from typing import Any

import torch

from spatialnet_dist import tasks as registry
from spatialnet_dist.config import LossConfig


def loss_states(cfg, vocabs, tasks: list[str]) -> dict[str, Any]:
    """What each task's loss needs beyond the config (e.g. tagging's positive weights), prepared once."""
    return {t: registry.get(t).loss_state(cfg, vocabs) for t in tasks}


class MultiTaskObjective:
    """`objective(outputs, batch, model) -> {"loss", "<task>_loss", ...}`; only "loss" drives backward.

    A task absent from the batch contributes nothing. Also returns each task's extra training metrics
    (`Task.train_metrics`, e.g. "regression_mae") and "l2_loss" under l2. `states`: loss_states().
    """

    def __init__(self, loss_cfg: LossConfig, states: dict[str, Any] | None = None):
        self.cfg, self.states = loss_cfg, states or {}

    def __call__(self, outputs: dict, batch: dict, model=None) -> dict[str, torch.Tensor]:
        if not outputs:
            raise ValueError("no task outputs to compute a loss from")
        metrics: dict[str, torch.Tensor] = {}
        total = None
        for name, out in outputs.items():
            task = registry.get(name)
            task_loss = task.loss(out, batch[name], self.cfg, self.states.get(name))
            weighted = self.cfg.weights.get(name, 1.0) * task_loss
            total = weighted if total is None else total + weighted
            metrics[f"{name}_loss"] = task_loss.detach()
            metrics.update(task.train_metrics(out, batch[name]))
        if self.cfg.regularization == "l2" and self.cfg.l2 > 0:
            if model is None:
                raise ValueError("loss.regularization=l2 needs the model to penalise its weights")
            l2 = self.cfg.l2 * sum(p.float().pow(2).sum() for p in model.decayed_parameters())
            total = total + l2
            metrics["l2_loss"] = l2.detach()
        return {"loss": total, **metrics}
