"""Where a benchmark's work runs: this process, a local process pool, or a Ray cluster.

An executor takes a function and a list of tasks and yields ``(index, result)`` as each task
finishes, in whatever order they finish. The functions it runs (:mod:`goodnet.bench.cell`)
never raise; an executor yields an exception object instead of a result only when the worker
itself died (killed, out of memory), and the runner records that as the cell's failure. A dead
worker breaks a process pool for every task in it, so the pool is given at most one task per
worker at a time: when it breaks, the tasks in flight become suspects, the others go on in a
fresh pool, and each suspect is then run alone; a task that kills its worker alone too is
reported failed, and the innocent ones finish.

- ``local`` with ``workers=0``: one task after another in this process.
- ``local`` with ``workers=N``: a pool of N spawned processes (spawn, not fork: PyTorch's thread
  pools do not survive a fork).
- ``ray``: each task a Ray task reserving ``threads`` CPUs, on the cluster at ``address`` or on
  a local instance of ``workers`` CPUs (``pip install goodnet[ray]``).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
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
        """While the grid runs, SIGTERM unwinds like Ctrl-C, so that the pool's workers are
        stopped with it instead of running on, orphaned."""
        with _terminate_unwinds():
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
        suspects: set[int] = set()
        while todo:  # a dead worker breaks the whole pool: start a new one for what is left
            clean = [index for index in todo if index not in suspects]
            # A suspect runs alone, so that only the task that kills its worker is blamed.
            order, width = (clean, self.workers) if clean else ([min(todo)], 1)
            queue = iter(order)
            pool = ProcessPoolExecutor(width, mp_context=context)
            pending: dict[Any, int] = {}
            in_flight: set[int] = set()  # the tasks a broken pool was running
            try:
                for index in itertools.islice(queue, width):
                    pending[pool.submit(fn, *todo[index])] = index
                while pending:
                    running[0] = len(pending)
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    broken = [f for f in done if isinstance(f.exception(), BrokenProcessPool)]
                    for future in done.difference(broken):
                        index = pending.pop(future)
                        del todo[index]
                        error = future.exception()
                        yield index, error if error is not None else future.result()
                    if broken:
                        in_flight = set(pending.values())
                        break
                    for index in itertools.islice(queue, width - len(pending)):
                        pending[pool.submit(fn, *todo[index])] = index
            except BaseException:  # stopped (Ctrl-C, SIGTERM, the caller gave up): stop them
                _stop_workers(pool)
                raise
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            if width == 1 and not clean:  # it died alone: it is the one
                for index in in_flight:
                    del todo[index]
                    yield index, RuntimeError("its worker process died twice (killed or out "
                                              "of memory), the second time running alone")
            suspects |= in_flight
        running[0] = 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was, so that ``finally`` blocks run."""


@contextlib.contextmanager
def _terminate_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes (a running task is not cancelled by shutdown)."""
    processes = dict(getattr(pool, "_processes", None) or {})
    for process in processes.values():
        if process.is_alive():
            process.terminate()
    for process in processes.values():
        process.join(timeout=5)


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
