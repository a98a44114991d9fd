"""Per-task shard streams: what a task reads (its corpora, mix weights, row maker) and the evaluation pipeline.

Training reads samples by position, in a seeded per-epoch order per task that is the same for any
number of ranks and loader workers (data/order.py, data/indexed.py, data/train_rows.py); this
module holds what both kinds of stream share: the task's corpora and weights (`TaskStreamSpec`),
bad-input accounting (`StreamCounts`), the decoded-image cache and `TaskSamples`, the row maker.

Evaluation (finite, exact): the shard list in manifest order, split by rank then by loader
worker, read once, no shuffle: every sample is seen exactly once across ranks.

Bad input: in training an undecodable sample, or one missing from a truncated or corrupted
shard, is replaced (data/train_rows.py) and counted in `StreamCounts.skipped`, and the shard is
logged once; a missing shard or a storage error raises `StoreError` naming the shard. Evaluation
has to be exact, so there any bad input is an error that names the shard.

Over 300 lines: the training and evaluation streams share the corpus resolution, the bad-input accounting
and the image cache; one file keeps those shared parts next to both of their users.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds

from spatialnet_dist import tasks as registry
from spatialnet_dist.batch_format import IMAGE_KEY
from spatialnet_dist.data.transforms import CROPPING_POLICIES, BandNorm, ImageTransform
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.band_stats import from_manifest
from spatialnet_dist.store.manifest import read_manifest, shard_urls
from spatialnet_dist.store.schema import Sample, decode_sample
from spatialnet_dist.store.shard_tar import UnreadableShard, count_problem, shard_samples
from spatialnet_dist.store.storage import StoreError, open_stream
from spatialnet_dist.symmetry import IDENTITY, Symmetry, map_sides, mappable
from spatialnet_dist.text import TextVocabs

log = logging.getLogger(__name__)
_logged_shards: set[str] = set()  # bad shards this process has named in the log
_logged_unmappable: set[str] = set()  # tasks whose unaugmented visits this process has logged

# The bad-fraction check waits for this much evidence, so one bad shard drawn first cannot stop a run.
BAD_CHECK_MIN_SAMPLES = 200
BAD_CHECK_MIN_SHARDS = 8


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int  # as the manifest says


@dataclass
class CorpusShards:
    corpus: str
    shards: list[Shard]
    band_norm: BandNorm | None = None  # the corpus's per-band (mean, std) for non-uint8 images, from its manifest

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def corpus_shards(root: str, corpus: str, split: str, task: str) -> CorpusShards:
    """The shards of one corpus split, after checking that the corpus has what `task` needs (so that a
    stream can never spin on nothing)."""
    manifest = read_manifest(root, corpus)
    urls = shard_urls(root, corpus, split, manifest)  # StoreError naming the manifest when the split is absent
    info = manifest["splits"][split]
    needs = registry.get(task)
    if not urls or not needs.has_content(manifest, info):
        raise UserError(f"tasks.{task}.corpora: corpus {corpus} under {root} has no {needs.needs} in split {split!r}")
    shards = [Shard(url, s["samples"]) for url, s in zip(urls, info["shards"])]
    return CorpusShards(corpus, shards, from_manifest(manifest))


def corpus_weights(cfg, task: str, corpora: list[CorpusShards]) -> list[float]:
    """Mixing weights: explicit `tasks.<t>.corpus_weights` when given, else by `data.corpus_mix`:
    'size' (proportional to samples) or 'temperature' (size ** (1 / data.mix_temperature))."""
    tc = getattr(cfg.tasks, task)
    if tc.corpus_weights or cfg.data.corpus_mix == "explicit":
        missing = [c.corpus for c in corpora if c.corpus not in tc.corpus_weights]
        if missing:
            raise UserError(f"config key tasks.{task}.corpus_weights.{missing[0]}: no weight for this corpus")
        weights = [float(tc.corpus_weights[c.corpus]) for c in corpora]
    elif cfg.data.corpus_mix == "temperature":
        weights = [c.samples ** (1.0 / cfg.data.mix_temperature) for c in corpora]
    else:
        weights = [float(c.samples) for c in corpora]
    if sum(weights) <= 0:
        raise UserError(f"config key tasks.{task}.corpus_weights: the weights of {task}'s corpora sum to 0")
    return weights


# ---- bad input accounting ----


@dataclass
class StreamCounts:
    """Samples decoded and skipped by one task stream in this process. `strict`: any bad input raises.
    The bad-fraction check waits for BAD_CHECK_MIN_SAMPLES samples from `min_shards` shards."""

    task: str
    max_bad_fraction: float
    strict: bool = False
    min_shards: int = BAD_CHECK_MIN_SHARDS  # fewer when the task has fewer shards
    decoded: int = 0
    skipped: int = 0
    shards_opened: int = 0

    def bad(self, url: str, samples: int, reason: str) -> None:
        if self.strict:
            raise UserError(f"task {self.task}: shard {url}: {reason} (run `spatialnet shards verify`)")
        self.skipped += samples
        if url not in _logged_shards:
            _logged_shards.add(url)
            log.warning("shard %s: %s; skipping its bad samples (counted per task, logged once)", url, reason)
        total = self.decoded + self.skipped
        if total < BAD_CHECK_MIN_SAMPLES or self.shards_opened < self.min_shards:
            return
        if self.skipped > self.max_bad_fraction * total or self.decoded == 0:
            raise UserError(
                f"task {self.task}: {self.skipped} of {total} samples read failed, more than "
                f"data.max_bad_fraction={self.max_bad_fraction} (last bad shard {url}); run `spatialnet shards verify`"
            )


def _reason(e: Exception) -> str:
    return f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__


# ---- pipeline stages ----


def read_shards(shards: Iterable[dict], counts: StreamCounts) -> Iterator[dict]:
    """{"url", "samples"} -> raw WebDataset samples {"__key__", "__url__", one image member (schema.IMAGE_EXTS), "json"}."""
    for shard in shards:
        url, expected = shard["url"], shard["samples"]
        stream = open_stream(url)  # StoreError naming the URL when it is missing or unreachable
        counts.shards_opened += 1
        read, reason = 0, ""
        try:
            for raw in shard_samples(stream, url):
                read += 1
                yield raw
        except UnreadableShard as e:
            reason = e.problem
        except StoreError:  # the storage's retries are spent: as it is, not as a read failure
            raise
        except Exception as e:  # any other failure of the stream mid-read
            raise StoreError(f"shard {url}: read failed after {read} samples ({_reason(e)})") from None
        finally:
            stream.close()
        if reason or read < expected:
            # A tar cut at a member boundary ends early without an error: the manifest count tells.
            counts.bad(url, max(expected - read, 1), reason or count_problem(read, expected))


class ImageCache:
    """Decoded training images of one loader worker, by (shard URL, sample key), up to a byte budget.

    Training visits every sample once per epoch, for many epochs, and the task streams of a worker
    often read the same corpora; without a cache every visit decodes the image again, and at 256 px
    a PNG costs ~2.5 ms, half the loader's work per row. Images are kept until the budget is full and
    then served as they are: each epoch is a new random order, so a full cache serves the same share
    of reads as an LRU would, without its churn. Cached arrays are
    read-only, so no transform can change an image that later rows will share.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._images: dict[tuple[str, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._images)

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        return self._images.get(key)

    def add(self, key: tuple[str, str], image: np.ndarray) -> None:
        if key in self._images or self.bytes + image.nbytes > self.max_bytes:
            return
        image.flags.writeable = False
        self._images[key] = image
        self.bytes += image.nbytes


def decode_one(raw: dict, counts: StreamCounts, images: ImageCache | None = None) -> Sample | None:
    """A raw sample decoded, or None (counted as bad) when it cannot be."""
    key = (raw.get("__url__", "?"), raw.get("__key__", "?"))
    try:
        sample = decode_sample(raw, images.get(key) if images else None)
    except Exception as e:  # PIL, numpy and json raise many types on corrupt bytes
        counts.bad(key[0], 1, f"undecodable sample {key[1]} ({_reason(e)})")
        return None
    counts.decoded += 1
    if images is not None:
        images.add(key, sample.image)
    return sample


def decode_samples(raws: Iterable[dict], counts: StreamCounts) -> Iterator[Sample]:
    for raw in raws:
        if (sample := decode_one(raw, counts)) is not None:
            yield sample


# ---- task samples ----

# Questions (captions) one training visit trains when tasks.<task>.questions_per_image (captions_per_image)
# is 0 ("all"). RSVQA-LR has ~100 questions per image; the encoder pass is shared by all of them, but the
# question encoder and the fusion run once per question, so an uncapped visit would make a step's head work
# and memory follow the most-asked image in it. 64 takes most of the saving and bounds a sub-batch at
# batch_size x 64.
MAX_QUESTIONS_PER_VISIT = 64


class TaskSamples:
    """Sample -> at most one row of the task (its fields: the task's `row`, tasks/<task>.py), or None.

    Training: a random subset (without replacement) of at most `per_visit` of the image's captions
    (captioning) or questions (vqa, regression; count questions only), 0: all, up to
    MAX_QUESTIONS_PER_VISIT, all trained against one encoder pass (`picked`). Evaluation: all of them, so
    every question is scored exactly once, with the references of the image for captioning.
    Images the task has nothing for (no captions, no label, no numeric count question) give None.
    Each visit draws one symmetry for its image and every text it reads (symmetry.py); `unaugmented`
    counts the visits that kept the identity because a text the task reads names a side unclearly.
    """

    def __init__(self, task: str, vocabs: TextVocabs, transform: ImageTransform, caption_max_len: int,
                 question_max_len: int, train: bool, per_visit: int = 0,
                 band_norms: dict[str, BandNorm] | None = None):
        self.task, self.vocabs, self.transform, self.train = task, vocabs, transform, train
        self.definition = registry.get(task)  # the registered Task: what a row of it holds
        self.band_norms = band_norms or {}  # corpus -> its per-band (mean, std); corpora without use none
        self.caption_max_len, self.question_max_len = caption_max_len, question_max_len
        self.per_visit = per_visit or MAX_QUESTIONS_PER_VISIT
        self.class_index = {name: i for i, name in enumerate(vocabs.classes)}
        self.tag_index = {name: i for i, name in enumerate(vocabs.tags)}
        self.unaugmented = 0

    def __call__(self, sample: Sample, rng: np.random.Generator | None, image_rng: np.random.Generator | None = None,
                 source: str = "", made: dict[str, torch.Tensor] | None = None) -> dict | None:
        """`rng` draws the task's picks, `image_rng` (default: `rng`) the image's symmetry and crop. `source`
        names the stored sample (corpus and index): in training, a row whose image is a function of
        (source, symmetry) carries IMAGE_KEY, so its micro-batch holds it once for every task whose row shows it.
        `made`: images transformed for other rows by IMAGE_KEY (a micro-batch's tasks show the same images),
        taken from there and added to it, so each is transformed once."""
        image_rng = image_rng or rng
        symmetry = self._symmetry(sample, image_rng)
        targets = self.definition.row(sample, self, rng, symmetry)
        if targets is None:
            return None
        key = ""  # crops and recolours (and evaluation's rows): never shared
        if self.train and source and self.transform.augment not in CROPPING_POLICIES:
            key = f"{source}@{symmetry.rotations}{'m' * symmetry.mirrored}"
        image = made.get(key) if made is not None and key else None  # (C, S, S)
        if image is None:
            image = self.transform(sample.image, image_rng, symmetry, self.band_norms.get(sample.corpus))
            if made is not None and key:
                made[key] = image  # shared, never changed: micro_batch stacks it once
        row = {"image": image, "image_id": sample.image_id, **targets}
        if self.train:
            row[IMAGE_KEY] = key
        return row

    def _symmetry(self, s: Sample, rng) -> Symmetry:
        """The visit's symmetry; the identity when any text the task may read of this image is not mappable,
        whichever texts the visit picks (so the check does not depend on the picks, and it is cached per text)."""
        symmetry = self.transform.draw_symmetry(rng)
        if symmetry == IDENTITY:
            return symmetry
        unclear = next((t for t in self.definition.texts(s) if not mappable(t)), None)
        if unclear is None:
            return symmetry
        self.unaugmented += 1
        if self.task not in _logged_unmappable:
            _logged_unmappable.add(self.task)
            log.warning("task %s: %r (image %s) names a side unclearly; visits reading such texts keep their image "
                        "unaugmented (logged once, counted per visit)", self.task, unclear, s.image_id)
        return IDENTITY

    @staticmethod
    def seen(q: dict, symmetry: Symmetry) -> dict:
        """A question/answer pair as it reads of the image moved by `symmetry`."""
        if symmetry == IDENTITY:
            return q
        answer = map_sides(q["answer"], symmetry) if isinstance(q["answer"], str) else q["answer"]
        return {**q, "question": map_sides(q["question"], symmetry), "answer": answer}

    def picked(self, items: list, rng) -> list:
        """The captions or questions this visit trains: all in evaluation, else a random subset in the stored order."""
        if not self.train or len(items) <= self.per_visit:
            return items
        return [items[i] for i in sorted(rng.choice(len(items), self.per_visit, replace=False))]

    def question(self, text: str) -> torch.Tensor:
        """(Lq,) word ids of a question, PAD-padded to model.question_max_len."""
        return torch.tensor(self.vocabs.words.encode(text, self.question_max_len, bos_eos=False))


def task_rows(samples: Iterable[Sample], make_row: TaskSamples, rng: np.random.Generator | None) -> Iterator[dict]:
    """The rows of the samples that have something for the task."""
    for sample in samples:
        if (row := make_row(sample, rng)) is not None:
            yield row


# ---- what a task reads; the evaluation pipeline ----


@dataclass
class TaskStreamSpec:
    """Everything a task's stream needs, built once in the main process and sent to loader workers."""

    task: str
    corpora: list[CorpusShards]
    weights: list[float]
    rows: TaskSamples
    max_bad_fraction: float

    def shards(self) -> list[Shard]:
        return [s for c in self.corpora for s in c.shards]


def task_stream_spec(cfg, vocabs: TextVocabs, task: str, split: str, transform: ImageTransform,
                     train: bool) -> TaskStreamSpec:
    task_cfg = getattr(cfg.tasks, task)
    corpora = [corpus_shards(cfg.data.root, c, split, task) for c in task_cfg.corpora]
    per_visit_key = registry.get(task).per_visit_key
    per_visit = getattr(task_cfg, per_visit_key) if per_visit_key else 0
    rows = TaskSamples(task, vocabs, transform, cfg.model.caption_max_len, cfg.model.question_max_len, train,
                       per_visit, {c.corpus: c.band_norm for c in corpora if c.band_norm is not None})
    weights = corpus_weights(cfg, task, corpora) if train else [1.0] * len(corpora)
    return TaskStreamSpec(task, corpora, weights, rows, cfg.data.max_bad_fraction)


def split_shards(shards: list[Shard], rank: int, world_size: int, worker: int, num_workers: int) -> list[Shard]:
    """The node splitter, then the worker splitter: disjoint slices whose union is `shards`."""
    return shards[rank::world_size][worker::num_workers]


def eval_stream(spec: TaskStreamSpec, shards: list[Shard], counts: StreamCounts) -> wds.DataPipeline:
    """Finite task rows of `shards`, in order, each sample once."""
    return wds.DataPipeline(
        lambda: iter([{"url": s.url, "samples": s.samples} for s in shards]),  # (a list would be spliced in)
        lambda shard_dicts: read_shards(shard_dicts, counts),
        lambda raws: decode_samples(raws, counts),
        lambda samples: task_rows(samples, spec.rows, None),
    )

