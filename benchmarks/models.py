"""The models the benchmark suites time: shapes (``ModelCfg``), random models built on the
device in their dtype, random experts, masked copies, FFN bytes, the Amdahl ideal and inputs.

CUDA: ``bert-base`` (BertModel, fp16, position table raised to 2048) and ``llama7b-{n}L``
(LLaMA-7B-shaped layers, ``DOE_BENCH_LLAMA_LAYERS`` of them, default 4, bf16); CPU: tiny
configs, fp32 (a smoke run).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

import doe
from doe.testing import random_expert_indices
from doe_kernels.env import parse_dtype

__all__ = ["ModelCfg", "amdahl", "build_model", "causal_lm_models", "cpu_models", "ffn_weight_bytes", "gpu_models", "llama_layers",
           "make_expert", "masked_copy", "model_inputs", "nbytes", "step_weight_bytes"]


@dataclass(frozen=True)
class ModelCfg:
    name: str
    family: str  # "bert" | "llama"
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_pos: int
    dtype: str
    max_tokens: Optional[int] = None  # skip batch x seq above this (time / memory)
    note: str = ""
    tied: bool = False  # the LM head shares the input embedding's weight (lm_head=True only)

    @property
    def gated(self) -> bool:
        return self.family == "llama"

    @property
    def causal(self) -> bool:
        return self.family == "llama"


def llama_layers(default: int) -> int:
    return int(os.environ.get("DOE_BENCH_LLAMA_LAYERS", default))


def gpu_models() -> dict:
    n = llama_layers(4)
    return {
        "bert-base": ModelCfg(
            "bert-base", "bert", 768, 3072, 12, 12, 12, 30522, 2048, "fp16",
            note="BertModel, bert-base config, random weights, fp16; max_position_embeddings 2048 "
                 "(bert-base has 512) so that seq 2048 runs",
        ),
        f"llama7b-{n}L": ModelCfg(
            f"llama7b-{n}L", "llama", 4096, 11008, n, 32, 32, 32000, 4096, "bf16", max_tokens=32768,
            note=f"LlamaModel with LLaMA-7B-shaped layers (hidden 4096, FFN 11008, 32 heads), {n} of "
                 "32 layers, no LM head, random weights, bf16",
        ),
    }


def cpu_models() -> dict:
    return {
        "bert-tiny": ModelCfg("bert-tiny", "bert", 128, 512, 2, 2, 2, 512, 128, "fp32",
                              note="tiny BertModel, random weights, fp32 (CPU smoke run)"),
        "llama-tiny": ModelCfg("llama-tiny", "llama", 128, 344, 2, 4, 4, 512, 128, "fp32",
                               note="tiny LlamaModel, random weights, fp32 (CPU smoke run)"),
        "llama-small": ModelCfg("llama-small", "llama", 512, 2048, 4, 8, 8, 512, 128, "fp32",
                                note="small LlamaModel (hidden 512, FFN 2048, 4 layers), random weights, fp32: "
                                     "large enough that CPU time is matmuls, not overhead"),
    }


@contextlib.contextmanager
def _default_device_dtype(device: torch.device, dtype: torch.dtype):
    """Build modules directly on ``device`` in ``dtype`` (no fp32 CPU copy of a 7B model)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: ModelCfg, device: torch.device, seed: int = 0, lm_head: bool = False) -> nn.Module:
    """A random BertModel / LlamaModel (``lm_head``: LlamaForCausalLM) of ``cfg``, built on
    ``device`` in its dtype, frozen, eval."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.inter,
                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                  max_position_embeddings=cfg.max_pos, attn_implementation="sdpa")
    if cfg.family == "bert":
        config = tf.BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cls = tf.BertModel
    elif cfg.family == "llama":
        config = tf.LlamaConfig(**common, num_key_value_heads=cfg.kv_heads, tie_word_embeddings=cfg.tied,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cls = tf.LlamaForCausalLM if lm_head else tf.LlamaModel
    else:
        raise ValueError(cfg.family)
    if lm_head and cls is not tf.LlamaForCausalLM:
        raise ValueError(f"lm_head: only the llama family has a causal-LM head here, got {cfg.family!r}")
    with _default_device_dtype(device, parse_dtype(cfg.dtype)):
        model = cls(config)
    model.requires_grad_(False)
    return model.eval()


def make_expert(model: nn.Module, keep: float, seed: int = 0) -> doe.TaskExpert:
    """Random kept neurons per FFN block (localization picks scattered neurons, as here)."""
    idx = random_expert_indices(model, keep, seed=seed)
    return doe.TaskExpert.from_indices(model, idx, task=f"random-keep{keep:g}-seed{seed}")


def masked_copy(model: nn.Module, indices: list) -> nn.Module:
    """A copy whose FFN block i zeroes every neuron not in ``indices[i]`` (up / gate rows and
    biases, down columns)."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        for block, idx in zip(doe.find_ffn_blocks(new), indices):
            drop = torch.ones(block.num_neurons, dtype=torch.bool)
            drop[idx.long()] = False
            drop = drop.nonzero().flatten().to(block.up.weight.device)
            for layer in (block.up, block.gate):
                if layer is not None:
                    layer.weight.index_fill_(0, drop, 0)
                    if layer.bias is not None:
                        layer.bias.index_fill_(0, drop, 0)
            block.down.weight.index_fill_(1, drop, 0)
    return new


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def ffn_weight_bytes(model: nn.Module) -> int:
    total = 0
    for b in doe.find_ffn_blocks(model):
        for layer in (b.up, b.gate, b.down):
            if layer is not None:
                total += sum(nbytes(p) for p in layer.parameters())
    return total


def amdahl(cfg: ModelCfg, batch: int, seq: int, keep: Optional[float]) -> dict:
    """The speed-up an ideal expert could give: 1 / ((1 - f) + f * keep), f = the FFN's share of
    a layer's cost. Below 256 tokens a forward is weight-bandwidth-bound, so f is the FFN's share
    of the layer's weight bytes; from 256 tokens on, its share of the FLOPs (projections plus
    attention scores). Ignores embeddings, norms, softmax and launch overhead.

    Args:
        cfg: the model's shape.
        batch, seq: the input's shape.
        keep: the keep ratio (None: the share only).

    Returns:
        ``ffn_share`` (f), ``ideal_basis`` and, with ``keep``, ``ideal_speedup``.
    """
    H, I = cfg.hidden, cfg.inter
    hd = H // cfg.heads
    q, kv = cfg.heads * hd, cfg.kv_heads * hd
    attn_params = H * q + 2 * H * kv + q * H
    ffn_params = (3 if cfg.gated else 2) * H * I
    tokens = batch * seq
    if tokens < 256:
        basis, f = "weight bytes", ffn_params / (attn_params + ffn_params)
    else:
        seq_eff = (seq + 1) / 2 if cfg.causal else seq
        attn = 2 * attn_params + 4 * seq_eff * q
        basis, f = "flops", 2 * ffn_params / (attn + 2 * ffn_params)
    out = {"ffn_share": round(f, 4), "ideal_basis": basis}
    if keep is not None:
        out["ideal_speedup"] = round(1.0 / ((1.0 - f) + f * keep), 4)
    return out


def model_inputs(cfg: ModelCfg, batch: int, seq: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(batch * 100003 + seq)
    ids = torch.randint(3, cfg.vocab, (batch, seq), generator=g).to(device)
    if cfg.family == "llama":
        return {"input_ids": ids, "use_cache": False}
    return {"input_ids": ids}


def causal_lm_models() -> dict:
    """The causal LMs the decode benchmarks run on CUDA, by short name (``DOE_BENCH_GEN_LAYERS``
    sets the 7B shape's layer count)."""
    n = int(os.environ.get("DOE_BENCH_GEN_LAYERS", 32))
    return {
        "llama7b": ModelCfg(f"llama7b-{n}L", "llama", 4096, 11008, n, 32, 32, 32000, 4096, "bf16",
                            note=f"LlamaForCausalLM, LLaMA-7B shape (hidden 4096, FFN 11008, 32 heads, {n} of 32 "
                                 "layers, vocabulary 32000, untied LM head), random weights, bf16"),
        "smollm2": ModelCfg("smollm2-135m", "llama", 576, 1536, 30, 9, 3, 49152, 8192, "bf16", tied=True,
                            note="LlamaForCausalLM, SmolLM2-135M shape (hidden 576, FFN 1536, 9 heads, 3 KV heads, "
                                 "30 layers, vocabulary 49152, tied LM head), random weights, bf16"),
    }


def step_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: all of them but an untied input embedding (one row
    per token); a tied one is read whole as the LM head."""
    emb = model.get_input_embeddings().weight
    weights = sum(nbytes(p) for p in model.parameters())  # a tied weight counts once
    if model.get_output_embeddings().weight is not emb:
        weights -= nbytes(emb)
    return weights
