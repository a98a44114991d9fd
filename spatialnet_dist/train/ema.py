"""An exponential moving average (EMA) of the model's weights, what validation, evaluation and export use
when `optim.ema_decay` > 0 (timm's ModelEmaV3, with a warm-up).

After optimizer step `step` (1 on the first), every floating parameter p:
    decay_t = min(decay, (1 + step) / (10 + step))      # warm-up: 0.18, 0.25, 0.31, ... until it reaches decay
    ema     = decay_t * ema + (1 - decay_t) * p         # torch.lerp(ema, p, 1 - decay_t): exact where ema == p
and every buffer (and non-floating parameter) is copied. Without the warm-up a short run's average would be
mostly the initial weights (decay 0.9999 weighs them e^-1 after 10,000 steps). The averages are fp32 on the
model's device whatever the training precision. Keys are the model's state_dict keys, so the tensors load
into a model built like it; a tied weight (the caption head's embedding) is one tensor under both names.

It reads whole parameters: every rank computes the same average under ZeRO 0-2; ZeRO-3's ranks hold shards
(config/checks.py refuses the combination).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class WeightEma:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start the average at the model's weights now (a fresh run, a weights-only resume)."""
        self.tensors: dict[str, torch.Tensor] = {}
        first: dict[int, torch.Tensor] = {}  # id(model's tensor) -> its average, shared by tied names
        self._averaged, self._copied = [], []  # the names each tensor is updated under, once per tensor
        for name, value in model.state_dict(keep_vars=True).items():
            if id(value) in first:
                self.tensors[name] = first[id(value)]
                continue
            floating = value.is_floating_point()
            self.tensors[name] = first[id(value)] = value.detach().to(
                dtype=torch.float32 if floating else value.dtype, copy=True)
            (self._averaged if floating and isinstance(value, nn.Parameter) else self._copied).append(name)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step `step` (1 on the first): every rank, once per optimizer step."""
        decay = min(self.decay, (1 + step) / (10 + step))
        current = model.state_dict(keep_vars=True)
        for name in self._copied:
            self.tensors[name].copy_(current[name])
        # One lerp over all parameters (timm's foreach path); .float() copies only bf16 parameters.
        torch._foreach_lerp_([self.tensors[n] for n in self._averaged],
                             [current[n].detach().float() for n in self._averaged], 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages on the CPU, one independent tensor per name (safetensors refuses shared storage)."""
        return {name: value.to("cpu", copy=True) for name, value in self.tensors.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors.keys() != self.tensors.keys():
            raise ValueError(f"EMA tensors do not match the model: {sorted(tensors.keys() ^ self.tensors.keys())[:3]}")
        for name, value in self.tensors.items():
            value.copy_(tensors[name])

    def averaged_model(self, build: Callable[[], nn.Module]) -> nn.Module:
        """A model from `build` (fp32, on the averages' device) carrying the averaged weights."""
        model = build().to(next(iter(self.tensors.values())).device)
        model.load_state_dict(self.tensors)
        return model
