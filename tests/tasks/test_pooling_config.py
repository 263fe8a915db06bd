"""Reading sentence-transformers pooling files, and the pooler functions."""
from __future__ import annotations

import json

import pytest
import torch

from hpcinfer.models.pooling import (PoolingConfig, classification_activation, finish_embedding,
                                     pool, read_pooling_config)
from hpcinfer.testing.tiny_pooling import write_sentence_transformers_files


def test_defaults_without_sentence_transformers_files(tmp_path):
    assert read_pooling_config(tmp_path, "CLS") == PoolingConfig("CLS", True, None)


@pytest.mark.parametrize("mode,want", [("mean", "MEAN"), ("cls", "CLS"), ("lasttoken", "LAST")])
def test_modes_and_normalize_from_the_files(tmp_path, mode, want):
    write_sentence_transformers_files(tmp_path, 8, mode, normalize=mode != "cls")
    cfg = read_pooling_config(tmp_path, "LAST" if want != "LAST" else "CLS")
    assert (cfg.pooling_type, cfg.normalize, cfg.max_seq_length) == (want, mode != "cls", 128)


def test_unsupported_modules_and_modes_are_refused(tmp_path):
    write_sentence_transformers_files(tmp_path, 8, "mean")
    pooling = tmp_path / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**config, "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="exactly one of.*found.*pooling_mode_max_tokens"):
        read_pooling_config(tmp_path, "CLS")
    pooling.write_text(json.dumps({"embedding_dimension": 8, "pooling_mode": "max"}))
    with pytest.raises(ValueError, match="pooling_mode 'max' is not supported"):
        read_pooling_config(tmp_path, "CLS")
    pooling.write_text(json.dumps(config))
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_WordWeights",
                    "type": "sentence_transformers.models.WordWeights"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"\['WordWeights'\].*does not run yet"):
        read_pooling_config(tmp_path, "CLS")


def test_sentence_transformers_6_pooling_format(tmp_path):
    write_sentence_transformers_files(tmp_path, 8, "cls")
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 8, "pooling_mode": "lasttoken", "include_prompt": True}))
    assert read_pooling_config(tmp_path, "CLS").pooling_type == "LAST"


def test_pool_over_packed_sequences():
    hidden = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # seqs of 1, 2, 3 tokens
    cu = [0, 1, 3, 6]
    assert pool(hidden, cu, "CLS").tolist() == [[0, 1], [2, 3], [6, 7]]
    assert pool(hidden, cu, "LAST").tolist() == [[0, 1], [4, 5], [10, 11]]
    assert pool(hidden, cu, "MEAN").tolist() == [[0, 1], [3, 4], [8, 9]]


def test_finish_embedding_and_activation():
    v = torch.tensor([[3.0, 4.0, 12.0]])
    assert torch.allclose(finish_embedding(v, normalize=True, dimensions=2),
                          torch.tensor([[0.6, 0.8]]))
    assert finish_embedding(v, normalize=False).tolist() == v.tolist()
    assert torch.allclose(classification_activation(torch.tensor([[0.0]])), torch.tensor([[0.5]]))
    probs = classification_activation(torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(probs, torch.softmax(torch.tensor([[0.0, 1.0]]), -1))
