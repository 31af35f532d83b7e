"""DoE: Decomposition of Experts. Run only the FFN neurons a task needs, and put the rest back.

    expert = doe.TaskExpert.from_indices(model, indices)   # one index tensor per FFN block
    with doe.unplugged(model, expert):                      # gathered FFNs, no weight copied
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
from doe.expert import TaskExpert
from doe.unplug import check_expert, current_expert, is_unplugged, model_lock, restore_, unplug_, unplugged

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "FFNBlock",
    "FFNSpec",
    "TaskExpert",
    "current_expert",
    "find_ffn_blocks",
    "get_ffn_specs",
    "is_unplugged",
    "model_lock",
    "register_architecture",
    "restore_",
    "unplug_",
    "unplugged",
]
