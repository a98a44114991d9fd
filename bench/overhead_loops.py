"""The three in-process rungs of `overhead.py`'s ladder, each stepping on ONE fixed multi-task batch built
once from the shards by the real data code (so the shapes are those of training), no data loading:

  BareLoop     the model, torch AdamW and gradient clipping, as a person would write it without the stack
  BareDDP      the same in `workers` processes under torch DDP with gloo: the gradient all-reduce a single
               bare process does not do
  EngineLoop   the Trainer's own micro-step (DeepSpeed engine forward / backward / step at the bench's
               ZeRO stage) in this process, a world of one: DeepSpeed's step and bookkeeping

Each `run(warmup, steps)` -> (rows, seconds, CPU seconds of the stepping process) of `steps` timed steps.
"""

from __future__ import annotations

import os
import queue
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spatialnet_dist import config
from spatialnet_dist.batch_format import sub_batches
from spatialnet_dist.data.batches import make_train_loader
from spatialnet_dist.model.spatialnet import build_model
from spatialnet_dist.objective import MultiTaskObjective
from spatialnet_dist.text import TextVocabs


def fixed_batch(cfg: config.Config, vocabs) -> dict:
    """One training batch from the shards through the real loader (in this process)."""
    cfg = config.from_dict(cfg.to_dict())
    cfg.data.loader_workers = 0
    loader = make_train_loader(cfg, vocabs, rank=0, world_size=1)
    batch = next(loader)
    loader.close()
    return batch


def batch_rows(batch: dict) -> int:
    return sum(len(sub["image_id"]) for sub in sub_batches(batch).values())


def timed(step, rows: int, warmup: int, steps: int) -> tuple[int, float, float]:
    """-> (rows, seconds, CPU seconds of this process) of `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return rows * steps, time.perf_counter() - start, time.process_time() - cpu


class BareLoop:
    """Model + AdamW + clipping on one fixed batch; `model` may be DDP-wrapped (bare_ddp)."""

    def __init__(self, cfg: config.Config, vocabs, batch: dict, wrap=lambda model: model):
        torch.manual_seed(cfg.run.seed)
        self.module = build_model(cfg.model, cfg.tasks.enabled(), vocabs)
        self.model = wrap(self.module)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.objective = MultiTaskObjective(cfg.loss)
        self.batch, self.clip = batch, cfg.optim.grad_clip
        self.rows = batch_rows(batch)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.objective(self.model(self.batch), self.batch, self.module)["loss"].backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()

    def run(self, warmup: int, steps: int) -> tuple[int, float, float]:
        return timed(self.step, self.rows, warmup, steps)


class EngineLoop:
    """The Trainer's micro-step on the fixed batch: what DeepSpeed adds to the bare loop's step."""

    def __init__(self, cfg: config.Config, vocabs, batch: dict):
        from spatialnet_dist import engine as ds
        from spatialnet_dist.train.trainer import Trainer, to_device

        if not dist.is_initialized():
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1")
            ds.init_distributed(use_gpu=False)
        self.trainer = Trainer.build(cfg, vocabs, rank=0, world_size=1, reporter=None, validation=None)
        self.batch = to_device(batch, self.trainer.device, self.trainer.dtype)
        self.rows = batch_rows(batch)

    def run(self, warmup: int, steps: int) -> tuple[int, float, float]:
        return timed(lambda: self.trainer._micro_step(self.batch), self.rows, warmup, steps)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, cfg_dict: dict, vocab_dict: dict, batch: dict, threads: int,
              commands, results) -> None:
    """One DDP rank: runs each (warmup, steps) segment it is sent until it gets None, and puts its (rows,
    seconds, CPU seconds) of each on `results`."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loop = BareLoop(config.from_dict(cfg_dict), TextVocabs.from_dict(vocab_dict), batch,
                        wrap=torch.nn.parallel.DistributedDataParallel)
        while (segment := commands.get()) is not None:
            dist.barrier()
            results.put(loop.run(*segment))
    finally:
        dist.destroy_process_group()


class BareDDP:
    """The bare loop under DDP in `workers` processes, kept alive between segments (built once)."""

    def __init__(self, cfg: config.Config, vocabs, batch: dict, workers: int, threads: int):
        ctx = mp.get_context("spawn")
        self.commands, self.results = [ctx.Queue() for _ in range(workers)], ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_ddp_rank, daemon=True,
                                  args=(rank, workers, port, cfg.to_dict(), vocabs.to_dict(), batch, threads,
                                        self.commands[rank], self.results))
                      for rank in range(workers)]
        for p in self.procs:
            p.start()

    def run(self, warmup: int, steps: int) -> tuple[int, float, float]:
        """-> (rows of all ranks, the slowest rank's seconds, CPU seconds of all ranks)."""
        for q in self.commands:
            q.put((warmup, steps))
        ranks = []
        while len(ranks) < len(self.procs):
            try:
                ranks.append(self.results.get(timeout=5))
            except queue.Empty:
                if any(p.exitcode for p in self.procs):
                    raise SystemExit("overhead: a bare DDP rank failed; its traceback is above") from None
        rows, seconds, cpu = zip(*ranks)
        return sum(rows), max(seconds), sum(cpu)

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join()
