"""The login side refuses a MoE checkpoint whose experts do not split over parallel.tensor,
from config.json alone (no torch), with the message the engine would give."""
from __future__ import annotations

from hpcinfer.compile.checkpoint import checkpoint_problem
from hpcinfer.distributed.layout import expert_layout_problem, moe_sizes

QWEN3_30B = {"architectures": ["Qwen3MoeForCausalLM"], "num_attention_heads": 32,
             "num_key_value_heads": 4, "num_hidden_layers": 48, "num_experts": 128,
             "moe_intermediate_size": 768, "intermediate_size": 6144}
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 32, "num_local_experts": 8,
           "intermediate_size": 14336}


def test_moe_sizes_read_each_family_naming():
    assert moe_sizes(QWEN3_30B) == (128, 768)
    assert moe_sizes(MIXTRAL) == (8, 14336)
    assert moe_sizes({"intermediate_size": 11008}) is None      # dense


def test_expert_sizes_that_do_not_split_are_refused_at_parallel_tensor():
    assert checkpoint_problem(QWEN3_30B, tensor=4) is None
    odd = {**QWEN3_30B, "moe_intermediate_size": 770}
    key, message = checkpoint_problem(odd, tensor=4)
    assert key == "parallel.tensor"
    assert "intermediate size 770" in message and "enable_expert_parallel=True" in message


def test_expert_parallel_needs_experts_that_divide():
    assert expert_layout_problem(8, 14336, 4, expert_parallel=True) is None
    assert "cannot place the model's 8 experts" in expert_layout_problem(8, 14336, 3, True)
    # No EP hint when the experts would not divide either.
    assert "enable_expert_parallel" not in expert_layout_problem(5, 45, 2)


def test_login_check_stays_torch_free():
    import subprocess
    import sys
    code = ("import sys; from hpcinfer.compile.checkpoint import checkpoint_problem; "
            f"checkpoint_problem({QWEN3_30B!r}, tensor=3); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_weights_that_do_not_fit_say_how_many_gpus():
    from hpcinfer.distributed.layout import weights_fit_problem
    gib = 2 ** 30
    assert weights_fit_problem(60 * gib, 130 * gib, 1) is None
    # Qwen3-235B-A22B in bf16 (~470 GB) on one 141 GB GPU: 470 / (130 * 0.85) -> 5 GPUs.
    message = weights_fit_problem(470 * gib, 130 * gib, 1, has_experts=True)
    assert "needs about 5 GPUs" in message and "enable_expert_parallel" in message
