"""Corpus adapters by name, and `convert`: an original corpus -> a corpus in the shard store.

Adding a corpus is one file (an object with `name`, `classes`, `description` and
`records(src) -> Iterator[Sample | BadRecord]`, see `base.Adapter`) plus one line in `ADAPTERS`;
a corpus in the layouts of `imagefolder`, `jsonl` or `csv` needs no code at all.
shards/README.md tells the whole story.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections import Counter
from pathlib import Path

from spatialnet_dist.corpora.base import Adapter, BadRecord, describe_tags_source
from spatialnet_dist.corpora.imagefolder import ImageFolder
from spatialnet_dist.corpora.record_file import RecordFile
from spatialnet_dist.corpora.rsvqa_lr import RSVQA_HR, RSVQA_LR
from spatialnet_dist.corpora.ucm_captions import RSICD, SYDNEY_CAPTIONS, UCM_CAPTIONS
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import DEFAULT_QUALITY, FIT_RULE, check_image_format
from spatialnet_dist.store.writer import DEFAULT_SHARD_BYTES, MIN_SHARDS, ShardWriter

BAD_RECORDS_SHOWN = 20  # printed one by one; the rest are counted


class SyntheticCorpus:
    """The procedural demo corpus of corpora/synthetic/. It is generated, not converted, so it
    has no source folder: `spatialnet shards synth OUT` writes it. The module is imported only when
    its classes are asked for."""

    name = "synthetic"
    image_size = None  # every generated image has the renderer's size
    description = "synthetic: procedural aerial-like scenes with true captions, labels and Q/A (the demo corpus)"

    @property
    def classes(self) -> list[str]:
        from spatialnet_dist.corpora.synthetic import CLASSES

        return CLASSES

    def records(self, src: Path):
        raise UserError("the synthetic corpus is generated, not converted: run `spatialnet shards synth OUT`")


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (UCM_CAPTIONS, RSICD, SYDNEY_CAPTIONS, RSVQA_LR, RSVQA_HR, ImageFolder(), RecordFile("jsonl"),
              RecordFile("csv"), SyntheticCorpus())
}
# Options of some adapters, by their field name: the flag that sets it. imagefolder, jsonl and csv read no
# splits or classes from their source, and convert image-only corpora (--unlabeled); ucm-captions merges the
# UC Merced multi-label table.
SOURCE_OPTIONS = {"split_ratio": "--split-ratio", "class_file": "--classes", "split_seed": "--split-seed",
                  "unlabeled": "--unlabeled", "val_fraction": "--val-fraction", "tags_file": "--tags"}


def _takes(adapter: Adapter, option: str) -> bool:
    return dataclasses.is_dataclass(adapter) and option in {f.name for f in dataclasses.fields(adapter) if f.init}


def get_adapter(name: str, **options) -> Adapter:
    """A copy of the adapter `name` for one conversion (adapters may learn their classes from the source),
    with `options` (keys of SOURCE_OPTIONS) set; an adapter that takes no such option refuses it."""
    try:
        adapter = ADAPTERS[name]
    except KeyError:
        raise UserError(f"unknown corpus adapter {name!r} (known: {', '.join(ADAPTERS)})") from None
    refused = [option for option in options if not _takes(adapter, option)]
    if refused:
        flag = SOURCE_OPTIONS[refused[0]]
        takers = ", ".join(n for n, a in ADAPTERS.items() if _takes(a, refused[0]))
        raise UserError(f"{flag}: adapter {name} does not take {flag} (only {takers} do)")
    return dataclasses.replace(adapter, **options) if options else copy.copy(adapter)


class _TooManyBad(Exception):
    """Raised inside the writer's block so that it discards what it wrote and keeps the old corpus."""


def convert(
    adapter: str | Adapter,
    src: str | Path,
    out: str,
    shard_size: int | None = None,
    name: str | None = None,
    strict: bool = False,
    max_bad_fraction: float = 0.05,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    min_shards: int = MIN_SHARDS,
    shuffle_seed: int = 0,
    image_format: str = "png",
    quality: int = DEFAULT_QUALITY,
    workers: int = 1,
    use_ray: bool = False,
) -> int:
    """Convert the corpus at `src` (published layout) into corpus `name` (default: the adapter's)
    under the store root `out`. Returns the exit code: 0, or 1 when more than `max_bad_fraction` of
    the records are bad, in which case nothing is written and a corpus already there is kept.
    Bad records are skipped, named on stderr and counted; `strict` stops at the first (UserError).
    Each split is shuffled with `shuffle_seed` into shards of about `shard_bytes`, at least
    `min_shards` of them, at most `shard_size` samples each (see `store.writer.shard_counts`). 8-bit images
    are stored as `image_format` at `quality` where it holds them (store.schema.IMAGE_FORMATS).
    Images are fitted and encoded, and shards written, by `workers` local processes or by Ray tasks
    (`use_ray`); the shards are the same whichever (see `store.writer`)."""
    ad = get_adapter(adapter) if isinstance(adapter, str) else adapter
    corpus = name or ad.name
    cap = 1 if shard_size is None else shard_size
    sizes = (("--shard-size", cap), ("--shard-bytes", shard_bytes), ("--min-shards", min_shards), ("--workers", workers))
    for flag, value in sizes:
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if shuffle_seed < 0:
        raise UserError(f"--shuffle-seed {shuffle_seed}: must be at least 0")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction {max_bad_fraction}: must be between 0 and 1")
    check_image_format(image_format, quality)
    records = ad.records(Path(src))  # a missing or malformed source file fails here, before any writing
    tags_source = getattr(ad, "tags_source", None)  # set by records when tags came from a table beside the corpus

    samples_per_split: Counter = Counter()
    seen_ids: set[str] = set()
    n_bad = 0

    def skip(bad: BadRecord) -> None:
        nonlocal n_bad
        if strict:
            raise UserError(f"bad record {bad} (--strict: stopped at the first, nothing written)")
        n_bad += 1
        if n_bad <= BAD_RECORDS_SHOWN:
            print(f"bad record: {bad}", file=sys.stderr)

    try:
        writer = ShardWriter(
            out,
            corpus,
            source=f"{ad.name} {src}",
            classes=ad.classes,
            shard_size=shard_size,
            shard_bytes=shard_bytes,
            min_shards=min_shards,
            shuffle_seed=shuffle_seed,
            image_size=ad.image_size,
            tags_source=tags_source,
            image_format=image_format,
            quality=quality,
            workers=workers,
            use_ray=use_ray,
        )
        with writer:
            for rec in records:
                if isinstance(rec, BadRecord):
                    skip(rec)
                elif rec.image_id in seen_ids:
                    skip(BadRecord(f"{rec.split} image {rec.image_id}", str(src), "duplicate image_id"))
                else:
                    seen_ids.add(rec.image_id)
                    rec.corpus = corpus
                    writer.write(rec)
                    samples_per_split[rec.split] += 1
            n_good = sum(samples_per_split.values())
            if n_bad > BAD_RECORDS_SHOWN:
                print(f"... and {n_bad - BAD_RECORDS_SHOWN} more bad records", file=sys.stderr)
            if n_good == 0 or n_bad / (n_good + n_bad) > max_bad_fraction:
                raise _TooManyBad
    except _TooManyBad:
        total = n_good + n_bad
        print(
            f"convert {corpus}: {n_bad} of {total} records bad ({n_bad / max(total, 1):.1%}, allowed "
            f"{max_bad_fraction:.1%} by --max-bad-fraction): corpus not written, the store is unchanged",
            file=sys.stderr,
        )
        return 1
    splits = ", ".join(f"{split} {n}" for split, n in samples_per_split.items())
    shards = sum(len(counts.shards) for counts in writer.splits.values())
    print(f"convert {corpus}: {n_good} samples ({splits}) in {shards} shards -> {out}; {n_bad} bad records skipped")
    if tags_source is not None:
        print(f"convert {corpus}: {describe_tags_source(tags_source)}")
    resized = sum(counts.resized for counts in writer.splits.values())
    if resized:
        h, w = ad.image_size
        print(f"convert {corpus}: {resized} images of another size fitted to {h}x{w} ({FIT_RULE})")
    return 0
