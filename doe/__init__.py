"""DoE: Decomposition of Experts. Run only the FFN neurons a task needs, and put the rest back.

    result = doe.find_expert(model, tokenizer, "offline_sentiment")  # tune, score, localize
    with doe.unplugged(model, result.expert):                        # gathered FFNs, no copy
        model(**batch)
                                                                     # original modules back, exactly

Names are imported on first use, so ``import doe`` (and ``doe --help``) does not load torch.
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

_EXPORTS = {
    "doe.architectures": ("SUPPORTED_MODEL_TYPES", "FFNBlock", "FFNSpec", "find_ffn_blocks", "get_ffn_specs",
                          "register_architecture"),
    "doe.attribution": ("AttributionConfig", "NeuronScores", "score_neurons"),
    "doe.evaluate": ("EvalReport", "evaluate"),
    "doe.expert": ("TaskExpert", "model_fingerprint"),
    "doe.locking": ("model_lock",),
    "doe.localize": ("ExpertSearchConfig", "ExpertSearchResult", "LocalizationConfig", "find_expert", "localize"),
    "doe.prompt": ("PromptTuningConfig", "TaskModel", "prompt_tune"),
    "doe.router": ("TaskRouter",),
    "doe.requests": ("Request", "Result"),
    "doe.runtime": ("UnplugAndPlay",),
    "doe.tasks": ("TaskSpec", "get_task", "load_task", "local_task", "register_task"),
    "doe.unplug": ("Installed", "check_expert", "compact_memory", "current_expert", "installed", "is_unplugged",
                   "mixed_batch", "release_compact", "restore_", "unplug_", "unplugged"),
    "doe_kernels._version": ("__version__",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(n for n in _WHERE if n != "__version__")


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: doe.unplug, doe.cli, ...
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # what static analysers and IDEs see
    from doe.architectures import (
        SUPPORTED_MODEL_TYPES,
        FFNBlock,
        FFNSpec,
        find_ffn_blocks,
        get_ffn_specs,
        register_architecture,
    )
    from doe.attribution import AttributionConfig, NeuronScores, score_neurons
    from doe.evaluate import EvalReport, evaluate
    from doe.expert import TaskExpert, model_fingerprint
    from doe.locking import model_lock
    from doe.localize import ExpertSearchConfig, ExpertSearchResult, LocalizationConfig, find_expert, localize
    from doe.prompt import PromptTuningConfig, TaskModel, prompt_tune
    from doe.router import TaskRouter
    from doe.requests import Request, Result
    from doe.runtime import UnplugAndPlay
    from doe.tasks import TaskSpec, get_task, load_task, local_task, register_task
    from doe.unplug import (
        Installed,
        check_expert,
        compact_memory,
        current_expert,
        installed,
        is_unplugged,
        mixed_batch,
        release_compact,
        restore_,
        unplug_,
        unplugged,
    )
    from doe_kernels._version import __version__
