"""The thread pool that runs jobs. It knows nothing of YAML or SQL: it runs
callables, at most `max_workers` at a time, and hands back their results.

A thread can be given up on (`abandon`: a job stuck past its deadline that
nothing can stop): it no longer counts, and a new thread takes its place, so
that runs queued behind it still start and a batch never waits for it."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


class WorkerPool:
    """A bounded pool of job threads (named job_0, job_1, ... in the logs)."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "job") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._guard = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0              # threads waiting for work
        self._abandoned: set[Future] = set()   # runs whose thread was given up on
        self._started = 0           # threads started, for their names
        self._closed = False

    def submit(self, task: Callable[..., T], *args, **kwargs) -> Future:
        future: Future = Future()
        with self._guard:
            if self._closed:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._work.put((future, task, args, kwargs))
            self._add_thread_if_needed()
        return future

    def abandon(self, future: Future) -> None:
        """The thread running `future` is given up on (stuck in its job): it no
        longer counts, and another takes its place. Should it ever come back, it
        ends instead of taking more work."""
        with self._guard:
            if future.done() or future in self._abandoned:
                return
            self._abandoned.add(future)
            if not self._closed and not self._work.empty():
                self._add_thread_if_needed()

    def _add_thread_if_needed(self) -> None:
        """With the guard held: a new thread when none is idle and there is room."""
        if self._idle > 0:
            self._idle -= 1          # that one takes the work just queued
            return
        if len(self._threads) < self.max_workers + len(self._abandoned):
            # A daemon thread: an idle one must not hold up the interpreter's exit
            # (a busy one at exit is a stuck one, which the worker never waits for).
            thread = threading.Thread(target=self._work_loop, daemon=True,
                                      name=f"{self._prefix}_{self._started}")
            self._started += 1
            self._threads.append(thread)
            thread.start()

    def _work_loop(self) -> None:
        while True:
            item = self._work.get()
            if item is None:         # shut down: pass it on to the next thread
                self._work.put(None)
                return
            future, task, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(task(*args, **kwargs))
                except BaseException as exc:  # the caller reads it from the future
                    future.set_exception(exc)
            del task, args, kwargs     # nothing of a finished run kept while idle
            with self._guard:
                if future in self._abandoned:     # replaced meanwhile: end here
                    self._abandoned.discard(future)
                    self._threads.remove(threading.current_thread())
                    return
                del future
                if self._closed:
                    continue
                if not self._work.empty():
                    continue         # more queued than threads: take the next at once
                self._idle += 1

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """No new work; with `cancel_pending` the queued runs are cancelled; with
        `wait` the threads are joined (a stuck one would hold this up)."""
        with self._guard:
            self._closed = True
            threads = list(self._threads)
        if cancel_pending:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown(wait=True, cancel_pending=exc_info[0] is not None)
