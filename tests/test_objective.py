"""The weighted multi-task objective against losses computed by hand; the learned task balance (loss.balance)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from spatialnet_dist.config import LossConfig, ModelConfig
from spatialnet_dist.model.spatialnet import assemble_model
from spatialnet_dist.networks.heads import VocabSizes
from spatialnet_dist.objective import MultiTaskObjective, TaskBalance
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


WEIGHTS = {"captioning": 0.5, "vqa": 2.0, "classification": 1.5, "regression": 3.0}


def balanced(log_variances: list[float]) -> SimpleNamespace:
    """What the objective reads of a model built with balance=True: its `loss_balance`, s_t as given."""
    balance = TaskBalance(list(TASKS))
    with torch.no_grad():
        balance.log_variances.copy_(torch.tensor(log_variances))
    return SimpleNamespace(loss_balance=balance)


def test_fixed_balance_is_the_weighted_sum_in_task_order_bit_for_bit_and_ignores_a_models_balance():
    outputs, batch = outputs_and_batch()
    cfg = LossConfig(weights=WEIGHTS)
    plain = MultiTaskObjective(cfg)(outputs, batch)
    with_model = MultiTaskObjective(cfg)(outputs, batch, balanced([0.5, -1.0, 2.0, 0.3]))
    by_hand = None
    for t in TASKS:
        by_hand = WEIGHTS[t] * plain[f"{t}_loss"] if by_hand is None else by_hand + WEIGHTS[t] * plain[f"{t}_loss"]
    assert torch.equal(plain["loss"], by_hand) and torch.equal(with_model["loss"], by_hand)
    assert not any(k.startswith("balance/") for k in with_model)
    assert MultiTaskObjective(cfg).report_keys(["vqa", "regression"]) == ["loss", "vqa_loss", "regression_loss"]


def test_uncertainty_at_zero_log_variances_is_the_fixed_objective():
    outputs, batch = outputs_and_batch()
    fixed = MultiTaskObjective(LossConfig(weights=WEIGHTS))(outputs, batch)
    learned = MultiTaskObjective(LossConfig(weights=WEIGHTS, balance="uncertainty"))(outputs, batch, balanced([0.0] * 4))
    assert torch.equal(learned["loss"], fixed["loss"])  # lambda_t * (1 * L_t + 0), summed in the same order
    assert all(learned[f"balance/{t}"].item() == 1.0 for t in TASKS)


def test_uncertainty_loss_and_its_gradients_are_the_formula():
    """L = sum_t lambda_t * (exp(-s_t) L_t + s_t): dL/ds_t = lambda_t * (1 - exp(-s_t) L_t), and a head's
    gradient is the fixed objective's scaled by exp(-s_t)."""
    s = [0.5, -1.0, 2.0, 0.3]
    outputs, batch = outputs_and_batch()
    model = balanced(s)
    learned = MultiTaskObjective(LossConfig(weights=WEIGHTS, balance="uncertainty"))(outputs, batch, model)
    task_loss = {t: learned[f"{t}_loss"].item() for t in TASKS}
    expected = sum(WEIGHTS[t] * (math.exp(-s_t) * task_loss[t] + s_t) for t, s_t in zip(TASKS, s))
    assert learned["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert [learned[f"balance/{t}"].item() for t in TASKS] == pytest.approx([math.exp(-s_t) for s_t in s], rel=1e-6)
    learned["loss"].backward()
    grad = model.loss_balance.log_variances.grad
    assert grad.tolist() == pytest.approx([WEIGHTS[t] * (1 - math.exp(-s_t) * task_loss[t]) for t, s_t in zip(TASKS, s)],
                                          rel=1e-5)
    fixed_outputs, _ = outputs_and_batch()
    MultiTaskObjective(LossConfig(weights=WEIGHTS))(fixed_outputs, batch)["loss"].backward()
    torch.testing.assert_close(outputs["vqa"]["logits"].grad, math.exp(1.0) * fixed_outputs["vqa"]["logits"].grad)


def test_uncertainty_with_an_absent_task_leaves_its_log_variance_alone_and_still_reports_it():
    outputs, batch = outputs_and_batch()
    del outputs["vqa"], batch["vqa"]
    model = balanced([0.0, 0.7, 0.0, 0.0])
    objective = MultiTaskObjective(LossConfig(balance="uncertainty"))
    losses = objective(outputs, batch, model)
    losses["loss"].backward()
    assert model.loss_balance.log_variances.grad[TASKS.index("vqa")].item() == 0.0
    assert losses["balance/vqa"].item() == pytest.approx(math.exp(-0.7))
    assert objective.report_keys(["vqa"]) == ["loss", "vqa_loss", "balance/vqa"]


def test_uncertainty_without_a_model_weighs_by_the_fixed_weights_and_a_model_without_balance_is_an_error():
    outputs, batch = outputs_and_batch()
    cfg = LossConfig(weights=WEIGHTS, balance="uncertainty")
    validation = MultiTaskObjective(cfg)(outputs, batch)  # what Trainer.validate calls
    assert torch.equal(validation["loss"], MultiTaskObjective(LossConfig(weights=WEIGHTS))(outputs, batch)["loss"])
    model = assemble_model(ModelConfig(image_size=32), ["vqa"], VocabSizes(words=8, answers=4, classes=3))
    with pytest.raises(ValueError, match="loss.balance=uncertainty needs a model built with its task balance"):
        MultiTaskObjective(cfg)(outputs, batch, model)


def test_optimising_the_log_variances_moves_each_weight_to_one_over_its_loss():
    """d/ds (exp(-s) L + s) = 1 - exp(-s) L: one step lowers the weight exp(-s) of a loss above 1 and raises
    that of a loss below 1; the optimum is exp(-s) = 1 / L."""
    balance = TaskBalance(["vqa", "classification"])
    task_losses = {"vqa": torch.tensor(4.0), "classification": torch.tensor(0.25)}
    optimizer = torch.optim.SGD(balance.parameters(), lr=0.05)
    first = None
    for _ in range(400):
        optimizer.zero_grad()
        total, weights = balance(task_losses, {"vqa": 1.0, "classification": 1.0})
        total.backward()
        optimizer.step()
        first = first or {t: math.exp(-balance.log_variances[i].item()) for i, t in enumerate(balance.tasks)}
    assert first["vqa"] < 1.0 < first["classification"]
    final = {t: math.exp(-balance.log_variances[i].item()) for i, t in enumerate(balance.tasks)}
    assert final == pytest.approx({"vqa": 0.25, "classification": 4.0}, rel=1e-3)


def test_the_model_owns_the_balance_only_when_asked_and_never_decays_it():
    sizes = VocabSizes(words=8, answers=2, classes=3)
    assert not hasattr(assemble_model(ModelConfig(image_size=32), ["vqa", "regression"], sizes), "loss_balance")
    model = assemble_model(ModelConfig(image_size=32), ["vqa", "regression"], sizes, balance=True)
    assert model.loss_balance.tasks == ["vqa", "regression"]
    assert torch.equal(model.state_dict()["loss_balance.log_variances"], torch.zeros(2))
    assert "loss_balance.log_variances" in model.no_weight_decay_names()
    assert not any(p is model.loss_balance.log_variances for p in model.decayed_parameters())
