"""Training jobs wired to evaluation: the one module above both train/ and evaluate/.

train/ and evaluate/ never import each other. The Trainer receives its validation as a callable (as it
receives its Reporter) and the Ray worker its end-of-run evaluation; this module hands evaluate/'s in:

  python ray_job.py, spatialnet train             -> train_with_ray (train/launch.py, train/worker.py)
  torchrun --nproc-per-node 8 -m spatialnet_dist.jobs --config ...
                                                  -> train_with_torchrun (train/local.py, no Ray)
"""

from __future__ import annotations

import os
import sys

from spatialnet_dist import tasks as registry
from spatialnet_dist.evaluate.run import ValidationPass, evaluate_model
from spatialnet_dist.train import launch


# Ray's result carries these headline test metrics (the full set is in <run dir>/eval/metrics.json).
def evaluate_at_end(model, cfg, vocabs, rank: int, world_size: int, run, tracker) -> dict:
    """train.worker's Evaluation: eval.split into <run dir>/eval/ -> the headline metrics on rank 0, {} elsewhere."""
    metrics = evaluate_model(model, cfg, vocabs, cfg.eval.split, rank, world_size, out_dir=run.path("eval"),
                             metrics_jsonl=run.path("metrics.jsonl"), tracker=tracker)
    # Each task's headline_keys (the full set is in eval/metrics.json).
    return {f"test/{task}_{key}": metrics[task][key] for task in metrics if task in registry.names()
            for key in registry.get(task).headline_keys if key in metrics[task]}


def ray_train_loop(config: dict) -> None:
    """Ray Train's per-worker function (module level: Ray pickles it by reference)."""
    from spatialnet_dist.train.worker import train_loop_per_worker  # imports Ray: only where Ray runs it

    train_loop_per_worker(config, ValidationPass, evaluate_at_end)


def train_with_ray(argv: list[str] | None = None) -> int:
    return launch.main(argv, ray_train_loop)


def train_with_torchrun(argv: list[str] | None = None) -> int:
    from spatialnet_dist.train import local  # imports DeepSpeed, which the Ray driver does without

    return local.main(argv, ValidationPass)


if __name__ == "__main__":
    code = train_with_torchrun()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: gloo/DeepSpeed atexit hooks can abort a finished run
