"""Data throughput: can the shard streams feed the model? (DESIGN.md, CONTRACT: benchmarks)

The same synthetic images (train split), four ways, in rows (one decoded + transformed image
with its task targets) per second:
  shard_local_samples_per_s   the training loader (multi-task batches) over local shards, every visit
                              decoding its image (data.image_cache_mb=0: a corpus larger than the cache)
  shard_s3_samples_per_s      the same loader over the same shards in S3 (a moto server on 127.0.0.1), each
                              shard downloaded once into a fresh node-local cache (data.cache_dir) and read there
  image_folder_samples_per_s  the same images read as individual PNG files: read, decode, transform
  model_samples_per_s         the `tiny` model's forward + backward on those batches, with the torch threads
                              of one training worker (train.torch_threads, else train.cpus_per_worker: the
                              demo's 1), which is what one worker's loader feeds
  shard_local_cached_samples_per_s  the local loader with the default image cache, which this corpus fits:
                              after its first visit an image is not decoded again
  loader_rows_per_s_per_core  {png, jpeg, webp}: the training loader's rows per CPU second with the images
                              stored in each `shards convert --image-format` (default quality), 256 px stored
                              and at the model (the GPU recipe's size): in this process (data.loader_workers 0,
                              one torch thread, no image cache), classification alone, so a row is one image
                              read, decoded and transformed; CPU seconds, so other load on the machine does not
                              count. rows/s a GPU node's loader gives = this x its busy loader cores.
                              With --images-dir, of real images (e.g. UCM-captions' imgs/, fitted to 256 px):
                              the synthetic scenes' flat colours compress and decode far faster than photographs.
Targets (issue 3): shard streams >= 5x the model's rate; S3 >= 0.8x local. Issue 28: >= 250 rows/s per core for
one format (12 cores feed 3,000 rows/s). Nothing is asserted.

    python bench/data_throughput.py [--images 200] [--batches 30] [--images-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spatialnet_dist import config, tasks  # noqa: E402
from spatialnet_dist.batch_format import sub_batches  # noqa: E402
from spatialnet_dist.corpora.base import read_image  # noqa: E402
from spatialnet_dist.corpora.synthetic import CLASSES, CORPUS, generate  # noqa: E402
from spatialnet_dist.data.batches import make_train_loader  # noqa: E402
from spatialnet_dist.data.transforms import ImageTransform, model_image_size  # noqa: E402
from spatialnet_dist.data.vocab import build_vocabs  # noqa: E402
from spatialnet_dist.model.spatialnet import build_model  # noqa: E402
from spatialnet_dist.objective import MultiTaskObjective  # noqa: E402
from spatialnet_dist.store import s3, storage  # noqa: E402
from spatialnet_dist.store.schema import IMAGE_FORMATS, Sample, decode_image, encode_image, fit_image  # noqa: E402
from spatialnet_dist.store.writer import ShardWriter  # noqa: E402


def rows(batch: dict) -> int:
    return sum(len(sub["image_id"]) for sub in sub_batches(batch).values())


def bench_config(root: str, image_cache_mb: int = 0) -> config.Config:
    demo = REPO / "configs" / "demo.yaml"
    cfg = config.load(demo if demo.is_file() else None)
    cfg.data.root = root
    cfg.data.image_cache_mb = image_cache_mb
    cfg.model.preset = "tiny"
    return cfg


def write_store(root: str, folder: Path, images: int, shard_size: int) -> int:
    """The synthetic corpus as shards under `root`, and its train images as PNG files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with ShardWriter(root, CORPUS, source="bench", classes=CLASSES, shard_size=shard_size) as writer:
        for sample in generate(images, seed=0):
            writer.write(sample)
            if sample.split == "train":
                (folder / f"{sample.image_id}.png").write_bytes(encode_image(sample.image)[1])
                n += 1
    return n


def copy_store(src_root: str, dst_root: str) -> None:
    """Upload a local corpus to S3; the manifest last, as the writer does."""
    files = storage.list_files(storage.join(src_root, CORPUS))
    for rel in sorted(files, key=lambda rel: rel.endswith("manifest.json")):
        storage.put_file(storage.join(src_root, CORPUS, rel), storage.join(dst_root, CORPUS, rel))


def stream_rate(cfg, vocabs, batches: int) -> tuple[float, list[dict]]:
    """Rows/s of the training loader, timed after its first batch (worker start, first shard index)."""
    loader = make_train_loader(cfg, vocabs, rank=0, world_size=1)
    first = next(loader)
    start, n, kept = time.perf_counter(), 0, [first]
    for _ in range(batches):
        batch = next(loader)
        n += rows(batch)
        if len(kept) < 4:
            kept.append(batch)
    rate = n / (time.perf_counter() - start)
    loader.close()
    return rate, kept


def folder_rate(cfg, folder: Path, passes: int = 2) -> float:
    """Like one loader worker: one process, one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transform = ImageTransform(model_image_size(cfg.model), cfg.model.in_chans, augment="symmetry")
    rng = np.random.default_rng(0)
    paths = sorted(folder.glob("*.png"))
    start = time.perf_counter()
    for _ in range(passes):
        for path in paths:
            transform(decode_image("png", path.read_bytes()), rng, transform.draw_symmetry(rng))
    rate = passes * len(paths) / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


def real_samples(folder: Path, images: int) -> list[Sample]:
    """The first `images` image files of `folder` (sorted), fitted to 256 px, as train samples of the synthetic
    corpus's classes in turn."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png", ".jpg", ".jpeg"))
    return [Sample(corpus=CORPUS, image_id=f"real{i}", split="train", label=i % len(CLASSES),
                   label_name=CLASSES[i % len(CLASSES)], image=fit_image(read_image(p, 3), (256, 256)))
            for i, p in enumerate(paths[:images])]


def loader_rows_per_core(tmp: Path, samples: list[Sample], batches: int, repeats: int) -> dict[str, float]:
    """{image format: the training loader's rows per CPU second of this process} (the module's docstring); each
    format's best of `repeats`, the formats alternated."""
    demo = REPO / "configs" / "demo.yaml"
    loaders = {}
    for image_format in IMAGE_FORMATS:
        root = str(tmp / f"shards-{image_format}")
        with ShardWriter(root, CORPUS, source="bench", classes=CLASSES, shard_size=50,
                         image_format=image_format) as writer:
            for sample in samples:
                writer.write(sample)
        cfg = config.load(demo if demo.is_file() else None, [
            f"data.root={root}", "data.image_cache_mb=0", "data.loader_workers=0", "model.image_size=256",
            *(f"tasks.{t}.enabled={t == 'classification'}" for t in tasks.names())])
        loaders[image_format] = (cfg, build_vocabs(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = dict.fromkeys(loaders, 0.0)
    for _ in range(repeats):
        for image_format, (cfg, vocabs) in loaders.items():
            loader = make_train_loader(cfg, vocabs, rank=0, world_size=1)
            next(loader)  # the first shard's open and index
            start, n = time.process_time(), 0
            for _ in range(batches):
                n += rows(next(loader))
            best[image_format] = max(best[image_format], n / (time.process_time() - start))
            loader.close()
    torch.set_num_threads(threads)
    return {k: round(v, 1) for k, v in best.items()}


def model_rate(cfg, vocabs, batches: list[dict], steps: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.torch_threads or cfg.train.cpus_per_worker)
    model = build_model(cfg.model, cfg.tasks.enabled(), vocabs)
    objective = MultiTaskObjective(cfg.loss)

    def step(batch):
        model.zero_grad(set_to_none=True)
        objective(model(batch), batch, model)["loss"].backward()

    step(batches[0])  # warm-up: allocator, autograd graph
    start, n = time.perf_counter(), 0
    for i in range(steps):
        step(batches[i % len(batches)])
        n += rows(batches[i % len(batches)])
    rate = n / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


@contextlib.contextmanager
def moto_server():
    """moto's S3 server in its own process on 127.0.0.1 (like a real endpoint: it does not share this
    process's GIL), with the standard AWS variables pointing at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        s3.s3_client().create_bucket(Bucket="bench")
        yield
    finally:
        server.terminate()
        server.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200, help="synthetic images (80%% are train)")
    p.add_argument("--batches", type=int, default=30, help="timed loader batches")
    p.add_argument("--repeats", type=int, default=2, help="timings of each stream (the best counts)")
    p.add_argument("--model-steps", type=int, default=5, help="timed forward+backward steps")
    p.add_argument("--shard-size", type=int, default=50)
    p.add_argument("--images-dir", type=Path, metavar="DIR",
                   help="real image files for loader_rows_per_s_per_core (default: the synthetic scenes)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.images_dir is not None and not a.images_dir.is_dir():
        print(f"data_throughput: --images-dir {a.images_dir}: no such folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="spatialnet-bench-") as tmp:
        local_root = os.path.join(tmp, "shards")
        train_images = write_store(local_root, Path(tmp) / "pngs", a.images, a.shard_size)
        cfg = bench_config(local_root)
        vocabs = build_vocabs(cfg)
        with moto_server():
            copy_store(local_root, "s3://bench/shards")
            s3_cfg = bench_config("s3://bench/shards")
            s3_cfg.data.cache_dir = os.path.join(tmp, "s3-cache")  # empty at start: the first timing downloads
            # Alternated and best of `repeats`: other load on the machine hits both alike.
            cached_cfg = bench_config(local_root, config.Config().data.image_cache_mb)
            local = s3 = cached = 0.0
            for _ in range(a.repeats):
                rate, batches = stream_rate(cfg, vocabs, a.batches)
                local = max(local, rate)
                s3 = max(s3, stream_rate(s3_cfg, vocabs, a.batches)[0])
                cached = max(cached, stream_rate(cached_cfg, vocabs, a.batches)[0])
        folder = folder_rate(cfg, Path(tmp) / "pngs")
        samples = real_samples(a.images_dir, a.images) if a.images_dir else list(generate(a.images, seed=0))
        per_core = loader_rows_per_core(Path(tmp), samples, a.batches, a.repeats)
        model = model_rate(cfg, vocabs, batches, a.model_steps)
    result = {
        "shard_local_samples_per_s": round(local, 1),
        "shard_s3_samples_per_s": round(s3, 1),
        "image_folder_samples_per_s": round(folder, 1),
        "model_samples_per_s": round(model, 1),
        "shard_local_cached_samples_per_s": round(cached, 1),
        "loader_rows_per_s_per_core": per_core,
    }
    if a.json:
        print(json.dumps(result))
    else:
        size = model_image_size(cfg.model)
        print(f"{train_images} train images, {size}px, {cfg.data.loader_workers} loader worker(s), "
              f"{cfg.train.torch_threads or cfg.train.cpus_per_worker} torch thread(s) for the model")
        for key, value in result.items():
            if key != "loader_rows_per_s_per_core":
                print(f"{key:28s} {value:10.1f}")
        print("loader rows/s per core at 256 px: " + ", ".join(f"{k} {v}" for k, v in per_core.items()))
        print(f"stream / model {local / model:.1f}x (target >= 5x); S3 / local {s3 / local:.2f} (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
