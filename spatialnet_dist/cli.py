"""The `spatialnet` command line. Thin: parse, call the package, print. Heavy imports stay lazy so
that `spatialnet --help` and bad-input errors answer at once.

Every command exits non-zero with one line on stderr for bad input (a `UserError`). A command whose
output is JSON (`--json`, `eval run`) prints it alone on stdout: what libraries print meanwhile goes to
stderr. Each command prints its own output to `args.stdout`.

One file of about 450 lines, not one per command group: each command is a few lines that call the package,
and `build_parser` reads as the whole command reference in one place; split by group, a command's
arguments would sit in one file and the reference in several.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import sys

from spatialnet_dist.errors import UserError

JSON_HELP = "print the result as one JSON object, alone on stdout (library messages go to stderr)"


def _version() -> str:
    try:
        return importlib.metadata.version("spatialnet-dist")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run `make setup`)"


def _print_json(obj, stdout) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False), file=stdout)


@contextlib.contextmanager
def _library_output_to_stderr():
    """-> a stream on stdout as it was; until the block ends, print() and anything else written to file
    descriptor 1 (DeepSpeed's "Processing zero checkpoint ..." lines, Ray's worker logs, subprocesses) go
    to stderr."""
    stdout = sys.stdout
    stdout.flush()
    try:
        saved = os.dup(1) if stdout.fileno() == 1 else None
    except (AttributeError, OSError, ValueError):  # stdout is no file (a test's StringIO): Python-level only
        saved = None
    out = stdout
    if saved is not None:
        out = os.fdopen(os.dup(saved), "w")
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield out
    finally:
        out.flush()
        if saved is not None:
            out.close()
            stdout.flush()  # anything buffered meanwhile belongs to stderr, where fd 1 still points
            os.dup2(saved, 1)
            os.close(saved)


# ---- shards ----


def _byte_size(text: str) -> int:
    """'268435456', '256M', '1G' (K, M, G: binary units) -> bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    digits, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    if not digits.isdigit() or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size such as 268435456, 256M or 1G")
    return int(digits) * unit


def _shards_convert(a) -> int:
    from pathlib import Path

    from spatialnet_dist.corpora import convert, get_adapter
    from spatialnet_dist.corpora.base import parse_split_ratio

    # Options left out take the writer's defaults (store.writer: DEFAULT_SHARD_BYTES, MIN_SHARDS; store.schema:
    # DEFAULT_QUALITY).
    given = {k: v for k, v in (("shard_bytes", a.shard_bytes), ("min_shards", a.min_shards), ("quality", a.quality))
             if v is not None}
    source_options = {k: v for k, v in (("split_ratio", a.split_ratio and parse_split_ratio(a.split_ratio)),
                                        ("class_file", a.classes and Path(a.classes)),
                                        ("split_seed", a.split_seed),
                                        ("unlabeled", a.unlabeled or None),
                                        ("val_fraction", a.val_fraction),
                                        ("tags_file", a.tags and Path(a.tags))) if v is not None}
    return convert(
        get_adapter(a.adapter, **source_options),
        a.src,
        a.out,
        shard_size=a.shard_size,
        name=a.name,
        strict=a.strict,
        max_bad_fraction=a.max_bad_fraction,
        shuffle_seed=a.shuffle_seed,
        image_format=a.image_format,
        workers=a.workers,
        use_ray=a.ray,
        **given,
    )


def _shards_synth(a) -> int:
    from spatialnet_dist.corpora.synthetic import write_synthetic

    manifest = write_synthetic(a.out, images=a.images, seed=a.seed, shard_size=a.shard_size)
    counts = ", ".join(f"{split} {info['samples']}" for split, info in manifest["splits"].items())
    print(f"synthetic: {counts} images -> {a.out}", file=a.stdout)
    return 0


def _shards_inspect(a) -> int:
    from spatialnet_dist.store.inspect import format_inspect, inspect_store

    info = inspect_store(a.url)
    _print_json(info, a.stdout) if a.json else print(format_inspect(info), file=a.stdout)
    return 0


def _shards_verify(a) -> int:
    from spatialnet_dist.store.verify import verify_store

    bad = verify_store(a.url)  # [(shard url, reason)]
    for url, reason in bad:
        print(f"BAD {url}: {reason}", file=sys.stderr)
    print(f"verify {a.url}: {'ok' if not bad else f'{len(bad)} bad shard(s)'}", file=a.stdout)
    return 1 if bad else 0


# ---- train ----


def _train(a, rest: list[str]) -> int:
    from spatialnet_dist.jobs import train_with_ray

    return train_with_ray(rest)


# ---- eval / predict / model ----


def _eval_captions(a) -> int:
    from spatialnet_dist.metrics.captions import format_caption_table, load_caption_files, score_captions

    preds, refs = load_caption_files(a.pred, a.refs)
    scores = score_captions(preds, refs, spice=a.spice)
    _print_json(scores, a.stdout) if a.json else print(format_caption_table(scores), file=a.stdout)
    return 0


def _eval_vqa(a) -> int:
    from spatialnet_dist.metrics.vqa import format_vqa_table, load_vqa_predictions, score_vqa

    rows = load_vqa_predictions(a.pred)
    scores = score_vqa(rows, count_rule=a.count_rule)
    _print_json(scores, a.stdout) if a.json else print(format_vqa_table(scores), file=a.stdout)
    return 0


def _eval_run(a) -> int:
    from spatialnet_dist.evaluate.run import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        a.checkpoint, data=a.data, split=a.split, out=a.out, workers=a.workers, max_samples=a.max_samples
    )
    _print_json(metrics, a.stdout)
    return 0


def _predict(a) -> int:
    from spatialnet_dist.evaluate.predict import format_predictions, predict_images

    results = predict_images(a.checkpoint, a.images, questions=a.question or [])
    _print_json(results, a.stdout) if a.json else print(format_predictions(results), file=a.stdout)
    return 0


def _infer(a) -> int:
    from spatialnet_dist.evaluate.infer import infer, summary_line

    if a.split and not a.corpus:
        raise UserError("--split: only with --corpus (SOURCE is then a shard store)")
    tasks = [t for t in a.tasks.split(",") if t] if a.tasks else None
    result = infer(a.model, a.source, a.out, corpus=a.corpus, split=a.split or "test", tile=a.tile, stride=a.stride,
                   tasks=tasks, questions=a.question or [], embeddings=a.embeddings, class_map=a.class_map,
                   workers=a.workers, use_ray=a.ray, strict=a.strict, part_tiles=a.part_tiles, progress=not a.json)
    if a.json:
        _print_json({k: v for k, v in result.items() if k != "parts"}, a.stdout)
    else:
        print(summary_line(result), file=a.stdout)
    return 1 if result["bad"] else 0


def _export(a) -> int:
    from spatialnet_dist.checkpoint_weights import export_bundle

    out = export_bundle(a.checkpoint, a.out)
    print(f"exported {a.checkpoint} -> {out} (model.safetensors, config.yaml, vocab.json)", file=a.stdout)
    return 0


def _model(a) -> int:
    from spatialnet_dist.model.summary import format_summary, model_summary

    info = model_summary(a.preset, image_size=a.image_size)
    _print_json(info, a.stdout) if a.json else print(format_summary(info), file=a.stdout)
    return 0


# ---- runs ----


def _run_row(run: dict) -> list[str]:
    loss = run["last_metrics"].get("loss")
    return [run["run_dir"].rstrip("/").rsplit("/", 1)[-1], run["state"], f"{run['last_step']}/{run['max_steps']}",
            "-" if loss is None else f"{loss:.4g}", str(len(run["checkpoints"])), "yes" if run["report"] else "no"]


def _runs_list(a) -> int:
    from spatialnet_dist.display import markdown_table
    from spatialnet_dist.train.rundir import list_runs

    runs = list_runs(a.storage)
    if a.json:
        _print_json(runs, a.stdout)
    elif not runs:
        print(f"no runs under {a.storage}", file=a.stdout)
    else:
        headers = ["run", "state", "step", "loss", "checkpoints", "report"]
        print(markdown_table(headers, [_run_row(r) for r in runs], numbers_from=2), file=a.stdout)
    return 0


def _runs_show(a) -> int:
    from spatialnet_dist.train.rundir import RunDir

    run = RunDir(a.run.rstrip("/")).describe()
    if a.json:
        _print_json(run, a.stdout)
        return 0
    lines = [f"run:         {run['run_dir']}", f"state:       {run['state']}" + (f" ({run['error']})" if run["error"] else ""),
             f"step:        {run['last_step']} of {run['max_steps']} ({run['attempts']} attempt(s))",
             f"report:      {run['report'] or '-'}", f"tensorboard: {run['tensorboard'] or '-'}",
             "checkpoints: " + (", ".join(run["checkpoints"]) or "-")]
    if run["best_step"] is not None:
        lines.append(f"best step:   {run['best_step']} (eval.keep_best)")
    lines += [f"damaged:     {d['checkpoint']} ({d['file'] or 'file unrecorded'} did not verify; kept for inspection)"
              for d in run["damaged_checkpoints"]]
    lines.append("last metrics:")
    lines += [f"  {k} = {v:.6g}" if isinstance(v, float) else f"  {k} = {v}" for k, v in run["last_metrics"].items()]
    print("\n".join(lines), file=a.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spatialnet", description="Train and evaluate SpatialNet-ViT at scale.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="convert, generate, inspect and verify shard stores")
    ssub = shards.add_subparsers(dest="shards_command", required=True)
    conv = ssub.add_parser(
        "convert",
        help="convert an original corpus into shards",
        description="Convert an original corpus into shards under OUT/<corpus>/, shuffled across shards. The "
        "shards get names unique to this conversion and the manifest is written last: a failed or killed "
        "conversion leaves the corpus that was there (if any) as it was; the old shards are deleted after.",
    )
    conv.add_argument("adapter", help="corpus adapter: ucm-captions, rsicd, sydney-captions, rsvqa-lr, rsvqa-hr, imagefolder, jsonl, csv")
    conv.add_argument("src", help="folder of the corpus in its published layout (jsonl, csv: the record file)")
    conv.add_argument("out", help="store root: a local dir or s3://bucket/prefix")
    conv.add_argument("--shard-size", type=int, default=None, help="at most N samples per shard (default: no cap)")
    conv.add_argument("--shard-bytes", type=_byte_size, help="target shard size: bytes, or with K/M/G (default 256M)")
    conv.add_argument("--min-shards", type=int, help="at least N shards per split, or one per sample (default 16)")
    conv.add_argument("--shuffle-seed", type=int, default=0, help="seed of the shuffle across shards (default 0)")
    conv.add_argument("--name", default=None, help="corpus name in the store (default: the adapter's)")
    conv.add_argument("--strict", action="store_true", help="stop at the first bad record")
    conv.add_argument("--split-ratio", help="imagefolder, jsonl, csv: train,val,test fractions for images without "
                      "a split (default 0.8,0.1,0.1; imagefolder draws them per class)")
    conv.add_argument("--split-seed", type=int, help="imagefolder, jsonl, csv: seed of that draw (default 0)")
    conv.add_argument("--classes", metavar="FILE", help="imagefolder, jsonl, csv: class order, one name per line "
                      "(default: the names sorted)")
    conv.add_argument("--unlabeled", action="store_true",
                      help="imagefolder, jsonl, csv: an image-only corpus, for pretraining (tasks.mae): imagefolder "
                           "takes every image below SRC at any depth (no class folders), jsonl/csv records only path "
                           "(id, split, meta); splits train and val by --val-fraction, no classes, no test split")
    conv.add_argument("--val-fraction", type=float, metavar="F",
                      help="with --unlabeled: the share of the images drawn into val, seeded by --split-seed "
                           "(default 0.1, the val share of --split-ratio's default)")
    conv.add_argument("--tags", metavar="FILE", help="ucm-captions: the UC Merced multi-label table "
                      "(LandUse_Multilabeled.txt) to merge in by image as each sample's tags")
    conv.add_argument("--image-format", default="png", metavar="{png,jpeg,webp}",
                      help="how 8-bit images are stored: png (lossless, the default), jpeg or webp (lossy, several "
                           "times faster to decode: what feeds a GPU; an image the format cannot hold stays png)")
    conv.add_argument("--quality", type=int, metavar="Q", help="jpeg, webp: encoder quality 1-100 (default 90)")
    conv.add_argument("--max-bad-fraction", type=float, default=0.05, help="exit non-zero above this fraction of bad records")
    where = conv.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=1, metavar="N",
                       help="encode images and write shards in N processes on this machine (default 1); "
                            "the shards are byte-identical whatever N")
    where.add_argument("--ray", action="store_true",
                       help="run those tasks on the Ray cluster of RAY_ADDRESS (else a local Ray); each writes "
                            "whole shards straight to OUT, which every node must reach (s3:// or a shared folder)")
    conv.set_defaults(fn=_shards_convert)

    syn = ssub.add_parser("synth", help="write the synthetic demo corpus `synthetic`")
    syn.add_argument("out", help="store root: a local dir or s3://bucket/prefix")
    syn.add_argument("--images", type=int, default=600, metavar="N",
                     help="number of scenes to generate, split 80/10/10 into train/val/test; each has captions, a "
                          "class, counts and question/answer pairs (default 600, at least 10)")
    syn.add_argument("--seed", type=int, default=0, help="seed of the images and of the shuffle across shards")
    syn.add_argument("--shard-size", type=int, default=None, help="at most N samples per shard (default: no cap)")
    syn.set_defaults(fn=_shards_synth)

    ins = ssub.add_parser("inspect", help="counts per corpus/split/task from the manifests")
    ins.add_argument("url", help="store root, or one corpus under it")
    ins.add_argument("--json", action="store_true", help=JSON_HELP)
    ins.set_defaults(fn=_shards_inspect)

    ver = ssub.add_parser("verify", help="re-read every shard: sizes, sha256, decodability")
    ver.add_argument("url", help="store root, or one corpus under it")
    ver.set_defaults(fn=_shards_verify)

    tr = sub.add_parser("train", help="run a training job (same as `python ray_job.py`)", add_help=False)
    tr.set_defaults(fn=_train, passthrough=True)

    ev = sub.add_parser("eval", help="score predictions or a checkpoint")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    cap = esub.add_parser("captions", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)")
    cap.add_argument("--pred", required=True, help='[{"image_id", "caption"}]')
    cap.add_argument("--refs", required=True, help='{"<image_id>": [str, ...]}')
    cap.add_argument("--spice", action="store_true", help="also SPICE (downloads Stanford CoreNLP: needs network)")
    cap.add_argument("--json", action="store_true", help=JSON_HELP)
    cap.set_defaults(fn=_eval_captions)
    vqa = esub.add_parser("vqa", help="per-type accuracy, AA, OA")
    vqa.add_argument("--pred", required=True, help='[{"qid", "type", "answer", "prediction"}]')
    vqa.add_argument("--count-rule", choices=("rsvqa-lr", "exact"), default="rsvqa-lr",
                     help="count answers: binned as the RSVQA-LR authors do (0, 1-10, 11-100, ...), or exact "
                          "(default rsvqa-lr)")
    vqa.add_argument("--json", action="store_true", help=JSON_HELP)
    vqa.set_defaults(fn=_eval_vqa)
    run = esub.add_parser("run", help="predict every sample of a split with a checkpoint, score, write a report")
    run.add_argument("checkpoint", help="checkpoint dir (or URL) or exported bundle")
    run.add_argument("--data", required=True, help="store root URL")
    run.add_argument("--split", default="test", help="split of the store to evaluate on (default test)")
    run.add_argument("--out", default=None, help="output dir (default: <checkpoint>/eval-<split>)")
    run.add_argument("--workers", type=int, default=0, help="Ray workers to spread prediction over (0: this process)")
    run.add_argument("--max-samples", type=int, default=0, help="stop after this many images per task (0: all)")
    run.set_defaults(fn=_eval_run)

    pr = sub.add_parser("predict", help="caption, land-use class and answers for images")
    pr.add_argument("checkpoint", help="checkpoint dir (or URL) or exported bundle")
    pr.add_argument("images", nargs="+", help="PNG, TIFF, JPEG or NPY files")
    pr.add_argument("--question", action="append", help="a question to answer for every image (repeatable)")
    pr.add_argument("--json", action="store_true", help=JSON_HELP)
    pr.set_defaults(fn=_predict)

    inf = sub.add_parser(
        "infer", help="batch inference over a shard corpus or raster scenes, to (Geo)Parquet, resumable",
        description="Predict every sample of a shard corpus split, or every tile of raster scenes (GeoTIFFs of any "
        "size, read window by window), into OUT: a Parquet dataset in parts named by their input (GeoParquet for "
        "rasters) and OUT/manifest.json. A rerun writes only the missing parts; another model is refused. Exit 1 "
        "when some input was unreadable (named, skipped, counted), 2 on bad usage.")
    inf.add_argument("model", help="checkpoint dir (or URL) or exported bundle")
    inf.add_argument("source", help="shard store root (with --corpus), or a raster file, folder or glob (local or s3://)")
    inf.add_argument("out", help="output dataset: a local dir or s3://bucket/prefix")
    inf.add_argument("--corpus", help="SOURCE is a shard store: the corpus to predict")
    inf.add_argument("--split", help="with --corpus: its split (default test)")
    inf.add_argument("--tile", type=int, default=0, help="raster tile side in pixels (default: the model's image size); "
                     "resized to the model's input as predict resizes an image")
    inf.add_argument("--stride", type=int, default=0, help="pixels between tiles (default: the tile; smaller: overlap)")
    inf.add_argument("--tasks", help="heads to run, comma-separated (default: every head that needs no text; vqa with "
                     "--question; regression answers --question counts)")
    inf.add_argument("--question", action="append", help="a question to ask of every tile (repeatable)")
    inf.add_argument("--embeddings", action="store_true", help="add the pooled encoder vector as `embedding`")
    inf.add_argument("--class-map", action="store_true", help="rasters: a GeoTIFF class map per scene at one pixel "
                     "per stride (argmax, and the per-class probabilities), overlapping tiles averaged")
    inf.add_argument("--strict", action="store_true", help="stop at the first unreadable input")
    inf.add_argument("--part-tiles", type=int, default=0, metavar="N",
                     help="rasters: tiles per output part, whole tile rows (default: 128 MB of model inputs, "
                          "222 tiles of 224 px RGB)")
    inf.add_argument("--json", action="store_true", help=JSON_HELP)
    inf.add_argument("--workers", type=int, default=0, metavar="N",
                     help="N model replicas (Ray actors) on a local Ray (default: 1, in this process); the same output")
    inf.add_argument("--ray", action="store_true", help="on the Ray cluster of RAY_ADDRESS (else a local Ray): "
                     "--workers actors, by default one per GPU of the cluster")
    inf.set_defaults(fn=_infer)

    ex = sub.add_parser("export", help="consolidate a checkpoint (any ZeRO stage) into an fp32 inference bundle")
    ex.add_argument("checkpoint", help="checkpoint dir or s3:// URL")
    ex.add_argument("out", help="output folder: model.safetensors + config.yaml + vocab.json")
    ex.set_defaults(fn=_export)

    mo = sub.add_parser("model", help="parameter counts and GFLOPs of a preset")
    mo.add_argument("--preset", required=True, help="model preset: tiny, small, paper, base, large, giant")
    mo.add_argument("--image-size", type=int, default=0, help="input side in pixels (default: the preset's)")
    mo.add_argument("--json", action="store_true", help=JSON_HELP)
    mo.set_defaults(fn=_model)

    runs = sub.add_parser("runs", help="list training runs and show one: state, step, metrics, checkpoints, report")
    rsub = runs.add_subparsers(dest="runs_command", required=True)
    rl = rsub.add_parser("list", help="every run directory under a run.storage root")
    rl.add_argument("storage", help="run.storage root: a local dir or s3://bucket/prefix")
    rl.add_argument("--json", action="store_true", help=JSON_HELP)
    rl.set_defaults(fn=_runs_list)
    rs = rsub.add_parser("show", help="one run: state, last step, last metrics, checkpoints, report path")
    rs.add_argument("run", help="run directory: <run.storage>/<run.name>, local or s3://")
    rs.add_argument("--json", action="store_true", help=JSON_HELP)
    rs.set_defaults(fn=_runs_show)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return _train(None, argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "json", False) or args.fn is _eval_run:
            with _library_output_to_stderr() as args.stdout:
                return args.fn(args)
        args.stdout = sys.stdout
        return args.fn(args)
    except UserError as e:
        print(f"spatialnet: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"spatialnet: error: {e.filename or e}: not found", file=sys.stderr)
        return 2


def entry() -> None:
    """Console script: flush and leave with os._exit so that no library's atexit hook can abort
    a finished run (DeepSpeed/gloo teardown sometimes does)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
