"""The safetensors loader and the registry: layouts that must load, and errors that must say
what is wrong (file, tensor, shapes, supported architectures)."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpcinfer.models.loader import checkpoint_files
from hpcinfer.models.registry import load_model, supported_architectures
from hpcinfer.testing.tiny import build_tiny_checkpoint, tiny_checkpoint

FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Gemma3", "Phi3", "OPT",
            "Mixtral", "Qwen2Moe", "Qwen3Moe", "GptOss")


def _load(path, **kwargs):
    return load_model(path, dtype=torch.float32, device="cpu", attention_backend="torch_ref",
                      **kwargs)


def _copy(family, tmp_path):
    dst = tmp_path / family
    shutil.copytree(tiny_checkpoint(family), dst)
    return dst


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _rewrite_tensor(path, name, fn):
    """Apply fn to the dict of tensors of the shard holding `name`, and save it back."""
    shard = path / _index(path)["weight_map"][name]
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def test_tiny_checkpoints_are_sharded_with_a_tokenizer():
    from transformers import AutoTokenizer

    path = tiny_checkpoint("llama")
    shards = set(_index(path)["weight_map"].values())
    assert len(shards) >= 3 and all((path / s).is_file() for s in shards)
    tok = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert len(tok) == config["vocab_size"]
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True,
                                  add_generation_prompt=True, return_dict=False)
    text = tok.decode(ids)
    assert text.startswith("<s><|im_start|>user\nHello<|im_end|>") and text.endswith("assistant\n")
    assert tok("Hello world").input_ids[0] == config["bos_token_id"]


def test_unknown_tiny_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny family 'gpt2'.*llama3"):
        build_tiny_checkpoint("gpt2", tmp_path)


def test_supported_architectures_lists_every_family():
    # vision-language models (tests/multimodal) end in ForConditionalGeneration
    assert supported_architectures() == sorted(
        [f"{f}ForCausalLM" for f in FAMILIES]
        + ["LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
           "Qwen2_5_VLForConditionalGeneration", "Gemma3ForConditionalGeneration"])


def test_single_file_checkpoint_loads(tmp_path):
    path = _copy("qwen2", tmp_path)
    tensors = {}
    for shard in sorted(set(_index(path)["weight_map"].values())):
        tensors.update(load_file(path / shard))
        (path / shard).unlink()
    (path / "model.safetensors.index.json").unlink()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = _load(path)
    ref = _load(tiny_checkpoint("qwen2"))
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_tied_embeddings_share_one_tensor_and_a_stored_head_is_accepted(tmp_path):
    path = _copy("gemma", tmp_path)
    model = _load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Some tied checkpoints also store lm_head.weight: it must not be an "unexpected" tensor.
    embed = model.model.embed_tokens.weight.detach().clone()
    _rewrite_tensor(path, "model.embed_tokens.weight",
                    lambda t: t.__setitem__("lm_head.weight", embed.clone()))
    assert torch.equal(_load(path).lm_head.weight, embed)


def test_untied_head_is_loaded_from_its_own_tensor():
    model = _load(tiny_checkpoint("llama"))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_opt_legacy_names_without_model_prefix_load(tmp_path):
    path = _copy("opt", tmp_path)
    index = _index(path)
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {name.removeprefix("model."): t for name, t in load_file(path / shard).items()}
        save_file(tensors, path / shard, metadata={"format": "pt"})
    index["weight_map"] = {k.removeprefix("model."): v for k, v in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = _load(path)
    ref = _load(tiny_checkpoint("opt"))
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_missing_shard_names_the_file(tmp_path):
    path = _copy("llama", tmp_path)
    shard = sorted(set(_index(path)["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        _load(path)


def test_no_weights_at_all_is_a_clear_error(tmp_path):
    path = _copy("llama", tmp_path)
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint_files(path)


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    path = _copy("qwen3", tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_tensor(path, name, lambda t: t.__setitem__(name, torch.zeros(8, 64)))
    with pytest.raises(ValueError) as err:
        _load(path)
    message = str(err.value)
    assert name in message and "(64, 64)" in message and "(8, 64)" in message


def test_wrong_shape_of_a_plain_parameter(tmp_path):
    path = _copy("opt", tmp_path)
    name = "model.decoder.layers.0.final_layer_norm.bias"
    _rewrite_tensor(path, name, lambda t: t.__setitem__(name, torch.zeros(63)))
    with pytest.raises(ValueError, match=re.escape(name) + r".*\(64,\).*\(63,\)"):
        _load(path)


def test_fused_phi3_tensors_of_the_wrong_size_name_both_shapes(tmp_path):
    """Phi-3's fused qkv_proj ([q | k | v], 64 + 2 x 32 rows) is split at load: a tensor of
    another size is a shape error naming it, not a silent mis-split."""
    path = _copy("phi3", tmp_path)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    _rewrite_tensor(path, name, lambda t: t.__setitem__(name, t[name][:112].clone()))
    with pytest.raises(ValueError, match=re.escape(name) + r".*\(128, 64\).*\(112, 64\)"):
        _load(path)


def test_missing_fused_phi3_tensor_is_an_error(tmp_path):
    path = _copy("phi3", tmp_path)
    name = "model.layers.1.mlp.gate_up_proj.weight"
    _rewrite_tensor(path, name, lambda t: t.pop(name))
    index = _index(path)
    del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no tensor for 1 parameter.*" + re.escape(name)):
        _load(path)


def test_missing_tensor_is_an_error(tmp_path):
    path = _copy("llama", tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite_tensor(path, name, lambda t: t.pop(name))
    index = _index(path)
    del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no tensor for 1 parameter.*gate_up_proj.weight \(1\)"):
        _load(path)


def test_unexpected_tensor_is_an_error_but_rotary_inv_freq_is_ignored(tmp_path):
    path = _copy("llama", tmp_path)
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    first = "model.embed_tokens.weight"
    _rewrite_tensor(path, first, lambda t: t.__setitem__(inv_freq, torch.ones(8)))
    index = _index(path)
    index["weight_map"][inv_freq] = index["weight_map"][first]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _load(path)  # ignorable
    extra = "model.layers.0.self_attn.extra.weight"
    _rewrite_tensor(path, first, lambda t: t.__setitem__(extra, torch.ones(2)))
    index["weight_map"][extra] = index["weight_map"][first]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(extra) + r" in model-\d+-of-\d+\.safetensors"):
        _load(path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    path = _copy("llama", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["LlamaForTokenClassification"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForTokenClassification") as err:
        _load(path)
    assert all(f"{f}ForCausalLM" in str(err.value) for f in FAMILIES)


def test_architecture_unknown_to_transformers_gets_our_error(tmp_path):
    path = _copy("llama", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="foo", architectures=["FooForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FooForCausalLM.*supports: Gemma2ForCausalLM"):
        _load(path)


def test_missing_config_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json.*hpcinfer download"):
        _load(tmp_path)


def test_spec_reads_generation_config_eos_and_window(tmp_path):
    path = build_tiny_checkpoint("mistral", tmp_path / "m", sliding_window=16)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [1, 5]
    (path / "generation_config.json").write_text(json.dumps(gen))
    spec = _load(path).spec
    assert spec.eos_token_ids == (1, 5)
    assert spec.sliding_window == 16
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_layers) == (4, 2, 16, 2)
