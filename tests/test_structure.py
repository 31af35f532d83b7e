"""Structure: every public function or class has one home module.

A module that is not a package face (an ``__init__``) lists in ``__all__`` only what it
defines, so each name is importable from its home and from package faces, never from a
sibling that happens to import it.
"""

import importlib
import inspect
import pkgutil

import pytest

import doe
import doe_kernels

OPTIONAL = ("doe.serve.",)  # the [serve] extra (fastapi, uvicorn, prometheus-client)


def _modules():
    for pkg in (doe, doe_kernels):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.ispkg and not info.name.rsplit(".", 1)[-1].startswith("__"):
                yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_a_module_exports_only_what_it_defines(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional extra that is not installed
        if name.startswith(OPTIONAL):
            pytest.skip(f"{name}: {exc}")
        raise
    foreign = []
    for attr in getattr(module, "__all__", []):
        obj = getattr(module, attr)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ != name:
            foreign.append(f"{attr} (defined in {obj.__module__})")
    assert not foreign, f"{name}.__all__ re-exports {foreign}: import them from their home instead"


def test_the_lock_has_one_home():
    from doe import locking, unplug

    assert doe.model_lock is locking.model_lock and "model_lock" not in unplug.__all__
