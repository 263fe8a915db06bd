"""A vision-language checkpoint running text jobs: text rows give the Python API's tokens; a
text or chat row holding image placeholders but no images (``placeholder_without_images``)
and a chat row whose image lies outside input.media_dirs are bad rows, the rest of the shard goes on (image jobs: test_image_jobs.py)."""
from __future__ import annotations

from hpcinfer.testing.worker_jobs import (job_config, make_job, read_errors, read_results,
                                          run_worker, write_jsonl)


def test_text_job_on_llava_with_bad_image_rows(tmp_path, llava_dir):
    rows = [{"id": "a", "prompt": "Hello world, what is a cluster?"},
            {"id": "b", "prompt": "USER: <image>\nWhat is it? ASSISTANT:"},
            {"id": "c", "prompt": "Batch inference on Slurm"}]
    chat = [{"id": "d", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": "file:///data/cat.png"}}]}]},
            {"id": "e", "messages": [{"role": "user", "content": "Say hello"}]},
            {"id": "f", "messages": [{"role": "user", "content": "<image> What is it?"}]}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    messages = write_jsonl(tmp_path / "chat.jsonl", chat)
    job = make_job(tmp_path / "gen", job_config(llava_dir, str(prompts)))
    chat_job = make_job(tmp_path / "chat", job_config(
        llava_dir, str(messages), task="chat",
        input={"path": str(messages), "id_field": "id", "messages_field": "messages",
               "prompt_field": None, "max_bad_rows": 0.9}))
    for job_dir in (job, chat_job):
        rc, out = run_worker(job_dir, timeout_s=300)
        assert rc == 0, out
    texts = {r["id"]: r for r in read_results(job)[0]}
    assert sorted(texts) == ["a", "c"]
    errors = {e["id"]: e for e in read_errors(job) + read_errors(chat_job)}
    for name in ("b", "f"):  # refused when the row is built, before the engine sees it
        assert errors[name]["kind"] == "placeholder_without_images", errors[name]
        assert errors[name]["reason"] == (
            "the row: the prompt has image placeholder tokens ('<image>') but no images: give "
            "the row its images (the input.image_field column, or image_url parts in its "
            "messages), or remove the placeholder from its text")
    # a local file outside input.media_dirs (none allowed here): docs/vision.md
    assert errors["d"]["kind"] == "media_path_not_allowed", errors["d"]
    assert "outside input.media_dirs" in errors["d"]["reason"]
    assert [r["id"] for r in read_results(chat_job)[0]] == ["e"]
    from hpcinfer import LLM, SamplingParams
    llm = LLM(llava_dir, device="cpu", dtype="float32", max_num_seqs=4)
    api = llm.generate([rows[0]["prompt"]], SamplingParams(temperature=0.0, max_tokens=6),
                       use_tqdm=False)
    assert texts["a"]["text"] == api[0].outputs[0].text
