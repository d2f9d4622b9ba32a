"""Where a benchmark's work runs: this process, a local process pool, or a Ray cluster.

An executor takes a function and a list of tasks and yields ``(index, result)`` as each task
finishes, in whatever order they finish. The functions it runs (:mod:`goodnet.bench.cell`)
never raise; an executor yields an exception object instead of a result only when the worker
itself died (killed, out of memory), and the runner records that as the cell's failure. A dead
worker breaks a process pool for every task in it: the unfinished tasks get a fresh pool, and a
task whose pool breaks twice is reported failed.

- ``local`` with ``workers=0``: one task after another in this process.
- ``local`` with ``workers=N``: a pool of N spawned processes (spawn, not fork: PyTorch's thread
  pools do not survive a fork).
- ``ray``: each task a Ray task reserving ``threads`` CPUs, on the cluster at ``address`` or on
  a local instance of ``workers`` CPUs (``pip install goodnet[ray]``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from goodnet.errors import GoodnetError

Outcome = Iterator[tuple[int, Any]]


@dataclass(frozen=True)
class LocalExecutor:
    """In-process (``workers=0``) or a pool of ``workers`` processes."""

    workers: int = 0
    name = "local"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple], *, running: list[int]) -> Outcome:
        if self.workers <= 0:
            for index, args in enumerate(tasks):
                running[0] = 1
                result = fn(*args)
                running[0] = 0
                yield index, result
            return
        context = multiprocessing.get_context("spawn")
        todo = dict(enumerate(tasks))
        deaths: dict[int, int] = {}
        while todo:  # a dead worker breaks the whole pool: start a new one for what is left
            pool = ProcessPoolExecutor(self.workers, mp_context=context)
            try:
                pending = {pool.submit(fn, *args): index for index, args in todo.items()}
                while pending:
                    running[0] = min(self.workers, len(pending))
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    broken = False
                    for future in done:
                        index = pending.pop(future)
                        error = future.exception()
                        if isinstance(error, BrokenProcessPool):
                            broken = True
                            continue
                        del todo[index]
                        yield index, error if error is not None else future.result()
                    if broken:
                        break
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            for index in list(todo):  # every unfinished task was in the broken pool
                deaths[index] = deaths.get(index, 0) + 1
                if deaths[index] >= 2:
                    del todo[index]
                    yield index, RuntimeError("its worker process died twice (killed or out "
                                              "of memory)")
        running[0] = 0


@dataclass(frozen=True)
class RayExecutor:
    """Ray tasks, on an existing cluster (``address``) or a local instance of ``workers`` CPUs."""

    workers: int = 0
    address: str | None = None
    threads: int = 1
    name = "ray"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Ray, started (or joined) once for the whole grid, and shut down after."""
        try:
            import ray
        except ImportError:
            raise GoodnetError("the ray executor needs Ray: pip install 'goodnet[ray]'") from None
        started = not ray.is_initialized()
        if started:
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "configure_logging": False}
            if self.address:
                ray.init(address=self.address, **options)
            else:
                ray.init(num_cpus=self._local_cpus(), **options)
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    def _local_cpus(self) -> int:
        return self.workers or os.cpu_count() or 1

    def run(self, fn: Callable[..., Any], tasks: Sequence[tuple], *, running: list[int]) -> Outcome:
        import ray

        # A task reserving more CPUs than a local instance has would wait for ever.
        cpus = self.threads if self.address else min(self.threads, self._local_cpus())
        remote = ray.remote(num_cpus=cpus, max_retries=0)(fn)
        pending = {remote.remote(*args): index for index, args in enumerate(tasks)}
        while pending:
            running[0] = len(pending)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    yield index, ray.get(ref)
                except Exception as error:  # a dead worker: the cell fails, the grid goes on
                    yield index, error
        running[0] = 0


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(name: str, workers: int = 0, address: str | None = None,
                  threads: int = 1) -> LocalExecutor | RayExecutor:
    if workers < 0:
        raise GoodnetError(f"--workers must be 0 or more, got {workers}")
    if name == "local":
        if address:
            raise GoodnetError("--address is for the ray executor")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, address, threads)
    raise GoodnetError(f"unknown executor {name!r} (choose from {', '.join(EXECUTORS)})")
