"""One re-entrant lock per model, serialising switching and inference on it.

Kept outside the model (a weak-keyed table) so that ``copy.deepcopy`` and pickling of a model
still work.
"""

from __future__ import annotations

import threading
import weakref

import torch.nn as nn

__all__ = ["model_lock"]

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises switching and inference on ``model``.

    ``doe.unplugged``, ``doe.unplug_``, ``doe.restore_`` and the runtime take it. Code that
    calls ``unplug_`` and then runs the model from several threads must hold it around both.
    """
    lock = _LOCKS.get(model)
    if lock is None:
        # setdefault: one dict operation, so two threads agree on one lock without a guard
        # lock (which an interrupt between acquire and release could leave held).
        lock = _LOCKS.setdefault(model, threading.RLock())
    return lock
