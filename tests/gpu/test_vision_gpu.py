"""Images on a real GPU (issue 24): the tiny LLaVA, Qwen2-VL, Qwen2.5-VL and Gemma 3
checkpoints of hpcinfer.testing.tiny_vision, fp32, Triton attention and the CUDA ops (vision
towers included: rotary, norms and activations go to hpcinfer.kernels on CUDA): greedy tokens
equal to transformers' on the same GPU in fp32.

- LLaVA: decode CUDA graphs on and replayed after the image prefill; one and two images per
  prompt mixed with a text-only prompt; and a 24-token step budget, so prefill chunks cut
  through image spans and the encoder budget spreads images over steps.
- Qwen2-VL and Qwen2.5-VL (M-RoPE: image steps eager, decode steps replay the graphs):
  images whose grids span one to several windows, the same mixes, and the 24-token budget.
- Gemma 3 (Gemma3ForConditionalGeneration, 16 soft tokens per image): an image's tokens
  attend to its whole span both ways (the Triton kernel's per-query key limits on steps with
  images; decode steps replay the graphs), the same mixes, and the 24-token budget, where
  the scheduler keeps each span whole: no chunk ends inside one (asserted), so chunks stop
  before a span and the next step takes it.
- The KV pool sizing profiles an image step: the vision encoder's peak is in the profile.

transformers runs on the GPU with TF32 off (its Qwen patch embedding is a Conv3d, which cuDNN
would otherwise run in TF32) so both sides compute in fp32. The Qwen processors are
transformers' own classes without their torchvision-only video attribute (as
tests/multimodal does), for both engines; LLaVA and Gemma 3 load theirs with AutoProcessor
(PIL image processors). Gemma 3's CPU counterpart: tests/multimodal/test_gemma3_vision.py.

Not part of CI (no GPU there): tests/gpu/run_gpu_checks.sh or tests/gpu/vision_checks.sh.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only: run tests/gpu/vision_checks.sh on a GPU")

MAX_NEW = 12
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GEMMA3_IMAGE = "<start_of_image>"   # the processor expands it to 16 soft tokens
PROMPTS = {
    "llava": ("USER: <image>\nWhat is in the picture? ASSISTANT:",
              "USER: <image> and <image>\nAre they the same? ASSISTANT:"),
    "qwen": (f"<|im_start|>user\n{QWEN_IMAGE}What is in the picture?<|im_end|>\n"
             "<|im_start|>assistant\n",
             f"<|im_start|>user\n{QWEN_IMAGE} and {QWEN_IMAGE}Are they the same?<|im_end|>\n"
             "<|im_start|>assistant\n"),
    "gemma3": (f"<start_of_turn>user\n{GEMMA3_IMAGE}What is in the picture?<end_of_turn>\n"
               "<start_of_turn>model\n",
               f"<start_of_turn>user\n{GEMMA3_IMAGE} and {GEMMA3_IMAGE} Are they the same?"
               "<end_of_turn>\n<start_of_turn>model\n"),
}
TEXT = "Hello, world!"
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")   # processors without the video part


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def images():
    """The CPU tests' four sizes, plus an 80x100 one: a 4x3 grid of Qwen merge blocks, so
    Qwen2.5-VL's 2x2-block windows are cut at its edges."""
    from PIL import Image

    from hpcinfer.testing.tiny_vision import test_images
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 256, (100, 80, 3), dtype=np.uint8), "RGB")
    return test_images() + [big]


def _checkpoint(family: str):
    """(path, processor or None for AutoProcessor, transformers model class name)."""
    from hpcinfer.testing import tiny_vision
    if family == "llava":
        return str(tiny_vision.tiny_llava()), None, "LlavaForConditionalGeneration"
    if family == "gemma3":
        return str(tiny_vision.tiny_gemma3()), None, "Gemma3ForConditionalGeneration"
    version = "2.5" if family == "qwen2_5_vl" else "2"
    path = str(tiny_vision.tiny_qwen2_vl(version))
    name = ("Qwen2_5_VLForConditionalGeneration" if version == "2.5"
            else "Qwen2VLForConditionalGeneration")
    return path, tiny_vision.qwen2_vl_image_processor(path, version), name


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(family, path, processor, transformers' greedy continuation of (text, images))."""
    import transformers
    name = request.param
    path, processor, cls_name = _checkpoint(name)
    processor = processor or transformers.AutoProcessor.from_pretrained(path)
    model = getattr(transformers, cls_name).from_pretrained(
        path, dtype=torch.float32, device_map="cuda").eval()
    model.generation_config.eos_token_id = None

    def hf(text, images=None):
        # Gemma 3's processor adds token_type_ids: transformers' bidirectional image spans
        inputs = processor(text=[text], images=images or None, return_tensors="pt").to("cuda")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
    yield name, path, processor, hf
    del model
    torch.cuda.empty_cache()


def _requests(name, images):
    one, two = PROMPTS["qwen" if name in QWEN_FAMILIES else name]
    cases = [(one, [images[0]]), (TEXT, None), (two, [images[1], images[4]]),
             (one, [images[3]]), (one, [images[4]])]
    prompts = [text if ims is None else {"prompt": text, "multi_modal_data": {"image": ims}}
               for text, ims in cases]
    return prompts, cases


def _engine_tokens(family, images, monkeypatch, chunks=None, **kwargs):
    """Our greedy tokens for _requests and the engine; ``chunks``: a list that collects
    (sequence, first token, number of tokens) of every scheduled chunk."""
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.testing.schedule_log import record_chunks
    from hpcinfer.testing.tiny_vision import use_processor
    name, path, processor, _ = family
    if name in QWEN_FAMILIES:
        use_processor(monkeypatch, path, processor)
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=256,
              enable_prefix_caching=False, **kwargs)
    recorded = record_chunks(llm) if chunks is not None else None
    prompts, _ = _requests(name, images)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    if recorded is not None:
        chunks.extend(recorded)
    return [o.outputs[0].token_ids for o in outs], llm.llm_engine


def _num_chunks_ending_inside_spans(chunks) -> int:
    return sum(1 for seq, start, num_new in chunks
               for item in (seq.mm_inputs.items if seq.mm_inputs is not None else ())
               if item.offset < start + num_new < item.end)


def _expect_equal(family, images, got):
    name, _, _, hf = family
    _, cases = _requests(name, images)
    for i, ((text, ims), tokens) in enumerate(zip(cases, got)):
        want = hf(text, ims)
        assert tokens == want, f"{name} prompt {i} ({len(ims or [])} images): {tokens} != {want}"


def test_greedy_matches_transformers_on_gpu(family, images, monkeypatch):
    got, engine = _engine_tokens(family, images, monkeypatch)
    from hpcinfer.layers.attention import Attention
    runner = engine.runner
    backends = {m.backend.name for m in runner.model.modules() if isinstance(m, Attention)}
    assert backends == {"triton"}, backends
    # decode steps replay graphs (M-RoPE too: one row of positions); image steps ran eagerly
    assert runner.graphs is not None and runner.graphs.num_replays > 0
    _expect_equal(family, images, got)


def test_chunks_through_images_on_gpu(family, images, monkeypatch):
    # 24-token steps: chunks end inside image spans (LLaVA's images fill 16 tokens, Qwen's
    # 2-12) and the encoder budget of 24 image tokens takes one or two images a step.
    # Gemma 3's spans (16 tokens) attend both ways: the scheduler keeps each whole, so its
    # chunks end before a span instead, and the step after takes the span.
    chunks = []
    got, _ = _engine_tokens(family, images, monkeypatch, chunks=chunks,
                            max_num_batched_tokens=24)
    _expect_equal(family, images, got)
    prefills = [n for seq, start, n in chunks if start < seq.num_prompt_tokens]
    assert max(prefills) <= 24 and len(prefills) > len(_requests(family[0], images)[0])
    inside = _num_chunks_ending_inside_spans(chunks)
    assert (inside == 0) if family[0] == "gemma3" else (inside > 0), inside


def test_memory_profile_includes_the_vision_encoder(family, monkeypatch):
    # The KV pool is sized after a profiled step that starts with the encoder over dummy
    # images filling the encoder budget (hpcinfer/engine/memory.py), its output held through
    # the text forward: the step's peak is at least the encoder's.
    from hpcinfer import LLM
    from hpcinfer.testing.schedule_log import record_chunks
    from hpcinfer.testing.tiny_vision import use_processor
    name, path, processor, _ = family
    if name in QWEN_FAMILIES:
        use_processor(monkeypatch, path, processor)
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=256, enforce_eager=True)
    profile = llm.llm_engine.runner.memory_profile
    assert profile is not None and profile.encoder_peak > 0
    assert profile.activation_peak >= profile.encoder_peak
    assert "vision encoder" in profile.describe()
