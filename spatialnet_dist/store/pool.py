"""Where conversion tasks run: in this process, in N local processes (`--workers N`), or as Ray tasks
on a cluster (`--ray`). A task is a module-level function with picklable arguments and result; the
writer submits tasks and takes their results in submission order, whichever pool runs them.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor

from spatialnet_dist.errors import UserError


class TaskPool:
    """`workers` 1: tasks run here at submit. >1: a pool of that many processes on this machine.
    `use_ray`: Ray tasks of one CPU each on the cluster of RAY_ADDRESS (or a local instance), as many
    at once as the cluster has CPUs. `capacity` is how many tasks can run at once."""

    def __init__(self, workers: int = 1, use_ray: bool = False):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise UserError(f"--workers {workers!r}: must be a positive integer")
        self._ray = self._processes = None
        self._remotes: dict[Callable, object] = {}  # fn -> its Ray remote function, registered once
        self._started_ray = False
        if use_ray:
            self._ray, self._started_ray = _connect_ray()
            self.capacity = max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        elif workers > 1:
            # forkserver: children start clean, not as copies of a parent that holds threads (tqdm, boto3).
            # The fork server keeps the environment of its start; workers take this process's now (AWS settings).
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["spatialnet_dist.store.writer"])  # imported once, not per worker
            self._processes = ProcessPoolExecutor(
                workers, mp_context=context, initializer=_set_environment, initargs=(dict(os.environ),)
            )
            self.capacity = workers
        else:
            self.capacity = 1

    def submit(self, fn: Callable, *args):
        if self._ray is not None:
            if fn not in self._remotes:
                self._remotes[fn] = self._ray.remote(num_cpus=1, max_retries=2)(fn)
            return self._remotes[fn].remote(*args)
        if self._processes is not None:
            return self._processes.submit(fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))  # an exception raises here, at submit
        return done

    def result(self, handle):
        """The task's return value; a task's exception is raised here as itself (one line, not Ray's traceback)."""
        if self._ray is None:
            return handle.result()
        try:
            return self._ray.get(handle)
        except self._ray.exceptions.RayTaskError as e:
            raise e.cause from None

    def close(self) -> None:
        """Stop: running tasks finish (processes) or end (a Ray this pool started); queued ones are dropped."""
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)
            self._processes = None
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> TaskPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _set_environment(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)


def _connect_ray():
    """-> (ray, whether this call started it): the cluster training uses, or a local instance on loopback
    (ray_cluster.connect_ray); tasks get the settings training workers get."""
    from spatialnet_dist.ray_cluster import connect_ray

    started = connect_ray()
    import ray

    return ray, started
