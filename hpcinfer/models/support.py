"""What the engine can load, as plain data: no torch, no transformers.

The login side (``hpcinfer validate``) and the compute side (``registry.load_model``) read the
same tables, so a checkpoint the engine cannot load is refused on the login node with the
message the engine would give, before the job waits in the queue. Add a family here (and its
module) and both sides know it.
"""
from __future__ import annotations

from typing import Any

from hpcinfer.layers.quant import config as quant_config

# HF ``architectures`` entry -> (module, class), generation models.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("hpcinfer.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("hpcinfer.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("hpcinfer.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("hpcinfer.models.qwen3", "Qwen3ForCausalLM"),
    "GemmaForCausalLM": ("hpcinfer.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("hpcinfer.models.gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("hpcinfer.models.gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("hpcinfer.models.phi3", "Phi3ForCausalLM"),
    "OPTForCausalLM": ("hpcinfer.models.opt", "OPTForCausalLM"),
    # Mixture of experts (layers/moe.py)
    "MixtralForCausalLM": ("hpcinfer.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("hpcinfer.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("hpcinfer.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "GptOssForCausalLM": ("hpcinfer.models.gpt_oss", "GptOssForCausalLM"),
    # Images in, text out (hpcinfer/multimodal, docs/vision.md)
    "LlavaForConditionalGeneration": ("hpcinfer.models.llava", "LlavaForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("hpcinfer.models.qwen2_vl",
                                        "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("hpcinfer.models.qwen2_5_vl",
                                           "Qwen2_5_VLForConditionalGeneration"),
    "Gemma3ForConditionalGeneration": ("hpcinfer.models.gemma3_vision",
                                       "Gemma3ForConditionalGeneration"),
}

# Pooling models (embed / classify / score / reward), run by hpcinfer.engine.pooling.
POOLING_ARCHITECTURES: dict[str, tuple[str, str]] = {
    **{name: ("hpcinfer.models.bert", name) for name in
       ("BertModel", "BertForSequenceClassification")},
    **{name: ("hpcinfer.models.xlm_roberta", name) for name in
       ("XLMRobertaModel", "XLMRobertaForSequenceClassification")},
    "RobertaModel": ("hpcinfer.models.xlm_roberta", "XLMRobertaModel"),
    "RobertaForSequenceClassification": ("hpcinfer.models.xlm_roberta",
                                         "XLMRobertaForSequenceClassification"),
    **{f"{family}{kind}": ("hpcinfer.models.heads", f"{family}{kind}")
       for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma")
       for kind in ("ForSequenceClassification", "Model")},
}

# rope_type values (``rope_parameters`` / ``rope_scaling``) that layers/rotary.py builds.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn", "longrope",
                                          "dynamic")

# Old names transformers' config classes rename on load (Phi3Config: the first Phi-3 releases
# wrote "su", some "yarn", for what is longrope); the engine reads the renamed config, the
# login-side check reads config.json, so both go through this.
_ROPE_TYPE_ALIASES = {"phi3": {"su": "longrope", "yarn": "longrope"},
                      # Qwen2-VL's M-RoPE is default rope over 3-D positions (models/qwen2_vl.py)
                      **{model_type: {"mrope": "default"} for model_type in (
                          "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text")}}


def rope_type_alias(model_type: str | None, rope_type: str) -> str:
    """The rope type transformers loads for ``rope_type`` in a ``model_type`` config."""
    return _ROPE_TYPE_ALIASES.get(model_type or "", {}).get(rope_type, rope_type)


# quantization_config.quant_method values the engine loads (hpcinfer.layers.quant.config).
SUPPORTED_QUANT_METHODS: tuple[str, ...] = quant_config.SUPPORTED_QUANT_METHODS


def supported_architectures(pooling: bool = False) -> list[str]:
    """The HF ``architectures`` names we can generate with (``pooling=True``: the pooling
    models instead), sorted."""
    return sorted(POOLING_ARCHITECTURES if pooling else ARCHITECTURES)


def known_architecture(name: str) -> tuple[str, str] | None:
    """(module, class) of a supported architecture, generation or pooling; None otherwise."""
    return ARCHITECTURES.get(name) or POOLING_ARCHITECTURES.get(name)


def supported_text() -> str:
    return (f"{', '.join(supported_architectures())} (pooling: "
            f"{', '.join(supported_architectures(pooling=True))})")


def architecture_of(config: Any) -> str:
    """The one supported architecture a config (object with ``architectures``) names;
    ValueError listing ours otherwise."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if known_architecture(name):
            return name
    raise ValueError(f"unsupported model architecture {names or '(none in config.json)'}; "
                     f"hpcinfer supports: {supported_text()}")
