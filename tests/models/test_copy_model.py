"""The copy-trained checkpoint of the GPU bf16 agreement test (hpcinfer/testing/copy_model.py),
at a CPU size: the recipe learns to copy, and the saved checkpoint (transformers'
save_pretrained, sharded, tied embeddings) loads through our loader and decodes exactly what
transformers decodes (fp32), i.e. the prompt's own start."""
from __future__ import annotations

import torch

from hpcinfer.testing.copy_model import (
    copy_batch,
    copy_logits,
    llama_config,
    save_copy_model,
    train_copy_model,
)
from hpcinfer.testing.greedy import hf_greedy

SHAPE = {"vocab_size": 2048, "hidden_size": 64, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "tie_word_embeddings": True, "rope_theta": 500000.0}
PROMPT_LEN, COPY_LEN = 40, 12


def test_copy_batch_and_the_logits_that_predict_the_copy():
    g = torch.Generator().manual_seed(0)
    ids, targets = copy_batch(g, 3, 10, 4, 100, "cpu")
    assert ids.shape == (3, 14) and targets.shape == (3, 4)
    assert torch.equal(ids[:, 10:], ids[:, :4]) and torch.equal(targets, ids[:, :4])
    # copy_logits = the full forward's logits at positions 9..12 (they predict ids 10..13).
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(SHAPE, max_position_embeddings=256)).eval()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        assert torch.allclose(copy_logits(model, ids, 4), full[:, 9:13], atol=1e-5)


def test_trained_copy_model_loads_and_copies(tmp_path):
    torch.set_num_threads(2)
    cfg = llama_config(SHAPE, max_position_embeddings=256)
    model, stats = train_copy_model(cfg, prompt_len=PROMPT_LEN, copy_len=COPY_LEN, batch=16,
                                    max_steps=1200, lr=3e-3, high=2000, target_loss=0.5,
                                    time_budget_s=240, log=lambda _: None)
    assert stats["held_acc"] >= 0.99, stats
    path = save_copy_model(model, tmp_path / "copy", stats, dtype="float32",
                           max_shard_size="600KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1   # sharded, with an index

    from hpcinfer import LLM, SamplingParams
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, 2000, (6, PROMPT_LEN), generator=g).tolist()
    llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=COPY_LEN, ignore_eos=True),
                        use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == hf_greedy(str(path), prompts, max_new=COPY_LEN)
    copied = sum(a == b for out, p in zip(got, prompts) for a, b in zip(out, p))
    assert copied >= 0.95 * len(prompts) * COPY_LEN, got
