"""The thread pool that runs jobs. It knows nothing of YAML or SQL: it runs
callables, at most `max_workers` at a time, and hands back their results."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class WorkerPool:
    """A bounded pool of job threads (named job_0, job_1, ... in the logs)."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "job") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix=thread_name_prefix)

    def submit(self, task: Callable[..., T], *args, **kwargs) -> Future:
        return self._executor.submit(task, *args, **kwargs)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=cancel_pending)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown(wait=True, cancel_pending=exc_info[0] is not None)
