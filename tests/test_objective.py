"""The weighted multi-task objective against losses computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from spatialnet_dist.config import LossConfig, ModelConfig
from spatialnet_dist.model.spatialnet import assemble_model
from spatialnet_dist.networks.heads import VocabSizes
from spatialnet_dist.objective import MultiTaskObjective
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS
from spatialnet_dist.text import BOS_ID, EOS_ID, PAD_ID


def outputs_and_batch():
    """Random head outputs with their targets: 2 images per task, 5 words, 4 answers, 3 classes."""
    g = torch.Generator().manual_seed(0)
    outputs = {
        "captioning": {"logits": torch.randn(2, 4, 5, generator=g, requires_grad=True)},
        "vqa": {"logits": torch.randn(2, 4, generator=g, requires_grad=True)},
        "classification": {"logits": torch.randn(2, 3, generator=g, requires_grad=True)},
        "regression": {"count_log1p": torch.tensor([0.5, 2.0], requires_grad=True)},
    }
    batch = {
        "captioning": {"tokens": torch.tensor([[BOS_ID, 4, 3, EOS_ID, PAD_ID], [BOS_ID, 4, EOS_ID, PAD_ID, PAD_ID]])},
        "vqa": {"answer": torch.tensor([1, -1])},  # the second answer is outside the vocabulary
        "classification": {"label": torch.tensor([2, 0])},
        "regression": {"count": torch.tensor([1.0, 9.0])},
    }
    return outputs, batch


def nll(logits: torch.Tensor, target: int) -> float:
    return -torch.log_softmax(logits.detach(), -1)[target].item()


def test_loss_is_the_hand_computed_weighted_sum():
    weights = {"captioning": 0.5, "vqa": 2.0, "classification": 1.5, "regression": 3.0}
    eps = 0.1
    outputs, batch = outputs_and_batch()
    losses = MultiTaskObjective(LossConfig(weights=weights, label_smoothing=eps))(outputs, batch)

    cap = outputs["captioning"]["logits"]
    caption_terms = [nll(cap[0, 0], 4), nll(cap[0, 1], 3), nll(cap[0, 2], EOS_ID), nll(cap[1, 0], 4), nll(cap[1, 1], EOS_ID)]
    expected = {"captioning": sum(caption_terms) / 5, "vqa": nll(outputs["vqa"]["logits"][0], 1)}
    cls = outputs["classification"]["logits"].detach()
    smoothed = [(1 - eps) * nll(cls[i], y) + eps * sum(nll(cls[i], k) for k in range(3)) / 3 for i, y in enumerate([2, 0])]
    expected["classification"] = sum(smoothed) / 2
    expected["regression"] = ((0.5 - math.log(2.0)) ** 2 + (2.0 - math.log(10.0)) ** 2) / 2
    for task in TASKS:
        assert losses[f"{task}_loss"].item() == pytest.approx(expected[task], rel=1e-5)
    assert losses["loss"].item() == pytest.approx(sum(weights[t] * expected[t] for t in TASKS), rel=1e-5)
    assert losses["regression_mae"].item() == pytest.approx((abs(math.expm1(0.5) - 1) + abs(math.expm1(2.0) - 9)) / 2)
    losses["loss"].backward()
    assert all(o[k].grad is not None for o in outputs.values() for k in o)


def test_an_absent_task_contributes_nothing():
    outputs, batch = outputs_and_batch()
    objective = MultiTaskObjective(LossConfig())
    full = objective(outputs, batch)
    del outputs["vqa"], batch["vqa"]
    partial = objective(outputs, batch)
    assert "vqa_loss" not in partial
    assert partial["loss"].item() == pytest.approx(full["loss"].item() - full["vqa_loss"].item(), rel=1e-6)
    partial["loss"].backward()


def test_all_targets_ignored_gives_a_zero_loss_that_backprops():
    outputs, batch = outputs_and_batch()
    batch["vqa"]["answer"] = torch.tensor([-1, -1])
    batch["classification"]["label"] = torch.tensor([-1, -1])
    batch["captioning"]["tokens"][:, 1:] = PAD_ID
    losses = MultiTaskObjective(LossConfig())({t: outputs[t] for t in ("vqa", "classification", "captioning")}, batch)
    assert losses["loss"].item() == 0.0
    losses["loss"].backward()
    assert outputs["vqa"]["logits"].grad is not None
    assert torch.equal(outputs["vqa"]["logits"].grad, torch.zeros(2, 4))


def test_explicit_l2_term_penalises_the_decayed_parameters():
    torch.manual_seed(0)
    model = assemble_model(ModelConfig(image_size=32), ["classification"], VocabSizes(words=8, answers=2, classes=3))
    batch = {"classification": {"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([0, 2])}}
    outputs = model(batch)
    plain = MultiTaskObjective(LossConfig())(outputs, batch, model)
    l2 = MultiTaskObjective(LossConfig(regularization="l2", l2=1e-3))(outputs, batch, model)
    squares = sum(p.detach().pow(2).sum().item() for p in model.decayed_parameters())
    assert l2["l2_loss"].item() == pytest.approx(1e-3 * squares, rel=1e-5)
    assert l2["loss"].item() == pytest.approx(plain["loss"].item() + 1e-3 * squares, rel=1e-5)
    fc = model.heads["classification"].fc
    plain["loss"].backward(retain_graph=True)
    plain_grads = (fc.weight.grad.clone(), fc.bias.grad.clone())
    model.zero_grad()
    l2["loss"].backward()
    torch.testing.assert_close(fc.weight.grad, plain_grads[0] + 2e-3 * fc.weight.detach())  # d/dw of l2 * w^2
    torch.testing.assert_close(fc.bias.grad, plain_grads[1])  # biases are not penalised
    with pytest.raises(ValueError, match="needs the model"):
        MultiTaskObjective(LossConfig(regularization="l2", l2=1e-3))(outputs, batch)
