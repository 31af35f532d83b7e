"""DoE: Decomposition of Experts. Run only the FFN neurons a task needs, and put the rest back.

    result = doe.find_expert(model, tokenizer, "offline_sentiment")  # tune, score, localize
    with doe.unplugged(model, result.expert):                        # gathered FFNs, no copy
        model(**batch)
                                                                     # original modules back, exactly
"""

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
from doe.localize import ExpertSearchConfig, ExpertSearchResult, LocalizationConfig, find_expert, localize
from doe.prompt import PromptTuningConfig, TaskModel, prompt_tune
from doe.router import TaskRouter
from doe.runtime import Request, Result, UnplugAndPlay
from doe.tasks import TaskSpec, get_task, load_task, local_task, register_task
from doe.unplug import (
    check_expert,
    current_expert,
    is_unplugged,
    model_lock,
    restore_,
    unplug_,
    unplugged,
)
from doe_kernels._version import __version__

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AttributionConfig",
    "EvalReport",
    "ExpertSearchConfig",
    "ExpertSearchResult",
    "FFNBlock",
    "FFNSpec",
    "LocalizationConfig",
    "NeuronScores",
    "PromptTuningConfig",
    "Request",
    "Result",
    "TaskExpert",
    "TaskModel",
    "TaskRouter",
    "TaskSpec",
    "UnplugAndPlay",
    "check_expert",
    "current_expert",
    "evaluate",
    "find_expert",
    "find_ffn_blocks",
    "get_ffn_specs",
    "get_task",
    "is_unplugged",
    "load_task",
    "local_task",
    "localize",
    "model_fingerprint",
    "model_lock",
    "prompt_tune",
    "register_architecture",
    "register_task",
    "restore_",
    "score_neurons",
    "unplug_",
    "unplugged",
]
