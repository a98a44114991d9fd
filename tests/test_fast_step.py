"""The training step near the hardware: train.compile gives the eager step's losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import as_torchrun_worker, spawn_ranks

from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS
from tests.test_model import SIZES, make_batch


def _losses_worker(rank: int, port: int, out: str, settings: dict[str, list[str]]):
    """One rank under gloo, ZeRO-0: three steps of a tiny model on one batch per setting (config overrides),
    the same weights each time -> the losses and the parameter dtype of each."""
    as_torchrun_worker(0, 1, port)
    from spatialnet_dist import config as config_mod
    from spatialnet_dist import engine as ds
    from spatialnet_dist.model.spatialnet import assemble_model
    from spatialnet_dist.objective import MultiTaskObjective

    torch.set_num_threads(1)
    ds.init_distributed(False)
    results = {}
    for name, overrides in settings.items():
        cfg = config_mod.load(None, ["model.image_size=32", "model.caption_max_len=10", "model.question_max_len=8",
                                     "train.zero_stage=0", "optim.warmup_steps=0", "optim.lr=1e-3",
                                     "train.max_steps=10", *overrides])
        torch.manual_seed(0)
        engine = ds.create_engine(cfg, assemble_model(cfg.model, list(TASKS), SIZES), 1)
        objective = MultiTaskObjective(cfg.loss)
        batch = make_batch(n=3)
        losses = []
        for _ in range(3):
            loss = objective(engine(batch), batch, engine.module)["loss"]
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        results[name] = {"losses": losses, "dtype": str(next(engine.module.parameters()).dtype)}
    Path(out, "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def step_losses(tmp_path_factory, free_ports) -> dict:
    """The losses and parameter dtype of the eager fp32 step, the compiled one and bf16 autocast, from one
    spawned process: it imports DeepSpeed and builds the model once for the tests of both."""

    out = tmp_path_factory.mktemp("step_losses")
    # In this order: eager then compiled, as when the compiled test ran alone; autocast last.
    settings = {"fp32": ["train.compile=false", "train.precision=fp32"],
                "compiled": ["train.compile=true", "train.precision=fp32"],
                "autocast": ["train.compile=false", "train.precision=bf16-autocast"]}
    spawn_ranks(_losses_worker, args=(free_ports(1)[0], str(out), settings), nprocs=1)
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow  # inductor compiles forward and backward with a C++ compiler: minutes on 2 loaded cores
def test_compiled_step_gives_the_eager_losses(step_losses):
    """Same weights, batch and optimizer: the compiled model's losses over three steps (so its backward
    and the updates it feeds count too) match the eager ones to float tolerance."""
    eager, compiled = step_losses["fp32"]["losses"], step_losses["compiled"]["losses"]
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    assert eager[0] != eager[-1]  # the steps trained


@pytest.mark.slow  # two DeepSpeed engines in a spawned process: ~15 s (shared with the compiled test's)
def test_bf16_autocast_keeps_fp32_weights_and_the_fp32_losses(step_losses):
    """train.precision=bf16-autocast (DeepSpeed's torch_autocast, the GPU default): the weights and the
    optimizer stay fp32 and the losses follow the fp32 run's within bf16 matmul error."""
    assert step_losses["autocast"]["dtype"] == "torch.float32"
    fp32, autocast = step_losses["fp32"]["losses"], step_losses["autocast"]["losses"]
    torch.testing.assert_close(torch.tensor(autocast), torch.tensor(fp32), rtol=3e-2, atol=3e-2)
    assert autocast != fp32  # bf16 matmuls did run


def test_every_attention_goes_through_sdpa(monkeypatch):
    """Encoder blocks (timm fused_attn), caption decoder, question encoder and VQA fusion: each attention
    module of a training forward calls F.scaled_dot_product_attention (flash / memory-efficient kernels on
    GPU) once, none computes softmax(QK^T)V by hand."""
    import torch.nn.functional as F
    from timm.models.vision_transformer import Attention

    from tests.test_model import tiny_model

    model = tiny_model()
    model.train()
    attentions = [m for m in model.modules() if isinstance(m, (Attention, torch.nn.MultiheadAttention))]
    assert all(m.fused_attn for m in attentions if isinstance(m, Attention))
    encoder_blocks = len(model.encoder.blocks)
    assert encoder_blocks and len(attentions) > encoder_blocks  # the heads' attention counted too

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model(make_batch(n=3))
    assert len(calls) == len(attentions)
