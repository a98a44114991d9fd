"""What do the task heads cost? SpatialNet-ViT training steps against the bare timm encoder.

Per preset, samples (images) per second of a full training step (forward, backward, AdamW step):
  spatialnet_samples_per_s     SpatialNet-ViT with all four heads on a multi-task batch of `batch`
                               images split evenly over the tasks, through the weighted objective
  bare_encoder_samples_per_s   the same-sized timm ViT alone on the same images, loss = mean(pooled^2)
  ratio                        spatialnet / bare: the share of the bare speed the heads leave
  mae_samples_per_s            SpatialNet-ViT with the `mae` head alone (tasks/mae.py, its defaults: the
                               encoder sees a quarter of the patch tokens, a 2-block decoder all of them)
  classification_samples_per_s with the classification head alone, every token encoded
  mae_vs_classification        mae / classification: what masking saves a pretraining step
Same threads, batch and image size for every model; one warm-up step each is excluded, and the timed steps
alternate between the models. Nothing is asserted.

    python bench/model_step.py [--presets tiny,paper] [--batch 8] [--image-size 256] [--threads 2] [--steps 1]
                               [--stem patch|conv] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from spatialnet_dist import config as config_mod  # noqa: E402
from spatialnet_dist import tasks as registry  # noqa: E402
from spatialnet_dist.config import LossConfig, ModelConfig  # noqa: E402
from spatialnet_dist.model.spatialnet import assemble_model  # noqa: E402
from spatialnet_dist.model.summary import REPRESENTATIVE_SIZES  # noqa: E402
from spatialnet_dist.networks.encoder import build_encoder  # noqa: E402
from spatialnet_dist.networks.presets import get_preset  # noqa: E402
from spatialnet_dist.objective import MultiTaskObjective  # noqa: E402
from spatialnet_dist.tasks import DEFAULT_TASKS as TASKS
from spatialnet_dist.text import BOS_ID, EOS_ID  # noqa: E402


def multitask_batch(images: torch.Tensor, cfg: ModelConfig) -> dict:
    """`images` split evenly over the four tasks, with full-length captions and questions."""
    g = torch.Generator().manual_seed(0)
    words = REPRESENTATIVE_SIZES.words
    batch = {}
    for task, part in zip(TASKS, images.tensor_split(len(TASKS))):
        n = len(part)
        sub = {"image": part}
        if task == "captioning":
            tokens = torch.randint(4, words, (n, cfg.caption_max_len), generator=g)
            tokens[:, 0], tokens[:, -1] = BOS_ID, EOS_ID
            sub["tokens"] = tokens
        if task in ("vqa", "regression"):  # one question per image
            sub["question"] = torch.randint(4, words, (n, cfg.question_max_len), generator=g)
        if task != "classification":  # one caption (question) per image
            sub["image_index"] = torch.arange(n)
        if task == "vqa":
            sub["answer"] = torch.randint(0, REPRESENTATIVE_SIZES.answers, (n,), generator=g)
        if task == "classification":
            sub["label"] = torch.randint(0, REPRESENTATIVE_SIZES.classes, (n,), generator=g)
        if task == "regression":
            sub["count"] = torch.randint(0, 50, (n,), generator=g).float()
        batch[task] = sub
    return batch


def train_step(model: torch.nn.Module, loss_fn):
    """-> a function that runs one forward + backward + AdamW step of `model`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


def spatialnet_step(cfg: ModelConfig, images: torch.Tensor):
    model = assemble_model(cfg, list(TASKS), REPRESENTATIVE_SIZES)
    model.set_grad_checkpointing(False)  # measure both models the same way
    objective = MultiTaskObjective(LossConfig())
    batch = multitask_batch(images, cfg)
    return train_step(model, lambda: objective(model(batch), batch, model)["loss"])


def one_task_step(cfg: ModelConfig, images: torch.Tensor, task: str):
    """SpatialNet-ViT with `task`'s head alone (every key at its default) on all of `images`."""
    model = assemble_model(cfg, [task], REPRESENTATIVE_SIZES)
    model.set_grad_checkpointing(False)
    job_cfg = dataclasses.replace(config_mod.load(None, []), model=cfg)  # what the task's loss reads (mae: the patch)
    objective = MultiTaskObjective(LossConfig(), {task: registry.get(task).loss_state(job_cfg, None)})
    sub = {"image": images, "image_id": [str(i) for i in range(len(images))]}
    if task == "classification":
        sub["label"] = torch.randint(0, REPRESENTATIVE_SIZES.classes, (len(images),), generator=torch.Generator().manual_seed(0))
    batch = {task: sub}
    return train_step(model, lambda: objective(model(batch), batch, model)["loss"])


def bare_encoder_step(cfg: ModelConfig, images: torch.Tensor):
    encoder = build_encoder(get_preset(cfg.preset), cfg.image_size)
    return train_step(encoder, lambda: encoder.encode(images)[1].pow(2).mean())


def bench_preset(name: str, batch_size: int, image_size: int, steps: int, stem: str) -> dict:
    cfg = ModelConfig(preset=name, image_size=image_size, stem=stem)
    torch.manual_seed(0)
    images = torch.randn(batch_size, cfg.in_chans, image_size, image_size)
    runs = {"spatialnet": spatialnet_step(cfg, images), "bare_encoder": bare_encoder_step(cfg, images),
            "mae": one_task_step(cfg, images, "mae"), "classification": one_task_step(cfg, images, "classification")}
    for step in runs.values():
        step()  # warm-up: allocator, kernel selection, optimizer state
    elapsed = dict.fromkeys(runs, 0.0)
    for _ in range(steps):  # alternate the models so that all see the same load on a shared machine
        for key, step in runs.items():
            start = time.perf_counter()
            step()
            elapsed[key] += time.perf_counter() - start
    rate = {key: batch_size * steps / seconds for key, seconds in elapsed.items()}
    return {
        "spatialnet_samples_per_s": round(rate["spatialnet"], 3),
        "bare_encoder_samples_per_s": round(rate["bare_encoder"], 3),
        "ratio": round(rate["spatialnet"] / rate["bare_encoder"], 3),
        "mae_samples_per_s": round(rate["mae"], 3),
        "classification_samples_per_s": round(rate["classification"], 3),
        "mae_vs_classification": round(rate["mae"] / rate["classification"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,paper", help="comma-separated preset names")
    p.add_argument("--batch", type=int, default=8, help="images per step, split over the four tasks (>= 4)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stem", default=ModelConfig.stem, choices=["patch", "conv"], help="model.stem")
    p.add_argument("--steps", type=int, default=1, help="timed steps per model")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    a = p.parse_args()
    if a.batch < len(TASKS):
        p.error(f"--batch must be at least {len(TASKS)}: one image per task")
    torch.set_num_threads(a.threads)
    result: dict = {}
    for name in a.presets.split(","):
        result[name] = bench_preset(name, a.batch, a.image_size, a.steps, a.stem)
        if not a.json:
            print(f"{name}: {result[name]}", file=sys.stderr)
    result |= {"threads": a.threads, "batch": a.batch, "image_size": a.image_size, "stem": a.stem}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
