"""The recorder's writer thread: one thread, a bounded queue, errors re-raised on the caller."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from .errors import RecorderError


class BackgroundWriter:
    """One writer thread, a bounded queue (back-pressure), errors re-raised on the caller."""

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="aftune-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
                self.error = e
            finally:
                self._queue.task_done()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise RecorderError("write_failed", f"recording stopped: {self.error}") from self.error

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_if_failed()
        self._queue.put(job)

    def flush(self) -> None:
        self._queue.join()
        self.raise_if_failed()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
