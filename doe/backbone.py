"""How a model of each kind takes soft prompts and is read out: the one place that does it.

    inputs = prompted_inputs(model, prompts, input_ids, attention_mask)   # [prompt_r; text_r; padding]
    logits = classify(model, inputs, heads=..., label_ids=...)            # per row, as alone

Row r is its own soft prompt (any length), then its text tokens, then padding up to the longest
row, masked. The text keeps the positions it has when the row runs alone, and padding after it
is invisible to it (masked for encoders, in the future for causal decoders), so a row's result
does not depend on its neighbours. Read-outs by model kind:

- encoder (BERT, ...): the base model's last hidden states, mean-pooled over the text tokens,
  through the row's linear head;
- decoder (LLaMA, GPT-2, ...): the last hidden state at the row's last text token, through the
  row's linear head (as ``LlamaForSequenceClassification``), or the next-token logits there at
  its verbalizer tokens;
- seq2seq (T5, ...): the first decoder step's logits at the verbalizer tokens.

A head may read an earlier layer (its ``layer`` attribute: the states after that many layers;
None, the model's last hidden states), or several side by side (its ``layers``). The forward then
stops after the deepest layer any row reads: a task read at layer 6 of 30 runs 6 layers.
``LayerReplay`` records the first layers' outputs over a fixed sequence of forwards and answers
them again instead of running those layers (what a change in a later layer leaves the same).

``pooled_text`` gives the dense model's mean-pooled text states without a prompt (the router's
embeddings); ``generation_inputs`` the prompted embeddings a decoder continues in ``generate``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.nn as nn

from doe.locking import model_lock
from doe.models import model_kind

__all__ = ["prompted_inputs", "classify", "lm_logits", "pooled_text", "generation_inputs", "base_model",
           "layer_modules", "layer_states", "head_layers", "head_pooling", "read_states", "LayerReplay",
           "layer_index"]


def base_model(model: nn.Module) -> nn.Module:
    """The module an encoder's text states come from (BertModel inside BertForSequenceClassification:
    the task head is ours); any other model as it is."""
    if model_kind(model) == "encoder":
        return getattr(model, "base_model", model)
    return model


def layer_modules(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of an encoder's or a decoder's stack, in order."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in base_model(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"found no list of {count} layers in {type(model).__name__}; reading an earlier layer needs "
                     "an encoder or decoder whose layers are an nn.ModuleList")


class _Stop(Exception):
    """Ends a forward once the deepest layer read has run."""


def layer_states(model: nn.Module, inputs: dict, layers) -> dict:
    """One forward of an encoder or decoder over ``prompted_inputs``' batch; the hidden states
    (B, L, H) after each of ``layers`` (k: after k layers, 1-based; None: the model's last hidden
    states, final norm included), stopping after the deepest layer when None is not asked for."""
    layers = set(layers)
    run = base_model(model) if model_kind(model) == "encoder" else model.base_model
    call = dict(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"])
    ints = sorted(k for k in layers if k is not None)
    if not ints:
        return {None: run(**call)[0]}
    stack = layer_modules(model)
    if not 1 <= ints[0] <= ints[-1] <= len(stack):
        raise ValueError(f"readout layers: expected 1..{len(stack)} (or None for the last hidden states), got {ints}")
    out: dict = {}
    stop = ints[-1] if None not in layers else None

    def hook(k):
        def record(module, args, output):
            out[k] = output[0] if isinstance(output, tuple) else output
            if k == stop:
                raise _Stop
        return record

    # under the model's lock: another thread's forward must not meet these hooks
    with model_lock(model):
        handles = [stack[k - 1].register_forward_hook(hook(k)) for k in ints]
        try:
            out[None] = run(**call)[0]
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
    return out


class _Replayed(nn.Module):
    """Stands in for a layer: answers the outputs it recorded, one per call, in order; any other
    attribute is the layer's (models read some, e.g. its attention type)."""

    def __init__(self, layer: nn.Module, outputs: list):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its parameters stay the layer's own
        self.outputs, self.calls = outputs, 0

    def forward(self, *args, **kwargs):
        if self.calls >= len(self.outputs):
            raise RuntimeError(f"LayerReplay: {self.calls + 1} forwards asked for the {len(self.outputs)} recorded")
        self.calls += 1
        return self.outputs[self.calls - 1]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._layer, name)


class LayerReplay:
    """The outputs of the first ``depth`` layers of ``model``'s stack over the forwards run inside
    ``recording()``; inside ``skipping(n)`` the first n layers answer them again, forward by
    forward in the same order, instead of running. For a change that starts at layer n (an FFN
    inside it pruned), forwards over the same batches then cost the layers from n on only.
    Holds every recorded output: (batches x depth) tensors of (B, L, H)."""

    def __init__(self, model: nn.Module, depth: int):
        self.stack = layer_modules(model) if depth > 0 else nn.ModuleList()
        self.depth = min(depth, len(self.stack))
        self.outputs: list[list] = [[] for _ in range(self.depth)]

    @contextmanager
    def recording(self):
        hooks = [self.stack[j].register_forward_hook(lambda m, args, out, j=j: self.outputs[j].append(out))
                 for j in range(self.depth)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    @contextmanager
    def skipping(self, n: int):
        if not 0 <= n <= self.depth:
            raise ValueError(f"LayerReplay.skipping: expected 0..{self.depth} layers, got {n}")
        originals = [self.stack[j] for j in range(n)]
        replayed = [_Replayed(layer, self.outputs[j]) for j, layer in enumerate(originals)]
        try:
            for j, stub in enumerate(replayed):
                self.stack[j] = stub
            yield self
        finally:
            for j, layer in enumerate(originals):
                self.stack[j] = layer
        short = [j for j, stub in enumerate(replayed) if stub.calls != len(stub.outputs)]
        if short:
            raise RuntimeError(f"LayerReplay: layers {short} answered {replayed[short[0]].calls} forwards, "
                               f"{len(self.outputs[short[0]])} were recorded")


def layer_index(model: nn.Module, module_name: str) -> Optional[int]:
    """The index in ``model``'s layer stack of the layer that holds the module named
    ``module_name``; None where no layer of the stack holds it (a seq2seq decoder's)."""
    try:
        stack = layer_modules(model)
    except ValueError:  # no stack of layers to name
        return None
    names = {id(m): name for name, m in model.named_modules()}
    for j, layer in enumerate(stack):
        if module_name.startswith(names.get(id(layer), "\0") + "."):
            return j
    return None


def head_layers(head: Optional[nn.Module]) -> tuple:
    """The layers whose states ``head`` reads, side by side in this order: its ``layers``
    attribute, else its ``layer`` (None: the last hidden states)."""
    return tuple(getattr(head, "layers", None) or (getattr(head, "layer", None),))


def head_pooling(kind: str, head: Optional[nn.Module]) -> str:
    """How a head on a model of ``kind`` pools the text's states: "mean" (encoders always, a
    decoder head whose ``pooling`` attribute says so) or "last" (the last text token's)."""
    return "mean" if kind == "encoder" or getattr(head, "pooling", None) == "mean" else "last"


def read_states(hidden: torch.Tensor, inputs: dict, rows: Sequence[int], pooling: Optional[str]) -> torch.Tensor:
    """(len(rows), H) from hidden (B, L, H): each row's last text token's state, or the mean of
    its text's states (``pooling="mean"``, fp32)."""
    start, length = inputs["prompt_len"][rows], inputs["text_len"][rows]
    if pooling == "mean":
        return _mean_over_text(hidden[rows], start, length)
    return hidden[torch.as_tensor(rows, device=hidden.device), (start + length - 1).to(hidden.device)]


def _like(prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return prompt.to(device=tokens.device, dtype=tokens.dtype)


def prompted_inputs(model: nn.Module, prompts: Sequence[Optional[torch.Tensor]], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> dict:
    """The backbone inputs of a batch whose rows carry their own soft prompts.

    Args:
        model: the backbone (its input embeddings embed the tokens).
        prompts: per row, (P_r, H) embeddings or None (no prompt); rows may share a tensor.
        input_ids, attention_mask: (B, T) tokens of the texts, padded on either side (left
            padding is moved after the text).

    Returns:
        ``inputs_embeds`` (B, L, H) in the embeddings' dtype, ``attention_mask`` (B, L) long,
        ``prompt_len`` and ``text_len`` (B,) long on the CPU: row r's text occupies positions
        [prompt_len[r], prompt_len[r] + text_len[r]).
    """
    if len(prompts) != input_ids.shape[0] or attention_mask.shape != input_ids.shape:
        raise ValueError(f"expected one prompt per row and a mask shaped like the tokens, got {len(prompts)} prompts, "
                         f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)}")
    tokens = model.get_input_embeddings()(input_ids)
    b, hidden = tokens.shape[0], tokens.shape[-1]
    host_mask = attention_mask.cpu()  # the one device-to-host copy: lengths and layout are read from it
    text_len = host_mask.sum(1).long()
    prompt_len = torch.tensor([0 if p is None else p.shape[0] for p in prompts])
    for r, p in enumerate(prompts):
        if p is not None and (p.dim() != 2 or p.shape[1] != hidden):
            raise ValueError(f"prompts[{r}]: expected shape (n_tokens, {hidden}), got {tuple(p.shape)}")
    lengths = prompt_len + text_len
    right_padded = bool((host_mask[:, 1:] <= host_mask[:, :-1]).all())
    if right_padded and (prompts[0] is None or all(p is prompts[0] for p in prompts)):
        # one prompt for every row, right padding: [prompt; tokens] as they are (padding stays at the end)
        parts = [tokens] if prompts[0] is None else [_like(prompts[0], tokens).expand(b, -1, -1), tokens]
        mask = torch.cat([attention_mask.new_ones(b, int(prompt_len[0])), attention_mask], dim=1)
        return {"inputs_embeds": torch.cat(parts, dim=1), "attention_mask": mask.long(), "prompt_len": prompt_len,
                "text_len": text_len}
    embeds = tokens.new_zeros(b, int(lengths.max()), hidden)
    mask = torch.zeros(b, int(lengths.max()), dtype=torch.long, device=tokens.device)
    for r, p in enumerate(prompts):
        where = host_mask[r].nonzero().flatten()
        contiguous = where.numel() and int(where[-1]) - int(where[0]) + 1 == where.numel()
        text = tokens[r, int(where[0]): int(where[-1]) + 1] if contiguous else tokens[r][attention_mask[r].bool()]
        row = text if p is None else torch.cat([_like(p, tokens), text])
        embeds[r, : row.shape[0]] = row
        mask[r, : row.shape[0]] = 1
    return {"inputs_embeds": embeds, "attention_mask": mask, "prompt_len": prompt_len, "text_len": text_len}


def _mean_over_text(hidden: torch.Tensor, prompt_len: torch.Tensor, text_len: torch.Tensor) -> torch.Tensor:
    """(B, L, H) -> (B, H) fp32: each row's mean over its text positions."""
    pos = torch.arange(hidden.shape[1])
    keep = (pos[None, :] >= prompt_len[:, None]) & (pos[None, :] < (prompt_len + text_len)[:, None])
    weights = keep.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _per_row(what: str, values, b: int) -> list:
    if values is None:
        return [None] * b
    if len(values) != b:
        raise ValueError(f"{what}: expected {b} {'heads' if 'head' in what else 'label id lists'}, got {len(values)}")
    return list(values)


def _by_reader(readers: Sequence, rows: Sequence[int]) -> list[tuple[object, list[int]]]:
    """(reader, its rows) in order of first appearance: one call per head or verbalizer."""
    out: dict = {}
    for r in rows:
        out.setdefault(id(readers[r]), (readers[r], []))[1].append(r)
    return list(out.values())


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A decoder's next-token logits (..., V) from its last hidden states (..., H), as its forward
    computes them (the output embedding, then any final soft-capping)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def classify(model: nn.Module, inputs: dict, *, heads: Optional[Sequence[Optional[nn.Module]]] = None,
             label_ids: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list:
    """One forward over ``prompted_inputs``' batch; per row, its class logits (fp32, (C_r,)).

    Args:
        model: the backbone.
        inputs: ``prompted_inputs``' dict.
        heads: per row, its linear head (H -> C_r) or None; rows may share a module. Encoders
            read the mean of the text's last hidden states, decoders the last text token's, or
            the mean where the head's ``pooling`` attribute is "mean"; at the layers its
            ``layers`` attribute names (their states side by side), or at its ``layer``.
        label_ids: per row, (C_r,) verbalizer token ids, for rows without a head (decoders:
            the next-token logits at the last text token; seq2seq: at the first decoder step).
    """
    kind = model_kind(model)
    embeds, mask = inputs["inputs_embeds"], inputs["attention_mask"]
    b = embeds.shape[0]
    heads = _per_row(f"a {kind} reads its rows through heads", heads, b)
    label_ids = _per_row(f"a {kind} reads its rows at verbalizer tokens", label_ids, b)
    missing = [r for r in range(b) if heads[r] is None and (label_ids[r] is None or kind == "encoder")]
    if missing:
        want = "a head" if kind == "encoder" else "a head or verbalizer token ids"
        raise ValueError(f"a {kind} reads each row through {want}; rows {missing} have none")
    if kind == "seq2seq":
        if any(h is not None for h in heads):
            raise ValueError("a seq2seq model reads its rows at verbalizer tokens; heads are for encoders and decoders")
        first = model.config.decoder_start_token_id or 0
        dec = torch.full((b, 1), first, dtype=torch.long, device=embeds.device)
        logits = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits[:, 0]
        return [logits[r, ids].float() for r, ids in enumerate(label_ids)]
    # per row: which layers it reads (None: the last hidden states) and how it pools them
    where = [head_layers(heads[r]) for r in range(b)]
    pooling = [head_pooling(kind, heads[r]) for r in range(b)]
    hidden = layer_states(model, inputs, {k for layers in where for k in layers})
    states: list = [None] * b  # per row, (n * H,): its layers' states side by side
    for key in dict.fromkeys(zip(where, pooling)):
        rows = [r for r in range(b) if (where[r], pooling[r]) == key]
        read = torch.cat([read_states(hidden[k], inputs, rows, key[1]).to(hidden[k].dtype) for k in key[0]], -1)
        for r, state in zip(rows, read):
            states[r] = state
    out: list = [None] * b
    with_head = [r for r in range(b) if heads[r] is not None]
    for head, rows in _by_reader(heads, with_head):
        for r, logits in zip(rows, head(torch.stack([states[r] for r in rows]).to(head.weight.dtype))):
            out[r] = logits.float()
    rest = [r for r in range(b) if heads[r] is None]
    if rest:
        vocab = lm_logits(model, torch.stack([states[r] for r in rest]))
        place = {r: i for i, r in enumerate(rest)}
        for ids, rows in _by_reader(label_ids, rest):
            picked = vocab[[place[r] for r in rows]][:, ids].float()
            for r, logits in zip(rows, picked):
                out[r] = logits
    return out


@torch.no_grad()
def pooled_text(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, H) fp32: the dense model's last hidden states mean-pooled over the text (no prompt);
    the encoder's states for seq2seq models."""
    kind = model_kind(model)
    if kind == "seq2seq":
        hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
    elif kind == "encoder":
        hidden = base_model(model)(input_ids=input_ids, attention_mask=attention_mask)[0]
    else:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    mask = attention_mask.unsqueeze(-1).float()
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1)


def generation_inputs(model: nn.Module, input_ids: torch.Tensor, prompt: Optional[torch.Tensor] = None) -> dict:
    """``inputs_embeds`` (1, P + T, H) and ``attention_mask`` for ``generate``: one text (1, T)
    after an optional soft prompt (P, H)."""
    inputs = prompted_inputs(model, [prompt], input_ids, torch.ones_like(input_ids))
    return {"inputs_embeds": inputs["inputs_embeds"], "attention_mask": inputs["attention_mask"]}
