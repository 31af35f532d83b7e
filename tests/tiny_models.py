"""Tiny randomly initialised Hugging Face models for tests, their inputs and a tokenizer.

Not a test file. The hand-sliced reference model is ``doe.testing.sliced_copy``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import transformers as tf

FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "opt", "llama", "mistral", "qwen2", "gemma", "t5", "t5-gated"]

HIDDEN = 32
INTERMEDIATE = 88  # deliberately not a multiple of 16
VOCAB = 128
LAYERS = 2
HEADS = 4
MAX_POS = 64
NUM_LABELS = 3

_COMMON = dict(attn_implementation="eager", vocab_size=VOCAB)
_GATED_LM = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    head_dim=HIDDEN // HEADS,
    max_position_embeddings=MAX_POS,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_BERT_LIKE = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    max_position_embeddings=MAX_POS,
    type_vocab_size=2,
    num_labels=NUM_LABELS,
)
_T5 = dict(
    d_model=HIDDEN,
    d_ff=INTERMEDIATE,
    d_kv=HIDDEN // HEADS,
    num_heads=HEADS,
    num_layers=LAYERS,
    num_decoder_layers=LAYERS,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# family -> (config class, config kwargs, head model class, base model class)
_FAMILY_TABLE = {
    "bert": (tf.BertConfig, dict(_BERT_LIKE, pad_token_id=0), tf.BertForSequenceClassification, tf.BertModel),
    "roberta": (
        tf.RobertaConfig,
        dict(_BERT_LIKE, max_position_embeddings=MAX_POS + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        tf.RobertaForSequenceClassification,
        tf.RobertaModel,
    ),
    "distilbert": (
        tf.DistilBertConfig,
        dict(dim=HIDDEN, hidden_dim=INTERMEDIATE, n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=MAX_POS,
             num_labels=NUM_LABELS, pad_token_id=0),
        tf.DistilBertForSequenceClassification,
        tf.DistilBertModel,
    ),
    "gpt2": (
        tf.GPT2Config,
        dict(n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS,
             bos_token_id=1, eos_token_id=2, pad_token_id=0),
        tf.GPT2LMHeadModel,
        tf.GPT2Model,
    ),
    "opt": (
        tf.OPTConfig,
        dict(hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
             word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POS, pad_token_id=1, bos_token_id=2,
             eos_token_id=2),
        tf.OPTForCausalLM,
        tf.OPTModel,
    ),
    "llama": (tf.LlamaConfig, dict(_GATED_LM), tf.LlamaForCausalLM, tf.LlamaModel),
    "mistral": (tf.MistralConfig, dict(_GATED_LM, sliding_window=None), tf.MistralForCausalLM, tf.MistralModel),
    "qwen2": (tf.Qwen2Config, dict(_GATED_LM), tf.Qwen2ForCausalLM, tf.Qwen2Model),
    "gemma": (tf.GemmaConfig, dict(_GATED_LM), tf.GemmaForCausalLM, tf.GemmaModel),
    "t5": (tf.T5Config, dict(_T5, feed_forward_proj="relu"), tf.T5ForConditionalGeneration, tf.T5Model),
    "t5-gated": (tf.T5Config, dict(_T5, feed_forward_proj="gated-gelu"), tf.T5ForConditionalGeneration, tf.T5Model),
}
assert list(_FAMILY_TABLE) == FAMILIES


def make_config(family: str):
    """The tiny config of ``family`` (one of :data:`FAMILIES`)."""
    if family not in _FAMILY_TABLE:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    config_cls, kwargs, _, _ = _FAMILY_TABLE[family]
    return config_cls(**_COMMON, **kwargs)


def make_tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, *, head: bool = True) -> nn.Module:
    """A tiny random model of ``family`` in eval mode (2 layers, hidden 32, FFN 88, vocab 128).

    Args:
        family: one of :data:`FAMILIES`.
        seed: of the random weights.
        dtype: of the parameters.
        head: *ForSequenceClassification (encoders, 3 labels), *ForCausalLM (decoders) or
            T5ForConditionalGeneration; False: the base model.
    """
    config = make_config(family)
    _, _, head_cls, base_cls = _FAMILY_TABLE[family]
    torch.manual_seed(seed)
    model = (head_cls if head else base_cls)(config)
    return model.to(dtype).eval()


def sample_inputs(model: nn.Module, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ``input_ids`` / ``attention_mask`` (batch, seq) (row 1 has its last 2 tokens padded);
    T5 also gets ``decoder_input_ids`` (batch, seq - 2).

    Args:
        model: the tiny model (its config and device).
        batch, seq: the shape.
        seed: of the random ids.
    """
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > 2:
        attention_mask[1, -2:] = 0
        pad = getattr(config, "pad_token_id", None)
        if pad is not None:
            input_ids[1, -2:] = pad
    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if getattr(config, "is_encoder_decoder", False):
        dec = torch.randint(3, config.vocab_size, (batch, max(seq - 2, 1)), generator=gen)
        dec[:, 0] = config.decoder_start_token_id
        inputs["decoder_input_ids"] = dec.to(device)
    return inputs


@torch.no_grad()
def model_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``logits`` of a head model, or ``last_hidden_state`` of a base model."""
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def tiny_tokenizer(texts: Sequence[str] = (), extra_words: Sequence[str] = ()):
    """A word-level fast tokenizer whose ids fit the tiny models' vocabulary (VOCAB).

    Vocabulary: 4 special tokens, ``extra_words`` (e.g. verbalizer words), then the most
    frequent lower-cased words of ``texts``; everything else is [UNK].
    """
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = list(dict.fromkeys(w.lower() for w in extra_words))
    counts = Counter(w for t in texts for w in t.lower().replace(".", " ").replace("?", " ").replace(",", " ").split())
    for w, _ in counts.most_common():
        if len(specials) + len(words) >= VOCAB:
            break
        if w not in words:
            words.append(w)
    vocab = {tok: i for i, tok in enumerate(specials + words[: VOCAB - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")
