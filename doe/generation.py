"""Text generation for decoder LMs on whatever expert is installed: greedy or sampled, token by
token to a callback if asked, with a task's soft prompt prepended (``doe.backbone``).
``UnplugAndPlay.generate`` installs a task's expert around it."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from doe.backbone import generation_inputs
from doe.locking import model_lock

__all__ = ["GenerateParams", "Generation", "generate", "choose_tokens", "sendable"]


@dataclass(frozen=True)
class GenerateParams:
    """temperature 0: greedy. top_k 0 and top_p 1: no truncation of the sampled distribution.
    stop: strings that end the generation where they first appear (not part of the text; the
    continuous-batching engine, ``doe.engine``, applies them)."""

    prompt: str
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def bad(name: str, expected: str):
            return ValueError(f"GenerateParams.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.prompt, str):
            raise bad("prompt", "a string")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise bad("temperature", "a finite number >= 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an int >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "None or an int")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "non-empty strings")
        object.__setattr__(self, "stop", stop)


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-sequence token), "length" or "cancelled"
    ms: float


def _stopping(should_stop: Callable[[], bool]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def _streamer(on_token: Callable[[int], None]):
    from transformers.generation.streamers import BaseStreamer

    class _Tokens(BaseStreamer):
        """Skips ``generate``'s first call (the prompt), then passes each new token on."""

        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                on_token(int(token))

        def end(self):
            pass

    return _Tokens()


def generate(model: nn.Module, tokenizer, params: GenerateParams, *, soft_prompt: Optional[torch.Tensor] = None,
             prompt_ids: Optional[Sequence[int]] = None, on_token: Optional[Callable[[int], None]] = None,
             should_stop: Callable[[], bool] = lambda: False) -> Generation:
    """Continue ``params.prompt`` with the model as it is now (dense or unplugged).

    Args:
        model, tokenizer: a decoder LM (``*ForCausalLM``) and its tokenizer.
        params: prompt and decoding settings.
        soft_prompt: (n_tokens, hidden) embeddings put before the prompt's tokens.
        prompt_ids: the prompt's tokens as a task lays them out (``GenerativeTaskModel.prompt_ids``);
            default: the tokenizer's tokens of ``params.prompt``.
        on_token: called with each new token id as it is produced.
        should_stop: polled after every step; True ends generation ("cancelled").
    """
    device = next(model.parameters()).device
    if prompt_ids is not None:
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    else:
        ids = tokenizer(params.prompt, return_tensors="pt")["input_ids"].to(device)
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    options = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, stopping_criteria=_stopping(should_stop))
    if params.temperature > 0:
        options.update(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    else:
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if on_token is not None:
        options["streamer"] = _streamer(on_token)
    seeded = contextlib.nullcontext()
    if params.seed is not None:
        seeded = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with model_lock(model), torch.inference_mode(), seeded:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = model.generate(**generation_inputs(model, ids, soft_prompt), **options)
    tokens = out[0].tolist()  # with inputs_embeds only, generate returns the new tokens alone
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if tokens and tokens[-1] in eos_ids:
        reason = "stop"
    elif should_stop():
        reason = "cancelled"
    else:
        reason = "length"
    return Generation(tokens, tokenizer.decode(tokens, skip_special_tokens=True), int(ids.shape[1]), reason,
                      1000 * (time.perf_counter() - t0))


def choose_tokens(logits: torch.Tensor, params: Sequence[GenerateParams],
                  generators: Sequence[Optional[torch.Generator]]) -> list[int]:
    """(B, V) next-token logits -> one token per row: greedy where the row's temperature is 0,
    else sampled after temperature, top-k and top-p (in that order) from the row's generator."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature <= 0:
            out.append(int(greedy[i]))
            continue
        scores = logits[i].float() / p.temperature
        if p.top_k > 0:
            kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, -1)
            drop = probs.cumsum(-1) - probs >= p.top_p  # keep the smallest set that reaches top_p
            scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
        out.append(int(torch.multinomial(torch.softmax(scores, -1), 1, generator=g)))
    return out


def sendable(text: str, sent: int, stops: Sequence[str]) -> int:
    """How much of ``text`` can be streamed (``sent`` characters already were): not an
    incomplete character at the end, nor an end that could still grow into a stop string."""
    end = len(text)
    while end > sent and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:n], 0, end):
                hold = max(hold, n)
                break
    return max(end - hold, sent)
