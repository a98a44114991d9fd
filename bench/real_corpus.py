"""A recipe on a real corpus: convert (cached), train with the job, evaluate on val, report test.

    python bench/real_corpus.py DATA_DIR --json [--config configs/ucm.yaml] [--seeds 0 1] [--set key=value ...]

DATA_DIR is a UCM-captions release (dataset.json + imgs/, as ../shared/data/README.md rebuilds it);
`--tags FILE` (default: DATA_DIR/LandUse_Multilabeled.txt when present) merges the multi-label table.
The corpus is converted once into `--store` (default runs/real-corpus/shards) and reused while its manifest
is there. Each seed runs `ray_job.py --config FILE` as a user would (its wall time is the job's, conversion
excluded), then `spatialnet eval run` of the run's checkpoint on the val split: tune on val, report test.

Prints {"accuracy", "CIDEr", "BLEU-4", "mAP_macro" (test, mean over seeds), "val": {the same on val},
"spread": {key: [min, max] over seeds, test}, "runs": [per seed], "wall_s" (mean job time), "steps", "config"}.
Exits 2 with one line naming the path when the data is absent. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = "ucm-captions"
KEYS = {"accuracy": ("classification", "accuracy"), "CIDEr": ("captioning", "CIDEr"),
        "BLEU-4": ("captioning", "BLEU-4"), "mAP_macro": ("tagging", "mAP_macro")}


def headline(metrics: dict) -> dict:
    """{task: scores} (RESULT's eval, or eval/metrics.json) -> the bench's flat keys present in it."""
    return {key: metrics[task][name] for key, (task, name) in KEYS.items() if name in metrics.get(task, {})}


def convert(data: Path, tags: Path | None, store: Path) -> None:
    if (store / CORPUS / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "spatialnet_dist.cli", "shards", "convert", "ucm-captions", str(data), str(store)]
    subprocess.run(cmd + (["--tags", str(tags)] if tags else []), check=True, stdout=sys.stderr)


def prepare(data: Path, tags: Path | None, store: Path, bench: str) -> bool:
    """Convert the corpus into `store` unless it is there -> True; False after one line naming what is absent."""
    for path in (data / "dataset.json", data / "imgs"):
        if not path.exists():
            print(f"{bench}: {path}: not found (rebuild the corpus as ../shared/data/README.md says)", file=sys.stderr)
            return False
    if tags and not tags.is_file():
        print(f"{bench}: {tags}: not found", file=sys.stderr)
        return False
    tags = tags or (data / "LandUse_Multilabeled.txt")
    convert(data, tags if tags.is_file() else None, store)
    return True


def run_job(config: str, store: Path, seed: int, overrides: list[str], name: str) -> tuple[dict, int, float]:
    """`ray_job.py --config config` on `store` as a user runs it -> (its RESULT, its exit status, its wall s)."""
    sets = [f"data.root={store}", f"run.seed={seed}", f"run.name={name}-s{seed}-{int(time.time())}", *overrides]
    cmd = [sys.executable, str(ROOT / "ray_job.py"), "--config", config] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    job = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    lines = [line for line in job.stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[-1].removeprefix("RESULT ")) if lines else {}), job.returncode, wall


def run_seed(config: str, store: Path, seed: int, overrides: list[str], name: str) -> dict:
    result, code, wall = run_job(config, store, seed, overrides, name)
    if code or not result.get("eval"):
        raise SystemExit(f"real_corpus: seed {seed}: the job failed ({result.get('error') or code})")
    val_dir = Path(result["run_dir"]) / "eval-val"
    subprocess.run([sys.executable, "-m", "spatialnet_dist.cli", "eval", "run", result["checkpoint"], "--data",
                    str(store), "--split", "val", "--out", str(val_dir)], cwd=ROOT, check=True, stdout=sys.stderr)
    val = json.loads((val_dir / "metrics.json").read_text())
    return {"seed": seed, "test": headline(result["eval"]), "val": headline(val), "job_wall_s": round(wall, 1),
            "result_wall_s": result.get("wall_s"), "steps": result["final_step"], "run_dir": result["run_dir"],
            "best_step": result.get("best_step")}


def mean_of(runs: list[dict], part: str) -> dict:
    keys = [k for k in KEYS if all(k in r[part] for r in runs)]
    return {k: round(statistics.fmean(r[part][k] for r in runs), 4) for k in keys}


def summary(runs: list[dict]) -> dict:
    """run_seed's per-seed results -> the test means, "val", "spread", "runs", "wall_s", "steps"."""
    test = mean_of(runs, "test")
    return {**test, "val": mean_of(runs, "val"),
            "spread": {k: [min(r["test"][k] for r in runs), max(r["test"][k] for r in runs)] for k in test},
            "runs": runs, "wall_s": round(statistics.fmean(r["job_wall_s"] for r in runs), 1),
            "steps": runs[0]["steps"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="UCM-captions release: dataset.json + imgs/")
    ap.add_argument("--config", default="configs/ucm.yaml")
    ap.add_argument("--tags", type=Path, default=None, help="the UC Merced multi-label table (LandUse_Multilabeled.txt)")
    ap.add_argument("--store", type=Path, default=ROOT / "runs" / "real-corpus" / "shards")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default="real", help="run name prefix under the config's run.storage")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if not prepare(a.data, a.tags, a.store, "real_corpus"):
        return 2
    runs = [run_seed(a.config, a.store.resolve(), seed, a.overrides, a.name) for seed in a.seeds]
    emit({**summary(runs), "config": a.config, "overrides": a.overrides}, a.json)
    return 0


def emit(out: dict, as_json: bool) -> None:
    """The bench's output: one JSON object, or a line per key."""
    if as_json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:12} {value}")


if __name__ == "__main__":
    sys.exit(main())
