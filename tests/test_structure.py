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


def test_earlier_import_paths_and_names_still_work_with_a_warning():
    pytest.importorskip("fastapi")
    import doe.serve
    import doe.serve.app
    from doe.runtime import UnplugAndPlay, check_experts
    from doe.serve import ServeConfig, schemas

    with pytest.warns(DeprecationWarning, match="doe.runtime.check_experts"):
        assert doe.serve.check_experts is check_experts
    assert doe.serve.app.ApiError is schemas.ApiError  # still imported there
    for name in ("ClassifyItem", "GenerateRequest", "ErrorBody"):
        with pytest.warns(DeprecationWarning, match=f"doe.serve.schemas.{name}"):
            assert getattr(doe.serve.app, name) is getattr(schemas, name)
    with pytest.raises(AttributeError):
        doe.serve.app.NoSuchName  # noqa: B018
    config = ServeConfig(max_length=64, token_budget=256)
    with pytest.warns(DeprecationWarning, match="max_length"):
        assert config.max_tokens == 64

    from tiny_models import make_tiny, tiny_tokenizer

    rt = UnplugAndPlay(make_tiny("bert", head=False), tiny_tokenizer(["a b"]), history=3)
    rt.records.extend(["r1", "r2", "r3", "r4"])  # bounded, and sliced like the list it was
    assert rt.records[-2:] == ["r3", "r4"] and rt.records[0] == "r2" and len(rt.records) == 3
