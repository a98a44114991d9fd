"""Training rows by global index: row g of a task, made the same in any process (data/order.py).

Row g is the sample the task's order puts there, read by position from its shard
(data/indexed.py), decoded (images from the loader worker's ImageCache when it holds them) and
made into a row by `TaskSamples` with the RNGs of (seed, stream, g, attempt) for its image and (seed, task,
g, attempt) for the task's picks (data/order.py), its corpus and index naming the image. A sample that is bad
(undecodable, missing from a truncated shard) is counted in `StreamCounts.skipped`, and one that
gives the task nothing is passed over; either way the row takes the order's next candidate,
attempt 1, 2, ..., so the substitute is deterministic too. USELESS_RUN_LIMIT candidates in a
row without a row stop the run naming the task.
"""

from __future__ import annotations

from spatialnet_dist.data.indexed import ShardReader
from spatialnet_dist.data.order import ShardSpan, TaskOrder, order_stream, row_rng
from spatialnet_dist.data.streams import (
    BAD_CHECK_MIN_SHARDS,
    ImageCache,
    Shard,
    StreamCounts,
    TaskStreamSpec,
    decode_one,
)
from spatialnet_dist.errors import UserError
from spatialnet_dist.store.schema import Sample
from spatialnet_dist.store.shard_tar import count_problem

# Training stops when this many candidates of one row in a row give the task nothing (e.g. no labels).
USELESS_RUN_LIMIT = 1000


class TaskRows:
    """Rows of one task's global training sequence, in one process (a loader worker or the main one)."""

    def __init__(self, spec: TaskStreamSpec, seed: int, reader: ShardReader, images: ImageCache | None = None):
        self.spec, self.seed, self.reader, self.images = spec, seed, reader, images
        self.stream = order_stream([c.corpus for c in spec.corpora], spec.weights)
        self.order = TaskOrder(seed, self.stream, [c.samples for c in spec.corpora], spec.weights)
        self.spans = [ShardSpan.of([s.samples for s in c.shards]) for c in spec.corpora]
        self.counts = StreamCounts(spec.task, spec.max_bad_fraction,
                                   min_shards=min(BAD_CHECK_MIN_SHARDS, len(spec.shards())))
        self._opened: set[str] = set()

    def row(self, g: int, made: dict | None = None) -> dict:
        """`made`: the micro-batch's transformed images by image key, shared with its other tasks' rows (TaskSamples)."""
        last: Sample | None = None
        for attempt in range(USELESS_RUN_LIMIT):
            corpus, i = self.order.sample(g, attempt)
            shard, position = self.spans[corpus].locate(i)
            sample = self._sample(self.spec.corpora[corpus].shards[shard], position)
            if sample is None:
                continue
            last = sample
            row = self.spec.rows(sample, row_rng(self.seed, self.spec.task, g, attempt),
                                 row_rng(self.seed, self.stream, g, attempt), source=f"{self.spec.corpora[corpus].corpus}/{i}",
                                 made=made)
            if row is not None:
                return row
        what = f"last {last.image_id} of corpus {last.corpus}" if last else "all bad input"
        raise UserError(f"task {self.spec.task}: {USELESS_RUN_LIMIT} samples in a row with nothing for it ({what}); "
                        f"check tasks.{self.spec.task}.corpora")

    def _sample(self, shard: Shard, position: int) -> Sample | None:
        """The decoded sample, or None (counted as bad) when it is missing or cannot be decoded."""
        if shard.url not in self._opened:
            self._opened.add(shard.url)
            self.counts.shards_opened += 1
        raw = self.reader.sample(shard.url, position)  # StoreError naming the shard when it cannot be read
        if raw is None:
            index = self.reader.index(shard.url)
            reason = index.problem or count_problem(len(index.samples), shard.samples)
            self.counts.bad(shard.url, 1, reason)
            return None
        return decode_one(raw, self.counts, self.images)
