"""The weights' moving average (train/ema.py) on a module of a few numbers: its warm-up formula step by step,
buffers copied, tied weights one average, fp32 whatever the model's dtype. The Trainer's use of it (once per
optimizer step, checkpoints, resume, evaluation) is tests/test_trainer.py's."""

from __future__ import annotations

import torch
from torch import nn

from spatialnet_dist.train.ema import WeightEma


class Tiny(nn.Module):
    """Two weights (the second never changes), the same Parameter under a second name, two buffers."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.0, 4.0]))
        self.tied = self.weight
        self.register_buffer("stat", torch.zeros(1))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def set(self, first: float) -> None:
        with torch.no_grad():
            self.weight[0] = first
            self.stat.fill_(first * 10)
            self.count += 1


def test_update_follows_the_warmed_up_formula():
    """decay 0.25: decay_t = min(0.25, (1 + t) / (10 + t)) = 2/11, then 3/12 = 0.25, then the cap 0.25."""
    model = Tiny()
    ema = WeightEma(model, 0.25)
    expected = [9 / 11,  # 2/11 x 0 + 9/11 x 1
                9 / 11 / 4 + 0.75 * 2,  # = 75/44
                75 / 44 / 4 + 0.75 * 3]  # = 471/176
    for step, value in enumerate(expected, start=1):
        model.set(float(step))
        ema.update(model, step)
        torch.testing.assert_close(ema.tensors["weight"], torch.tensor([value, 4.0]))
        assert ema.tensors["weight"][1].item() == 4.0  # a weight that does not move stays exactly itself
        assert torch.equal(ema.tensors["stat"], model.stat) and torch.equal(ema.tensors["count"], model.count)
    assert ema.tensors["tied"] is ema.tensors["weight"]  # one average for a tied weight
    assert ema.tensors["count"].dtype == torch.long and ema.tensors["count"].item() == 3


def test_decay_zero_is_the_weights_themselves_and_the_average_is_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).to(torch.bfloat16)
    ema = WeightEma(model, 0.0)
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 4, dtype=torch.bfloat16))  # moves BatchNorm's running statistics
        ema.update(model, step)
    for name, value in model.state_dict().items():
        assert ema.tensors[name].dtype == (torch.float32 if value.is_floating_point() else value.dtype)
        assert torch.equal(ema.tensors[name], value.to(ema.tensors[name].dtype))


def test_state_dict_round_trip_and_the_averaged_model():
    model = Tiny()
    ema = WeightEma(model, 0.9)
    model.set(1.0)
    ema.update(model, 1)
    saved = ema.state_dict()
    assert saved["tied"] is not saved["weight"] and torch.equal(saved["tied"], saved["weight"])  # independent copies
    fresh = WeightEma(Tiny(), 0.9)
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.tensors[k], ema.tensors[k]) for k in saved)
    assert fresh.tensors["tied"] is fresh.tensors["weight"]
    averaged = ema.averaged_model(Tiny)
    assert all(torch.equal(v, ema.tensors[k]) for k, v in averaged.state_dict().items())
    assert not torch.equal(averaged.weight, model.weight)  # 9/11, not the raw 1
