"""Injected failures (faults.*, config.FaultsConfig): a hook beside the Trainer that proves how each failure class
ends. Rank 0 fires it at faults.fail_at_step: `exit` kills the process abruptly once per run (the run directory's
fault marker claims it, so the restart runs on), `error` and `user_error` raise on every attempt, `nan_loss` makes
that step's loss NaN."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

import torch

from spatialnet_dist.config import Config
from spatialnet_dist.errors import UserError
from spatialnet_dist.train.rundir import RunDir

log = logging.getLogger("spatialnet.train")


class StepHook(Protocol):
    """What the Trainer calls around its steps, in order, on every rank."""

    def on_losses(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A micro-step's losses of optimizer step `step` (the one in progress) before backward -> the losses to use."""

    def after_step(self, step: int) -> None:
        """Optimizer step `step` is done (before its report and checkpoint)."""


class FaultInjection:
    """faults.fail_at_step's fault on rank 0; `claim` (-> bool) claims the one-time `exit` (RunDir.claim_fault)."""

    def __init__(self, cfg: Config, rank: int, claim: Callable[[], bool]):
        self.kind, self.at_step = cfg.faults.kind, cfg.faults.fail_at_step
        self.rank, self.claim = rank, claim

    def _due(self, kind: str, step: int) -> bool:
        return self.rank == 0 and self.kind == kind and step == self.at_step

    def on_losses(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._due("nan_loss", step):
            return {key: value * float("nan") for key, value in losses.items()}
        return losses

    def after_step(self, step: int) -> None:
        where = f"faults.fail_at_step={step}"
        if self._due("exit", step) and self.claim():
            log.warning("%s: rank 0 exits abruptly now", where)
            os._exit(17)
        if self._due("error", step):
            raise RuntimeError(f"{where}: injected error")
        if self._due("user_error", step):
            raise UserError(f"{where}: injected user error")


def fault_hooks(cfg: Config, rank: int, run: RunDir) -> list[StepHook]:
    """[FaultInjection] when the config sets faults.fail_at_step, its one-time `exit` claimed in the run directory
    `run`; else []."""
    if not cfg.faults.fail_at_step:
        return []
    return [FaultInjection(cfg, rank, claim=lambda: run.claim_fault(cfg.faults.fail_at_step))]
