"""A worker thread that owns the model: started once, stopped gracefully (the queue drains)."""

from __future__ import annotations

import threading
from typing import Optional

__all__ = ["Worker"]


class Worker:
    """Runs ``self._loop`` in a daemon thread. Subclasses set ``_cond`` (a Condition),
    ``_stopping`` (False) and ``_thread`` (None) in ``__init__``; ``_loop`` returns once
    ``_stopping`` is set and its work is done."""

    thread_name = "doe-worker"
    _cond: threading.Condition
    _stopping: bool
    _thread: Optional[threading.Thread]

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__}.start: already started")
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Take no more work, finish what was taken, end the worker; True when it ended in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        raise NotImplementedError
