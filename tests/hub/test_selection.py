"""Which repo files `hpcinfer download` takes: one copy of the weights plus what loading needs."""
from __future__ import annotations

from hpcinfer.hub.selection import choose_files

SIDE = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "tokenizer.model", "chat_template.jinja"]


def test_sharded_safetensors_take_exactly_the_indexed_shards():
    # Mistral-style repo: an index, its shards, a consolidated duplicate and pickled copies.
    repo = SIDE + ["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                   "model-00002-of-00002.safetensors", "consolidated.safetensors",
                   "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                   "pytorch_model.bin.index.json", "README.md", ".gitattributes",
                   "original/consolidated.00.pth", "original/params.json", "onnx/model.onnx",
                   "model.gguf", "flax_model.msgpack", "tf_model.h5"]
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    assert choose_files(repo, weight_map) == sorted(SIDE + [
        "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"])


def test_single_safetensors_file_wins_over_bin():
    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "vocab.json", "merges.txt"]
    assert choose_files(repo) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]


def test_pickled_weights_only_when_there_is_no_safetensors():
    repo = ["config.json", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"]
    assert choose_files(repo) == ["config.json", "pytorch_model.bin"]
    sharded = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
               "pytorch_model.bin.index.json"]
    assert choose_files(sharded) == sorted(sharded)


def test_sentence_transformers_modules_come_along():
    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "modules.json",
            "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
            "2_Dense/pytorch_model.bin", "onnx/model.onnx", "openvino/openvino_model.xml"]
    assert choose_files(repo) == [
        "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors",
        "config.json", "config_sentence_transformers.json", "model.safetensors",
        "modules.json", "sentence_bert_config.json"]


def test_include_adds_and_exclude_removes_last():
    repo = ["config.json", "model.safetensors", "README.md", "tokenizer.json", "original/params.json"]
    chosen = choose_files(repo, include=["README.md", "original/*"], exclude=["tokenizer*", "README*"])
    assert chosen == ["config.json", "model.safetensors", "original/params.json"]
