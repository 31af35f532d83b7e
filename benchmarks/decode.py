"""Greedy decoding loops for the ``generate`` suite (B: batch, P: prompt length, N: new tokens).

- :func:`hf_generate`: Hugging Face ``generate()`` as a plain program calls it (a DynamicCache,
  one Python-driven forward per token).
- :class:`StaticDecoder`: an eager prefill into a ``StaticCache``, then N - 1 one-token steps
  whose inputs, outputs and position counter live in fixed buffers on the device. With
  ``graph=True`` (CUDA) the step is captured once in a CUDA graph and each token is one replay:
  no Python, no per-kernel launch cost. The step reads the next token from the previous step's
  buffer, so a replay needs nothing from the host.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["hf_generate", "StaticDecoder"]


def hf_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens after ``ids`` (B, P); returns (B, N)."""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _static_cache(model: nn.Module, max_len: int, batch: int, device: torch.device, dtype: torch.dtype):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # releases whose StaticCache is sized up front
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype)


class StaticDecoder:
    """Greedy decoding of ``new_tokens`` tokens after a ``prompt``-token prompt over a StaticCache.

    Args:
        model: a causal LM (``model(input_ids=..., past_key_values=...).logits``: (B, T, V)).
        batch, prompt, new_tokens: B, P, N (fixed: the cache and buffers are sized for them).
        graph: capture the one-token step in a CUDA graph (:meth:`prepare`); else run it eagerly.
    """

    def __init__(self, model: nn.Module, batch: int, prompt: int, new_tokens: int, graph: bool = False):
        if new_tokens < 1:
            raise ValueError(f"new_tokens: expected >= 1, got {new_tokens}")
        p = next(model.parameters())
        self.model, self.device = model, p.device
        self.batch, self.prompt, self.new_tokens = batch, prompt, new_tokens
        if graph and self.device.type != "cuda":
            raise ValueError(f"graph=True needs a CUDA model, got one on {self.device}")
        self.graph_mode = graph
        self.cache = _static_cache(model, prompt + new_tokens, batch, self.device, p.dtype)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # the next step's input
        self.out = torch.zeros(batch, new_tokens, dtype=torch.long, device=self.device)
        self.i = torch.zeros(1, dtype=torch.long, device=self.device)  # where the next token goes in out
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # the step's cache position
        params = inspect.signature(model.forward).parameters
        self._positions = "cache_position" in params  # releases that take positions from the caller
        self._keep1 = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.step_logits: Optional[torch.Tensor] = None  # (B, V) of the last step (the graph's output buffer)

    def _forward(self, ids: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        extra = {"cache_position": positions} if self._positions else {}
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **self._keep1, **extra)
        return out.logits[:, -1]

    def _emit(self, logits: torch.Tensor) -> None:
        """Greedy token of ``logits`` (B, V) into ``tok`` and ``out[:, i]``, all on the device."""
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.out.index_copy_(1, self.i, self.tok)
        self.i.add_(1)

    def _step(self) -> torch.Tensor:
        logits = self._forward(self.tok, self.pos)
        self.pos.add_(1)
        self._emit(logits)
        return logits

    def _prefill(self, ids: torch.Tensor) -> None:
        if tuple(ids.shape) != (self.batch, self.prompt):
            raise ValueError(f"ids: expected shape {(self.batch, self.prompt)}, got {tuple(ids.shape)}")
        self.cache.reset()
        self.i.zero_()
        self.pos.fill_(self.prompt)
        positions = torch.arange(self.prompt, device=self.device) if self._positions else None
        self._emit(self._forward(ids, positions))

    @torch.inference_mode()
    def prepare(self, ids: torch.Tensor) -> None:
        """Allocate the cache (a first prefill) and, in graph mode, warm the step up on a side
        stream and capture it. Call once before timing :meth:`run`."""
        self._prefill(ids)
        if not self.graph_mode or self.graph is not None or self.new_tokens == 1:
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(min(2, self.new_tokens - 1)):  # stays inside the cache and ``out``
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step_logits = self._step()
        torch.cuda.synchronize(self.device)
        self.graph = graph

    @torch.inference_mode()
    def run(self, ids: torch.Tensor) -> torch.Tensor:
        """Generate: the prefill, then N - 1 steps (graph replays in graph mode). Returns (B, N),
        the decoder's own buffer (copy it to keep it past the next run)."""
        if self.graph_mode and self.graph is None and self.new_tokens > 1:
            raise RuntimeError("StaticDecoder.run: call prepare() first in graph mode")
        self._prefill(ids)
        for _ in range(self.new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step_logits = self._step()
        return self.out
