"""gpt-oss with MXFP4 experts (the released checkpoints' format), dequantized at load.

A tiny random gpt-oss (intermediate 64: whole 32-value blocks, 32 per rank at TP=2) has its
experts packed into MXFP4 by hpcinfer.testing.mxfp4; transformers, loading the same MXFP4
checkpoint with ``Mxfp4Config(dequantize=True)`` on CPU (fp32), is the oracle for the weights
and the greedy tokens. TP=2 and EP=2 (gloo) must equal one process. Bad checkpoints fail with
one message before the experts are read; the login side accepts the config without torch.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from hpcinfer.testing.mxfp4 import write_mxfp4_checkpoint
from hpcinfer.testing.tiny import build_tiny_checkpoint

PROMPT_LENS = (1, 5, 33)       # crosses gpt-oss's 8-token window


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    plain = build_tiny_checkpoint("gpt_oss", root / "plain", intermediate_size=64)
    even = build_tiny_checkpoint("gpt_oss", root / "plain6", intermediate_size=64,
                                 num_local_experts=6, seed=1)
    return {"plain": plain, "mxfp4": write_mxfp4_checkpoint(plain, root / "mxfp4"),
            "mxfp4_6": write_mxfp4_checkpoint(even, root / "mxfp4_6")}


def _hf_mxfp4(path):
    from transformers import AutoModelForCausalLM, Mxfp4Config
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu",
        quantization_config=Mxfp4Config(dequantize=True)).eval()


def test_dequantize_agrees_with_transformers_on_every_code_and_scale():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from hpcinfer.layers.quant.mxfp4 import dequantize_mxfp4
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 150, (3, 10, 4), dtype=torch.uint8, generator=gen)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)              # [E, out, in]
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)   # [E, in, out]
    torch.testing.assert_close(ours.transpose(1, 2), ref, atol=0, rtol=0)
    # byte 0x21, scale 128 (x2): low nibble (code 1: 0.5) first, then high (code 2: 1.0)
    one = dequantize_mxfp4(torch.full((1, 16), 0x21, dtype=torch.uint8),
                           torch.tensor([128], dtype=torch.uint8))
    assert one[:2].tolist() == [1.0, 2.0]


def test_quantize_helper_round_trips_through_the_published_format(checkpoints):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from hpcinfer.testing.mxfp4 import quantize_mxfp4
    w = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1)) * 0.3
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (2, 7, 2, 16) and scales.shape == (2, 7, 2)
    back = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    # e2m1 keeps 1 mantissa bit: every value within a quarter of its block's scale step
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)
    assert ((back - w).abs() <= step + 1e-7).all()
    assert (back - w).abs().max() > 0          # really rounded: lossy on random weights


def test_weights_and_greedy_tokens_equal_transformers_dequantized(checkpoints):
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.models.registry import load_model
    from hpcinfer.testing.greedy import random_prompts
    path = checkpoints["mxfp4"]
    hf = _hf_mxfp4(path)
    ours = load_model(path, dtype=torch.float32, device="cpu", attention_backend="torch_ref")
    plain = load_model(checkpoints["plain"], dtype=torch.float32, device="cpu",
                       attention_backend="torch_ref")
    for i, layer in enumerate(hf.model.layers):
        experts = ours.model.layers[i].mlp.experts
        ref = layer.mlp.experts.gate_up_proj.detach().transpose(1, 2)     # interleaved rows
        torch.testing.assert_close(experts.gate_up_proj.weight,
                                   torch.cat([ref[:, 0::2], ref[:, 1::2]], 1), atol=0, rtol=0)
        torch.testing.assert_close(experts.down_proj.weight,
                                   layer.mlp.experts.down_proj.detach().transpose(1, 2),
                                   atol=0, rtol=0)
        assert experts.down_proj.weight.abs().sum() > 0
        # MXFP4 is lossy: these are the quantized weights, not the source checkpoint's
        assert not torch.equal(experts.gate_up_proj.weight,
                               plain.model.layers[i].mlp.experts.gate_up_proj.weight)
    # memory: dequantized experts take the run dtype's size, as an unquantized checkpoint's
    size = sum(p.numel() * p.element_size() for p in ours.parameters())
    assert size == sum(p.numel() * p.element_size() for p in plain.parameters())

    prompts = random_prompts(PROMPT_LENS, seed=4, high=ours.spec.vocab_size)
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                              pad_token_id=0, eos_token_id=None,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long))
            expected.append(ids[0, len(p):].tolist())
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=128)
    outs = llm.generate(prompts,
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_tensor_and_expert_parallel_equal_one_process(checkpoints, tmp_path):
    from hpcinfer.testing.gloo_ranks import MOE_RANK_SCRIPT, run_two_ranks
    path = checkpoints["mxfp4_6"]
    run_two_ranks(tmp_path, MOE_RANK_SCRIPT, [f"{path}@tp@6,32", f"{path}@ep@3,64"])


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_scales_fail_before_loading(checkpoints, tmp_path):
    from hpcinfer.compile.checkpoint import quantization_problem
    from hpcinfer.layers.quant.config import QuantConfigError
    from hpcinfer.models.registry import load_model
    path = _copy(checkpoints["mxfp4"], tmp_path / "m")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.down_proj_scales"]
    index_file.write_text(json.dumps(index))
    message = ("quantization mxfp4: the checkpoint has no "
               "model.layers.1.mlp.experts.down_proj_scales")
    with pytest.raises(QuantConfigError, match=message):
        load_model(path, dtype=torch.float32, device="cpu")
    hf = json.loads((path / "config.json").read_text())
    assert quantization_problem(hf, str(path)).startswith(message)   # validate says the same
    assert quantization_problem(hf, str(checkpoints["mxfp4"])) is None


def test_wrong_block_shape_is_one_clear_error(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from hpcinfer.models.registry import load_model
    path = _copy(checkpoints["mxfp4"], tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    shard = path / index["weight_map"][name]
    tensors = load_file(shard)
    e, rows, groups, _ = tensors[name].shape
    tensors[name] = tensors[name].reshape(e, rows, groups * 2, 8).contiguous()   # 16 values
    save_file(tensors, shard, metadata={"format": "pt"})
    message = (r"quantization mxfp4: model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks is "
               r"\[5, 128, 4, 8\].*expected \[5, 128, 2, 16\]")
    with pytest.raises(ValueError, match=message):
        load_model(path, dtype=torch.float32, device="cpu")
    # hpcinfer validate reads the safetensors headers and says the same before the job
    from hpcinfer.compile.checkpoint import quantization_problem
    import re
    hf = json.loads((path / "config.json").read_text())
    assert re.match(message, quantization_problem(hf, str(path)))


def test_mxfp4_config_on_another_family_is_refused(tmp_path):
    from hpcinfer.compile.checkpoint import checkpoint_problem
    from hpcinfer.layers.quant.config import QuantConfigError
    from hpcinfer.models.registry import load_model
    from hpcinfer.testing.mxfp4 import MXFP4_QUANTIZATION_CONFIG
    path = build_tiny_checkpoint("mixtral", tmp_path / "mixtral", intermediate_size=64)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    (path / "config.json").write_text(json.dumps(config))
    message = "quantization mxfp4: only gpt-oss's"
    with pytest.raises(QuantConfigError, match=message):
        load_model(path, dtype=torch.float32, device="cpu")
    key, login = checkpoint_problem(config)
    assert key == "model.id" and login.startswith(message) and "MixtralForCausalLM" in login


GPT_OSS_120B = {"architectures": ["GptOssForCausalLM"], "num_attention_heads": 64,
                "num_key_value_heads": 8, "num_hidden_layers": 36, "num_local_experts": 128,
                "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64,
                "quantization_config": {"quant_method": "mxfp4",
                                        "modules_to_not_convert": ["lm_head"]}}


def test_validate_accepts_mxfp4_gpt_oss_without_torch(checkpoints, tmp_path):
    tiny = str(checkpoints["mxfp4"])
    code = textwrap.dedent(f"""
        import json, sys
        from types import SimpleNamespace
        from hpcinfer.compile.checkpoint import (checkpoint_problem, quantization_note,
                                                 quantization_problem)
        hf = {GPT_OSS_120B!r}
        assert checkpoint_problem(hf) is None, checkpoint_problem(hf)
        assert checkpoint_problem(hf, tensor=4) is None
        tiny = json.load(open({tiny!r} + "/config.json"))
        assert checkpoint_problem(tiny, tensor=2) is None
        assert quantization_problem(tiny, {tiny!r}) is None   # names and header shapes
        cfg = SimpleNamespace(model=SimpleNamespace(id={str(tmp_path)!r}),
                              engine=SimpleNamespace(quantization=None),
                              resources=SimpleNamespace(gpu_type="h100", device="cuda"))
        print(quantization_note(cfg))
        assert 'torch' not in sys.modules, 'torch imported'
    """)
    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS_120B))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert "mxfp4" in out and "dequantized to the model dtype at load" in out
    assert "no MXFP4 kernel" in out
    odd = {**GPT_OSS_120B, "intermediate_size": 2880 + 16}
    from hpcinfer.compile.checkpoint import checkpoint_problem
    assert "not a multiple of the MXFP4 block size 32" in checkpoint_problem(odd)[1]
