"""What does answering K questions per image against one encoder pass buy? VQA training steps, fan-out
against one question per row.

Both arms train the same VQA model (encoder + VQA head, initialised alike) on the same Q = images x K
questions per step, forward + backward + AdamW step through the objective:
  vqa_questions_per_s_fanout   `images` images per step, each with K questions: one encoder pass per
                               image, the head gathers each question's image by image_index
  vqa_questions_per_s_single   the layout before fan-out: images x K rows, each its own copy of the image
                               and one question, so the encoder runs once per question
  ratio                        fanout / single
Questions are full length (model.question_max_len random words): a worst case for the head's share.
Same threads, image size and questions for both; one warm-up step each is excluded, and the timed steps
alternate between the arms (pooled over --repeats), so both see the same load on a shared machine.
One thread by default: on the 2-core reference machine, shared with other jobs, two OpenMP threads wait
on each other whenever another process holds a core (fan-out measured 10 questions/s with 2 threads
against 270 with 1 under a load average of 8). Nothing is asserted.

    python bench/vqa_fanout.py [--questions-per-image 16] [--images 4] [--preset tiny] [--threads 1] [--repeats 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from spatialnet_dist.config import LossConfig, ModelConfig  # noqa: E402
from spatialnet_dist.data.transforms import model_image_size  # noqa: E402
from spatialnet_dist.model.spatialnet import assemble_model  # noqa: E402
from spatialnet_dist.model.summary import REPRESENTATIVE_SIZES  # noqa: E402
from spatialnet_dist.objective import MultiTaskObjective  # noqa: E402


def vqa_batches(cfg: ModelConfig, image_size: int, images: int, per_image: int) -> tuple[dict, dict]:
    """-> (fan-out, single) vqa batches with the same images x per_image questions and answers."""
    g = torch.Generator().manual_seed(0)
    Q = images * per_image
    pixels = torch.randn(images, cfg.in_chans, image_size, image_size, generator=g)  # (B, C, S, S)
    index = torch.arange(images).repeat_interleave(per_image)  # (Q,)
    questions = {
        "question": torch.randint(4, REPRESENTATIVE_SIZES.words, (Q, cfg.question_max_len), generator=g),
        "answer": torch.randint(0, REPRESENTATIVE_SIZES.answers, (Q,), generator=g),
    }
    fan_out = {"vqa": {"image": pixels, "image_index": index, **questions}}
    single = {"vqa": {"image": pixels[index], "image_index": torch.arange(Q), **questions}}  # (Q, C, S, S)
    return fan_out, single


def train_step(cfg: ModelConfig, batch: dict):
    """-> a function that runs one forward + backward + AdamW step of a fresh VQA model on `batch`."""
    torch.manual_seed(0)
    model = assemble_model(cfg, ["vqa"], REPRESENTATIVE_SIZES)
    model.set_grad_checkpointing(False)  # measure both arms the same way
    objective = MultiTaskObjective(LossConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective(model(batch), batch, model)["loss"].backward()
        optimizer.step()

    return step


def bench(preset: str, image_size: int, images: int, per_image: int, repeats: int) -> dict:
    cfg = ModelConfig(preset=preset, image_size=image_size)
    size = model_image_size(cfg)
    fan_out, single = vqa_batches(cfg, size, images, per_image)
    runs = {"fanout": train_step(cfg, fan_out), "single": train_step(cfg, single)}
    for step in runs.values():
        step()  # warm-up: allocator, kernel selection, optimizer state
    elapsed = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for key, step in runs.items():
            start = time.perf_counter()
            step()
            elapsed[key] += time.perf_counter() - start
    questions = images * per_image
    rate = {key: questions * repeats / seconds for key, seconds in elapsed.items()}
    return {
        "questions_per_encoder_pass": per_image,
        "vqa_questions_per_s_fanout": round(rate["fanout"], 2),
        "vqa_questions_per_s_single": round(rate["single"], 2),
        "ratio": round(rate["fanout"] / rate["single"], 3),
        "questions_per_step": questions,
        "images_per_step": {"fanout": images, "single": questions},
        "preset": preset,
        "image_size": size,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions-per-image", type=int, default=16, help="K: questions answered per encoder pass")
    p.add_argument("--images", type=int, default=4, help="images per fan-out step (the single arm has images x K)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=0, help="0: the preset's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per arm")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    a = p.parse_args()
    if a.questions_per_image < 1 or a.images < 1 or a.repeats < 1:
        p.error("--questions-per-image, --images and --repeats must be >= 1")
    torch.set_num_threads(a.threads)
    result = bench(a.preset, a.image_size, a.images, a.questions_per_image, a.repeats) | {"threads": a.threads,
                                                                                          "repeats": a.repeats}
    if not a.json:
        print(f"{a.preset}: fan-out {result['vqa_questions_per_s_fanout']} questions/s, one question per row "
              f"{result['vqa_questions_per_s_single']}, ratio {result['ratio']}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
