"""Pretrain, then fine-tune, on a real corpus: `mae` on its training images (labels unread), then the real-corpus
recipe from that checkpoint, against the same recipe from scratch.

    python bench/pretraining.py DATA_DIR --json [--pretrain-config configs/pretrain.yaml] [--config configs/ucm.yaml]
                                [--pretrain-seeds 0] [--seeds 0 1] [--scratch] [--pretrain-set k=v] [--set k=v]

DATA_DIR and the store are bench/real_corpus.py's (converted once, reused). Each pretraining seed runs
`ray_job.py --config PRETRAIN` as a user would; its RESULT checkpoint (the best by eval.keep_best, k-NN
accuracy in configs/pretrain.yaml) seeds `model.pretrained` of each fine-tuning seed, which bench/real_corpus.py
runs and scores (test; val beside). `--scratch` runs the same fine-tuning seeds without it.

Prints {"pretraining": [per seed: "wall_s" (the job's), "steps", "best_step", "checkpoint", "knn_curve" and
"mae_loss_curve" ([step, value] at each validation)], "fine_tuned": {real_corpus's summary, per pretraining
seed's runs}, "scratch": the same (with --scratch), "gain": fine_tuned - scratch on test}. Exits 2 with one line
naming the path when the data is absent. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_corpus import KEYS, ROOT, emit, prepare, run_job, run_seed, summary  # noqa: E402


def pretrain(config: str, store: Path, seed: int, overrides: list[str]) -> dict:
    result, code, wall = run_job(config, store, seed, overrides, "pretrain")
    if code or not result.get("checkpoint"):
        raise SystemExit(f"pretraining: seed {seed}: the job failed ({result.get('error') or code})")
    metrics = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "wall_s": round(wall, 1), "steps": result["final_step"], "best_step": result.get("best_step"),
            "checkpoint": result["checkpoint"], "run_dir": result["run_dir"],
            "knn_curve": [[m["step"], round(m["val/knn_accuracy"], 4)] for m in metrics if "val/knn_accuracy" in m],
            "mae_loss_curve": [[m["step"], round(m["val/mae_loss"], 4)] for m in metrics if "val/mae_loss" in m]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="UCM-captions release: dataset.json + imgs/")
    ap.add_argument("--pretrain-config", default="configs/pretrain.yaml")
    ap.add_argument("--config", default="configs/ucm.yaml", help="the fine-tuning (and scratch) recipe")
    ap.add_argument("--tags", type=Path, default=None, help="the UC Merced multi-label table (LandUse_Multilabeled.txt)")
    ap.add_argument("--store", type=Path, default=ROOT / "runs" / "real-corpus" / "shards")
    ap.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds, per pretraining")
    ap.add_argument("--scratch", action="store_true", help="also the fine-tuning seeds from scratch")
    ap.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not prepare(a.data, a.tags, a.store, "pretraining"):
        return 2
    store = a.store.resolve()
    pretrained = [pretrain(a.pretrain_config, store, seed, a.pretrain_overrides) for seed in a.pretrain_seeds]
    fine_tuned = [run_seed(a.config, store, seed, [f"model.pretrained={p['checkpoint']}", *a.overrides],
                           f"finetune-p{p['seed']}") for p in pretrained for seed in a.seeds]
    out = {"pretraining": pretrained, "fine_tuned": summary(fine_tuned), "config": a.config,
           "pretrain_config": a.pretrain_config, "overrides": a.overrides, "pretrain_overrides": a.pretrain_overrides}
    if a.scratch:
        out["scratch"] = summary([run_seed(a.config, store, seed, a.overrides, "scratch") for seed in a.seeds])
        out["gain"] = {k: round(out["fine_tuned"][k] - out["scratch"][k], 4)
                       for k in KEYS if k in out["fine_tuned"] and k in out["scratch"]}
    emit(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
