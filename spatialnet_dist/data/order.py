"""The global training order: which sample is row g of a task, as a pure function of (seed, stream, g).

For each task, the training rows of the whole run form one global sequence. Its corpora are
interleaved by a fixed periodic slot pattern (`slot_pattern`: PERIOD slots, each corpus's share
of the slots following its mixing weight, spread evenly), so the number of rows a corpus has
given before row g is known in closed form. The j-th row of corpus c is sample
perm(seed, stream, c, e)[j mod N_c] of that corpus, with e = j // N_c its epoch and perm a seeded
permutation of its N_c samples: every epoch of a corpus visits each of its samples once, in a new
order. With one corpus, epoch e = g // N.

The sequence is seeded by the task's stream (`order_stream`: its corpora and their weights), not by
the task: tasks that read the same corpora with the same weights visit the same sample at row g, with
the same symmetry (`row_rng(seed, stream, g, k)` draws it), so with equal batch sizes their rows of a
micro-batch show the same images, and the model runs its encoder once per image (model/spatialnet.py).

Micro-batch m of a task with per-rank batch b on W ranks takes global rows
[R + m'*b*W, R + (m'+1)*b*W), m' the micro-batches of that task before m (m' = m unless
`train.mode: alternate`), and rank r the slice of b rows at r*b in it. So the order is the same
for any number of ranks and loader workers, and a stream's position is just m.

Alternate mode: the micro-batches are cut in blocks of T (the number of tasks); each block is
a seeded permutation of the tasks, so micro-batch m's task and the count of each task before m
are closed-form functions of (seed, m).

A sample that cannot be used (bad bytes, missing from a truncated shard, nothing for the task) is
replaced by candidate k = 1, 2, ... of its row: a sample of the same corpus drawn from an RNG
seeded by (seed, stream, g, k). Row g's per-row randomness comes from `row_rng(seed, stream, g, k)`
(the image's symmetry and crop) and `row_rng(seed, task, g, k)` (the task's picks of questions and
captions), so a row is the same whichever rank or loader worker makes it.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass

import numpy as np

PERIOD = 1000  # slots of the corpus pattern: weights are honoured to 1/PERIOD of the rows


def stream_seed(*parts) -> int:
    """A 64-bit seed from any tuple of ints and strings, identical in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def row_rng(seed: int, name: str, row: int, attempt: int) -> np.random.Generator:
    """The RNG of row `row`, candidate `attempt`, of a stream or task `name`."""
    return np.random.default_rng([stream_seed(seed, name), row, attempt])


def order_stream(corpora: list[str], weights: list[float]) -> str:
    """The name that seeds a task's order: the same for every task reading these corpora with these weights."""
    return f"corpora={corpora} weights={[float(w) for w in weights]}"


def slot_pattern(weights: list[float], period: int = PERIOD) -> list[int]:
    """The corpus of each slot of one period: corpus c gets round(period * its share) slots (largest
    remainders), interleaved by smooth weighted round robin so every window of the pattern is mixed."""
    if len(weights) == 1:
        return [0]
    total = sum(weights)
    exact = [period * w / total for w in weights]
    quota = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda c: (quota[c] - exact[c], c))
    for c in by_remainder[: period - sum(quota)]:
        quota[c] += 1
    current, pattern = [0] * len(weights), []
    for _ in range(period):
        current = [cur + q for cur, q in zip(current, quota)]
        c = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[c] -= period
        pattern.append(c)
    return pattern


class TaskOrder:
    """Global row g of a task reading `stream` (`order_stream`) -> (corpus index, sample index in that
    corpus), for attempt k >= 0."""

    def __init__(self, seed: int, stream: str, sizes: list[int], weights: list[float]):
        self.seed, self.stream, self.sizes = seed, stream, sizes
        self.pattern = slot_pattern(weights)
        self.per_period = [self.pattern.count(c) for c in range(len(sizes))]
        self.before = []  # before[s][c]: slots of corpus c in pattern[:s]
        counts = [0] * len(sizes)
        for c in self.pattern:
            self.before.append(list(counts))
            counts[c] += 1
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}  # corpus -> (epoch, its permutation)

    def sample(self, row: int, attempt: int = 0) -> tuple[int, int]:
        period, slot = divmod(row, len(self.pattern))
        corpus = self.pattern[slot]
        if attempt:  # a substitute: any sample of the same corpus, so the mix keeps its weights
            return corpus, int(row_rng(self.seed, f"{self.stream}/substitute", row, attempt).integers(self.sizes[corpus]))
        j = period * self.per_period[corpus] + self.before[slot][corpus]  # rows of this corpus before row g
        epoch, position = divmod(j, self.sizes[corpus])
        return corpus, int(self._permutation(corpus, epoch)[position])

    def _permutation(self, corpus: int, epoch: int) -> np.ndarray:
        # The current epoch's permutation of each corpus is kept: rows are made in order, so it is reused.
        kept = self._permutations.get(corpus)
        if kept is None or kept[0] != epoch:
            seeded = np.random.default_rng([stream_seed(self.seed, self.stream, corpus), epoch])
            kept = self._permutations[corpus] = (epoch, seeded.permutation(self.sizes[corpus]))
        return kept[1]


@dataclass(frozen=True)
class ShardSpan:
    """The shards of a corpus as one sequence of samples: sample i -> (shard, position in it)."""

    starts: list[int]  # starts[s]: index of shard s's first sample

    @classmethod
    def of(cls, samples_per_shard: list[int]) -> ShardSpan:
        starts, n = [], 0
        for k in samples_per_shard:
            starts.append(n)
            n += k
        return cls(starts)

    def locate(self, sample: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, sample) - 1
        return shard, sample - self.starts[shard]


# ---- micro-batches ----


def alternate_task(seed: int, index: int, tasks: list[str]) -> str:
    """The task of micro-batch `index` in alternate mode: block index // T is a seeded permutation of the T tasks."""
    block, slot = divmod(index, len(tasks))
    return _block(seed, block, tuple(tasks))[slot]


def _block(seed: int, block: int, tasks: tuple[str, ...]) -> list[str]:
    order = list(tasks)
    random.Random(stream_seed(seed, block)).shuffle(order)
    return order


def batches_before(seed: int, index: int, tasks: list[str], alternate: bool) -> dict[str, int]:
    """Micro-batches of each task among micro-batches 0 .. index-1."""
    if not alternate:
        return dict.fromkeys(tasks, index)
    block, slot = divmod(index, len(tasks))
    head = _block(seed, block, tuple(tasks))[:slot]
    return {t: block + (t in head) for t in tasks}


def rank_rows(start: int, batch_size: int, rank: int) -> range:
    """Global rows of `rank` in the micro-batch whose global rows begin at `start`."""
    return range(start + rank * batch_size, start + (rank + 1) * batch_size)
