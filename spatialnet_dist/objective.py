"""The weighted multi-task objective: L = sum_t lambda_t * L_t (+ lambda_reg * ||theta||^2 when loss.regularization=l2).

Decoupled weight decay (AdamW) is the default regulariser and lives in the optimizer; the explicit L2 term
is the seed's formulation and penalises the same parameters AdamW would decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spatialnet_dist.config import LossConfig
from spatialnet_dist.text import PAD_ID


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore: int, label_smoothing: float = 0.0):
    """Mean CE over the non-ignored targets; 0 (still attached to the graph) when all are ignored,
    where F.cross_entropy's mean would be 0/0 = NaN. Computed in fp32 also for bf16 logits."""
    per_item = F.cross_entropy(logits.float(), target, ignore_index=ignore, label_smoothing=label_smoothing, reduction="none")
    return per_item.sum() / (target != ignore).sum().clamp(min=1)


def classification_loss(out: dict, sub: dict, cfg: LossConfig) -> torch.Tensor:
    return _cross_entropy(out["logits"], sub["label"], ignore=-1, label_smoothing=cfg.label_smoothing)


def captioning_loss(out: dict, sub: dict, cfg: LossConfig) -> torch.Tensor:
    # A mean over the words of the sub-batch's C captions: a visit that trains all references of its image
    # weighs like the same captions each with its own copy of the image.
    logits = out["logits"]  # (C, Lc-1, V) predicting tokens[:, 1:]
    target = sub["tokens"][:, 1:]  # (C, Lc-1)
    return _cross_entropy(logits.flatten(0, 1), target.flatten(), ignore=PAD_ID)


def vqa_loss(out: dict, sub: dict, cfg: LossConfig) -> torch.Tensor:
    # A mean over the sub-batch's Q questions, not its images: loss.weights.vqa weighs a question's loss
    # the same however many questions each image visit answers.
    return _cross_entropy(out["logits"], sub["answer"], ignore=-1)  # (Q, A) vs (Q,); -1: outside the vocabulary


def regression_loss(out: dict, sub: dict, cfg: LossConfig) -> torch.Tensor:
    # log1p: counts span 0..thousands; on the raw scale the large ones would swamp every other loss.
    # A mean over the Q count questions, as for vqa.
    return F.mse_loss(out["count_log1p"].float(), torch.log1p(sub["count"].float()))


LOSSES = {
    "captioning": captioning_loss,
    "vqa": vqa_loss,
    "classification": classification_loss,
    "regression": regression_loss,
}


class MultiTaskObjective:
    """`objective(outputs, batch, model) -> {"loss", "<task>_loss", ...}`; only "loss" drives backward.

    Label smoothing applies to land-use classification. A task absent from the batch contributes nothing.
    Also returns "regression_mae" (raw-count MAE) when regression is present and "l2_loss" under l2.
    """

    def __init__(self, loss_cfg: LossConfig):
        self.cfg = loss_cfg

    def __call__(self, outputs: dict, batch: dict, model=None) -> dict[str, torch.Tensor]:
        if not outputs:
            raise ValueError("no task outputs to compute a loss from")
        metrics: dict[str, torch.Tensor] = {}
        total = None
        for task, out in outputs.items():
            task_loss = LOSSES[task](out, batch[task], self.cfg)
            weighted = self.cfg.weights.get(task, 1.0) * task_loss
            total = weighted if total is None else total + weighted
            metrics[f"{task}_loss"] = task_loss.detach()
        if "regression" in outputs:
            pred = torch.expm1(outputs["regression"]["count_log1p"].detach().float()).clamp(min=0)
            metrics["regression_mae"] = (pred - batch["regression"]["count"].float()).abs().mean()
        if self.cfg.regularization == "l2" and self.cfg.l2 > 0:
            if model is None:
                raise ValueError("loss.regularization=l2 needs the model to penalise its weights")
            l2 = self.cfg.l2 * sum(p.float().pow(2).sum() for p in model.decayed_parameters())
            total = total + l2
            metrics["l2_loss"] = l2.detach()
        return {"loss": total, **metrics}
