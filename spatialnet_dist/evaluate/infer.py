"""`spatialnet infer MODEL SOURCE OUT`: a model over a whole shard corpus split or over raster scenes of any size,
to a Parquet dataset (GeoParquet for rasters) in parts, resumable (CONTRACT: infer in DESIGN.md).

The work is a list of parts (evaluate/infer_sources.py); each part is read (windows of a scene, or a shard's
samples, into the model's inputs), predicted by one `PartPredictor` (the model loaded once), and written as one
Parquet file (evaluate/infer_output.py), complete or absent. A part's rows are sorted by their key and its file is
named by its input, so the dataset is the same, row for row, whatever the number of workers and whatever order the
parts finish in.

Two ways to run the same functions:
- in this process (the default, `--workers 1`);
- on Ray Data (`--workers N` > 1, or `--ray`): `read_part` in Ray tasks ahead of an actor pool of N
  `PartPredictor`s (`map_batches`, one GPU each on a GPU cluster, one CPU each here); the driver records each
  finished part in the manifest and shows a progress bar in tiles/s.

Resumption: the manifest, written before the first part, names the model's sha256 and the settings; a rerun with
another model or other settings refuses to mix, naming both. The done parts are those listed under OUT/parts; a
rerun predicts the others only. An input that cannot be read is named, skipped and counted (manifest "bad"),
or, with `strict`, stops the run at once; parts already written are never touched.
"""

from __future__ import annotations

import logging
import os
import pickle
import time

from spatialnet_dist import tasks as registry
from spatialnet_dist.errors import UserError
from spatialnet_dist.evaluate import infer_output as output
from spatialnet_dist.evaluate.infer_sources import default_part_tiles, plan_rasters, plan_shards, read_part
from spatialnet_dist.store import storage

log = logging.getLogger("spatialnet.infer")
CHUNK = 64  # tiles per forward pass
PROGRESS_EVERY_S = 30.0


class PartPredictor:
    """One model replica: reads of parts in, written parts out. The Ray actor of `map_batches` (constructed once per
    actor: the model loads once), and the in-process worker."""

    def __init__(self, model_url: str, settings: dict, out: str, loaded=None, threads: int = 0):
        import torch

        from spatialnet_dist.checkpoint_weights import load_model
        from spatialnet_dist.evaluate.predict import Predictor

        if threads:
            torch.set_num_threads(threads)
        model, cfg, vocabs = loaded or load_model(model_url)
        if torch.cuda.is_available() and loaded is None:
            model = model.cuda()
        self.out, self.settings = out, settings
        self.predictor = Predictor(model, cfg, vocabs, settings["tasks"], settings["questions"], settings["embeddings"],
                                   model_url, class_probabilities=settings["class_map"])
        self.schema = output.schema(settings["kind"], self.predictor.tasks, settings["embeddings"], settings["class_map"])

    def run(self, read: dict) -> dict:
        """One `read_part` result -> its part written -> {"name", "source", "rows", "nodata_tiles", "error"}."""
        import torch

        cpu = time.process_time()
        result = {"name": read["name"], "source": read["source"], "rows": 0, "nodata_tiles": read["nodata_tiles"],
                  "error": read["error"], "replica": os.getpid(), "cpu_s": read["cpu_s"]}
        if read["error"]:
            return result
        rows = []
        if read["inputs"] is not None:
            inputs = torch.from_numpy(read["inputs"])  # (B, C, S, S)
            for start in range(0, len(inputs), CHUNK):
                rows += self.predictor.predict(inputs[start : start + CHUNK])
        rows = [{**key, **pred} for key, pred in zip(read["keys"], rows)]
        crs = None
        if self.settings["kind"] == "rasters" and read["epsg"] is not None:
            crs = output.projjson(read["epsg"])
        counts = {"rows": len(rows), "nodata_tiles": read["nodata_tiles"], "source": read["source"]}
        output.write_part(self.out, read["name"], output.part_bytes(rows, self.schema, counts, crs))
        return {**result, "rows": len(rows), "cpu_s": read["cpu_s"] + time.process_time() - cpu}

    def __call__(self, batch: dict) -> dict:
        results = [self.run(pickle.loads(payload)) for payload in batch["payload"]]
        return {"result": [pickle.dumps(r) for r in results]}


def _read_for_actors(row: dict, transform) -> dict:
    return {"payload": pickle.dumps(_read(pickle.loads(row["part"]), transform))}


def _read(part: dict, transform) -> dict:
    cpu = time.process_time()
    read = read_part(part, transform)
    read["cpu_s"] = time.process_time() - cpu  # CPU seconds of reading and tiling (this process, all threads)
    read["source"] = part.get("path") or part.get("url")
    read["epsg"] = None
    if part["kind"] == "rasters" and read["error"] is None:
        read["epsg"] = part["epsg"]
    return read


def _run_with_ray(todo: list[dict], model_url: str, settings: dict, out: str, workers: int, transform):
    """Yield each part's result as the actor pool finishes it (in any order)."""
    import ray

    from spatialnet_dist.ray_cluster import connect_ray

    started = connect_ray(max(workers, 1) + 1)  # N actors, and room for the read tasks ahead of them
    try:
        gpu_count = int(ray.cluster_resources().get("GPU", 0))
        gpus = gpu_count >= 1
        workers = workers or max(gpu_count, 1)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts tiles
        context.execution_options.preserve_order = False
        ds = ray.data.from_items([{"part": pickle.dumps(p)} for p in todo], override_num_blocks=len(todo))
        # Reading runs ahead of the actors in a few tasks at a time: each new worker process pays torch's import
        # (seconds), and a part's read is cheap beside its prediction (bench/infer_throughput.py: loader_tiles_per_s).
        ds = ds.map(_read_for_actors, fn_kwargs={"transform": transform}, num_cpus=0.5,
                    compute=ray.data.TaskPoolStrategy(size=max(2, workers)))
        threads = 0 if gpus else 1
        ds = ds.map_batches(PartPredictor, fn_constructor_args=(model_url, settings, out),
                            fn_constructor_kwargs={"threads": threads}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
        for row in ds.iter_rows():
            yield pickle.loads(row["result"])
    finally:
        if started:
            ray.shutdown()


def _run_here(todo: list[dict], worker: PartPredictor, transform):
    for part in todo:
        yield worker.run(_read(part, transform))


def _record(result: dict, manifest: dict, out: str, strict: bool, written: list[str], bar) -> None:
    """One part's result into the manifest (written at once); a bad input warned about, or raised with `strict`."""
    name = result["name"]
    if result["error"]:
        manifest["bad"][name] = {"source": result["source"], "reason": result["error"]}
        output.write_manifest(out, manifest)
        if strict:
            raise UserError(f"{result['error']} (--strict)")
        log.warning("skipping %s", result["error"])
        return
    manifest["parts"][name] = {"rows": result["rows"], "nodata_tiles": result["nodata_tiles"]}
    output.write_manifest(out, manifest)
    written.append(name)
    bar.update(result["rows"] + result["nodata_tiles"])


def _check_manifest(old: dict | None, model_url: str, sha: str, settings: dict, out: str) -> None:
    if old is None:
        return
    if old["model_sha256"] != sha:
        raise UserError(f"{out}: holds predictions of model {old['model']} (sha256 {old['model_sha256']}), not of "
                        f"{model_url} (sha256 {sha}): refusing to mix them; write to another OUT")
    changed = [k for k in settings if old["settings"].get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{out}: was written with {k}={old['settings'].get(k)!r}, this run has {k}={settings[k]!r}: "
                        "refusing to mix them; write to another OUT")


def _absolute(url: str) -> str:
    return url if storage.is_s3(url) else os.path.abspath(url)


def infer(model_url: str, source: str, out: str, corpus: str | None = None, split: str = "test", tile: int = 0,
          stride: int = 0, tasks: list[str] | None = None, questions: list[str] | None = None,
          embeddings: bool = False, class_map: bool = False, workers: int = 0, use_ray: bool = False,
          strict: bool = False, part_tiles: int = 0, progress: bool = True) -> dict:
    """Run (or resume) one inference; -> the manifest, with "written" (the parts this run wrote), "wall_s" and
    "tiles_per_s" (in the steady state, once every replica has done a part; 0 with one part). `part_tiles` 0:
    infer_sources.default_part_tiles. `workers` 0: 1 in
    this process, or with `use_ray` one actor per GPU of the cluster."""
    from spatialnet_dist.checkpoint_weights import load_model, model_sha256
    from spatialnet_dist.data.transforms import model_image_size
    from spatialnet_dist.evaluate.predict import input_transform

    model_url, source, out = _absolute(model_url.rstrip("/")), _absolute(source), out.rstrip("/")
    if workers < 0:
        raise UserError(f"--workers {workers}: expected at least 1")
    loaded = load_model(model_url)
    cfg = loaded[1]
    size = model_image_size(cfg.model)
    tile, stride = tile or size, stride or tile or size
    if tile < 1 or stride < 1:
        raise UserError(f"--tile {tile} --stride {stride}: expected positive pixel counts")
    part_tiles = part_tiles or default_part_tiles(cfg.model.in_chans, size)
    kind = "shards" if corpus else "rasters"
    if class_map and kind == "shards":
        raise UserError("--class-map: only for raster scenes")
    settings = {"kind": kind, "source": source, "corpus": corpus, "split": split if corpus else None,
                "tile": tile if kind == "rasters" else None, "stride": stride if kind == "rasters" else None,
                "tasks": tasks, "questions": list(questions or []), "embeddings": embeddings, "class_map": class_map,
                "part_tiles": part_tiles if kind == "rasters" else None}
    worker = PartPredictor(model_url, settings, out, loaded=loaded)  # checks --tasks and --question first
    if class_map and not any(registry.get(t).maps_classes for t in worker.predictor.tasks):
        mapping = " or ".join(t.name for t in registry.all_tasks() if t.maps_classes)
        raise UserError(f"--class-map: needs the {mapping} head among --tasks")
    settings["tasks"] = worker.predictor.tasks

    if kind == "shards":
        parts, _ = plan_shards(source, corpus, split)
        scenes, bad = [], {}
    else:
        parts, scenes, bad = plan_rasters(source, tile, stride, part_tiles)
        epsg = {s.name: (s.georef.epsg if s.georef is not None else None) for s in scenes}
        for p in parts:
            p["epsg"] = epsg[p["scene"]]
        for s in scenes:
            if s.georef is None:
                log.warning("%s: no georeference; its tiles' polygons are in pixel coordinates (x right, y down)", s.path)
    sha = model_sha256(model_url)
    manifest = output.read_manifest(out)
    _check_manifest(manifest, model_url, sha, settings, out)
    manifest = manifest or {"model": model_url, "model_sha256": sha, "settings": settings, "parts": {}, "bad": {}}
    planned = {p["name"] for p in parts}
    done = set(output.written_parts(out)) & planned
    for name in done - set(manifest["parts"]):  # written, then killed before the manifest said so
        counts = output.part_counts(out, name)
        manifest["parts"][name] = {"rows": counts["rows"], "nodata_tiles": counts["nodata_tiles"]}
    manifest["bad"] = dict(bad)  # this run's verdict on every input it could not read
    output.write_manifest(out, manifest)
    for entry in bad.values():
        if strict:
            raise UserError(f"{entry['source']}: {entry['reason']} (--strict)")
        log.warning("skipping %s: %s", entry["source"], entry["reason"])

    todo = [p for p in parts if p["name"] not in done]
    transform = input_transform(cfg)
    expected = sum(len(p["xs"]) * len(p["ys"]) if p["kind"] == "rasters" else p["samples"] for p in todo)
    # tiles/s in the steady state: from the time every replica has finished a part (Ray's start and each actor's
    # model loading left out) to the last part; with fewer parts than replicas, from the first part
    replicas = max(workers, 1) if (use_ray or workers > 1) else 1
    started, first, tiles, cpu_s, written, seen = time.perf_counter(), None, 0, 0.0, [], set()
    bar = _Progress(expected, progress)
    results = (_run_with_ray(todo, model_url, settings, out, workers, transform) if (use_ray or workers > 1) and todo
               else _run_here(todo, worker, transform))
    try:
        for result in results:
            _record(result, manifest, out, strict, written, bar)
            if result["error"]:
                continue
            if first is not None:
                tiles += result["rows"] + result["nodata_tiles"]
                cpu_s += result["cpu_s"]
            seen.add(result["replica"])
            if first is None and len(seen) >= min(replicas, len(todo)):
                first = time.perf_counter()
    finally:
        bar.close()
        results.close()  # a stop (--strict) shuts the Ray instance this run started down now
    end = time.perf_counter()
    wall, steady = end - started, end - (first or end)
    if class_map:
        _class_maps(out, scenes, parts, manifest, stride)
    return {**manifest, "written": written, "wall_s": wall, "tiles_per_s": tiles / steady if steady > 0 else 0.0,
            # CPU seconds the reads and predictions took per tile, and the cores they kept busy, in that steady state
            "cpu_ms_per_tile": 1000 * cpu_s / tiles if tiles else 0.0, "cores_busy": cpu_s / steady if steady > 0 else 0.0}


class _Progress:
    """Tiles done and tiles/s: a tqdm bar on a terminal, else (logs, Ray job output) a line every PROGRESS_EVERY_S."""

    def __init__(self, total: int, enabled: bool):
        import sys

        from tqdm import tqdm

        self.tty = enabled and sys.stderr.isatty()
        self.enabled, self.total, self.done, self.start = enabled, total, 0, time.perf_counter()
        self.last = self.start
        self.bar = tqdm(total=total, unit="tile", unit_scale=True, desc="infer", mininterval=1.0) if self.tty else None

    def update(self, tiles: int) -> None:
        self.done += tiles
        if self.bar is not None:
            self.bar.update(tiles)
        elif self.enabled and time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self.last = time.perf_counter()
            log.warning("infer: %d of %d tiles, %.1f tiles/s", self.done, self.total, self.done / (self.last - self.start))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _class_maps(out: str, scenes, parts: list[dict], manifest: dict, stride: int) -> None:
    """A class map for every scene whose parts are all done."""
    for scene in scenes:
        names = [p["name"] for p in parts if p["scene"] == scene.name]
        if all(n in manifest["parts"] for n in names):
            grid = (-(-scene.height // stride), -(-scene.width // stride))
            output.write_class_map(out, scene.name, output.read_rows(out, names), grid, stride, scene.georef)


def summary_line(result: dict) -> str:
    bad = result["bad"]
    names = ", ".join(e["source"] for e in list(bad.values())[:5]) + (", ..." if len(bad) > 5 else "")
    return (f"infer: {result['rows']} rows in {len(result['parts'])} parts ({len(result['written'])} written now, "
            f"{result['tiles_per_s']:.1f} tiles/s); {result['nodata_tiles']} all-nodata tiles skipped; "
            f"{len(bad)} bad input(s) skipped" + (f": {names}" if bad else ""))
