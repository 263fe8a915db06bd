"""Jobs with images (issue 24 item 4): a Parquet image column (bytes), a JSONL column of paths
and OpenAI-batch chat rows with image_url parts give the Python API's tokens for the same
images; each bad image is one bad row with its reason while the other rows complete; a
kill -9 in the middle and a rerun answer every row exactly once."""
from __future__ import annotations

import base64
import io
import os
import signal
import time

import pytest

from hpcinfer.testing.worker_jobs import (job_config, make_job, read_errors, read_results,
                                          run_worker, start_worker, write_jsonl, write_parquet)

PARAMS = {"temperature": 0.0, "max_tokens": 6}
Q1 = "USER: <image>\nWhat is in the picture? ASSISTANT:"
Q2 = "USER: <image> and <image>\nCompare them. ASSISTANT:"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def llm(llava_dir):
    from hpcinfer import LLM
    return LLM(llava_dir, device="cpu", dtype="float32", max_num_seqs=4)


def api_generate(llm, prompt, images):
    from hpcinfer import SamplingParams
    request = {"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt
    out = llm.generate([request], SamplingParams(**PARAMS), use_tqdm=False)[0]
    return out.outputs[0].text


def api_chat(llm, messages):
    from hpcinfer import SamplingParams
    return llm.chat(messages, SamplingParams(**PARAMS), use_tqdm=False)[0].outputs[0].text


def image_job(tmp_path, llava_dir, input_path, **input_keys):
    config = job_config(llava_dir, str(input_path), sampling=PARAMS,
                        input={"path": str(input_path), "image_field": "image", **input_keys})
    return make_job(tmp_path / "job", config)


def test_parquet_image_bytes_job_equals_generate(tmp_path, llava_dir, images, llm):
    red, wide, tall, small = images
    rows = [{"id": "one", "prompt": Q1, "image": [png(red)]},
            {"id": "two", "prompt": Q2, "image": [png(wide), png(tall)]},
            {"id": "text", "prompt": "A prompt without images", "image": []},
            {"id": "corrupt", "prompt": Q1, "image": [png(small)[:40]]},
            {"id": "not-image", "prompt": Q1, "image": [b"just some bytes"]},
            {"id": "three", "prompt": "USER: <image><image><image> ASSISTANT:",
             "image": [png(red)] * 3},
            {"id": "mismatch", "prompt": Q1, "image": [png(wide), png(tall)]},
            {"id": "small", "prompt": Q1, "image": [png(small)]},
            {"id": "no-images", "prompt": Q1, "image": []}]
    data = write_parquet(tmp_path / "images.parquet", rows)
    job = image_job(tmp_path, llava_dir, data, limit_mm_per_prompt={"image": 2},
                    max_bad_rows=0.5)
    rc, out = run_worker(job, timeout_s=600)
    assert rc == 0, out
    texts = {r["id"]: r["text"] for r in read_results(job)[0]}
    assert sorted(texts) == ["one", "small", "text", "two"]
    assert texts["one"] == api_generate(llm, Q1, [red])
    assert texts["two"] == api_generate(llm, Q2, [wide, tall])
    assert texts["small"] == api_generate(llm, Q1, [small])
    assert texts["text"] == api_generate(llm, "A prompt without images", [])
    errors = {e["id"]: e for e in read_errors(job)}
    assert sorted(errors) == ["corrupt", "mismatch", "no-images", "not-image", "three"]
    assert errors["no-images"]["kind"] == "placeholder_without_images"
    assert "image placeholder tokens ('<image>') but no images" in errors["no-images"]["reason"]
    assert errors["corrupt"]["kind"] == "unreadable_image"
    assert "not a readable image" in errors["corrupt"]["reason"]
    assert errors["not-image"]["kind"] == "unreadable_image"
    assert errors["three"]["kind"] == "too_many_images"
    assert "limit_mm_per_prompt allows 2" in errors["three"]["reason"]
    assert errors["mismatch"]["kind"] == "image_count_mismatch"
    assert "1 image placeholder(s)" in errors["mismatch"]["reason"]
    assert all(len(e["excerpt"]) <= 200 for e in errors.values())


def test_jsonl_paths_only_from_media_dirs(tmp_path, llava_dir, images, llm):
    red, wide, tall, _ = images
    media, outside = tmp_path / "media", tmp_path / "secret"
    media.mkdir()
    outside.mkdir()
    (media / "red.png").write_bytes(png(red))
    (media / "wide.png").write_bytes(png(wide))
    (outside / "tall.png").write_bytes(png(tall))
    (media / "link.png").symlink_to(outside / "tall.png")      # inside, but leads out
    (media / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [{"id": "rel", "prompt": Q1, "image": "media/red.png"},
            {"id": "abs", "prompt": Q2, "image": [str(media / "wide.png"), "media/red.png"]},
            {"id": "dotdot", "prompt": Q1, "image": "media/../secret/tall.png"},
            {"id": "symlink", "prompt": Q1, "image": "media/link.png"},
            {"id": "absolute-outside", "prompt": Q1, "image": str(outside / "tall.png")},
            {"id": "missing", "prompt": Q1, "image": "media/nope.png"},
            {"id": "broken", "prompt": Q1, "image": "media/broken.png"},
            {"id": "http", "prompt": Q1, "image": "https://example.org/cat.png"},
            {"id": "number", "prompt": Q1, "image": 7}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    job = image_job(tmp_path, llava_dir, data, media_dirs=[str(media)], max_bad_rows=0.9)
    rc, out = run_worker(job, timeout_s=600)
    assert rc == 0, out
    texts = {r["id"]: r["text"] for r in read_results(job)[0]}
    assert texts == {"rel": api_generate(llm, Q1, [red]),
                     "abs": api_generate(llm, Q2, [wide, red])}
    errors = {e["id"]: e for e in read_errors(job)}
    for name in ("dotdot", "symlink", "absolute-outside"):
        assert errors[name]["kind"] == "media_path_not_allowed", errors[name]
        assert "outside input.media_dirs" in errors[name]["reason"]
    assert f"resolves to {outside / 'tall.png'}" in errors["symlink"]["reason"]
    assert errors["missing"]["kind"] == "unreadable_image"
    assert "does not exist" in errors["missing"]["reason"]
    assert errors["broken"]["kind"] == "unreadable_image"
    assert errors["http"]["kind"] == "network_media"
    assert "compute nodes are offline" in errors["http"]["reason"]
    assert errors["number"]["kind"] == "bad_image_column"


def test_chat_rows_fill_image_parts_from_the_image_column(tmp_path, llava_dir, images, llm):
    red, wide, tall, _ = images
    media = tmp_path / "media"
    media.mkdir()
    for name, image in (("red", red), ("wide", wide), ("tall", tall)):
        (media / f"{name}.png").write_bytes(png(image))

    def user(*parts):
        return [{"role": "user", "content": list(parts)}]
    text = {"type": "text", "text": "Which is larger?"}
    rows = [{"id": "two", "messages": user({"type": "image"}, text, {"type": "image"}),
             "image": ["media/wide.png", "media/tall.png"]},
            {"id": "one", "messages": user(text, {"type": "image"}), "image": "media/red.png"},
            {"id": "plain", "messages": user(text), "image": None},
            {"id": "fewer-parts", "messages": user(text, {"type": "image"}),
             "image": ["media/red.png", "media/tall.png"]},
            {"id": "no-column", "messages": user({"type": "image"}, text), "image": None}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = job_config(llava_dir, str(data), task="chat", sampling=PARAMS,
                        input={"path": str(data), "messages_field": "messages",
                               "prompt_field": None, "image_field": "image",
                               "media_dirs": [str(media)], "max_bad_rows": 0.9})
    job = make_job(tmp_path / "job", config)
    rc, out = run_worker(job, timeout_s=600)
    assert rc == 0, out
    texts = {r["id"]: r["text"] for r in read_results(job)[0]}

    def pil(image):
        return {"type": "image_pil", "image_pil": image}
    assert texts["two"] == api_chat(llm, user(pil(wide), text, pil(tall)))
    assert texts["one"] == api_chat(llm, user(text, pil(red)))
    assert sorted(texts) == ["one", "plain", "two"]
    errors = {e["id"]: e for e in read_errors(job)}
    assert sorted(errors) == ["fewer-parts", "no-column"]
    for name in errors:
        assert errors[name]["kind"] == "image_count_mismatch", errors[name]
    assert "1 {\"type\": \"image\"} part(s) but the image column holds 2" in \
        errors["fewer-parts"]["reason"]


def chat_request(custom_id, parts):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "max_tokens": PARAMS["max_tokens"], "temperature": 0.0,
                     "messages": [{"role": "user", "content": parts}]}}


def test_openai_batch_image_parts_equal_chat(tmp_path, llava_dir, images, llm):
    red, wide, _, small = images
    media = tmp_path / "media"
    media.mkdir()
    (media / "wide.png").write_bytes(png(wide))
    text = {"type": "text", "text": "Describe it."}
    good = {
        "data": [{"type": "image_url", "image_url": {"url": data_url(png(red))}}, text],
        "file": [text, {"type": "image_url", "image_url": {"url": f"file://{media}/wide.png"}},
                 {"type": "image_url", "image_url": {"url": data_url(png(small))}}],
    }
    bad = {
        "text-data-url": [{"type": "image_url", "image_url": {
            "url": data_url(b"hello", "text/plain")}}, text],
        "png-url-not-png": [{"type": "image_url", "image_url": {
            "url": data_url(b"not a png at all")}}, text],
        "http": [{"type": "image_url", "image_url": {"url": "http://example.org/a.png"}}],
        "outside": [{"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}}],
        "placeholder": [{"type": "text", "text": "look <image> here"},
                        {"type": "image_url", "image_url": {"url": data_url(png(red))}}],
        "limit": [{"type": "image_url", "image_url": {"url": data_url(png(red))}}] * 3,
    }
    (tmp_path / "x.png").write_bytes(png(red))
    requests = [chat_request(k, v) for k, v in {**good, **bad}.items()]
    data = write_jsonl(tmp_path / "batch.jsonl", requests)
    config = job_config(llava_dir, str(data), task="chat", sampling=PARAMS,
                        input={"path": str(data), "format": "openai-batch",
                               "media_dirs": [str(media)], "max_bad_rows": 0.9,
                               "limit_mm_per_prompt": {"image": 2}},
                        output={"format": "openai-batch"})
    job = make_job(tmp_path / "job", config)
    rc, out = run_worker(job, timeout_s=600)
    assert rc == 0, out
    answers = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
               for r in read_results(job)[0]}
    assert answers == {
        "data": api_chat(llm, [{"role": "user", "content": [
            {"type": "image_pil", "image_pil": red}, text]}]),
        "file": api_chat(llm, [{"role": "user", "content": [
            text, {"type": "image_pil", "image_pil": wide},
            {"type": "image_pil", "image_pil": small}]}])}
    errors = {e["id"]: e for e in read_errors(job)}
    assert errors["text-data-url"]["kind"] == "bad_data_url"
    assert "data:image/png;base64" in errors["text-data-url"]["reason"]
    assert errors["png-url-not-png"]["kind"] == "bad_data_url"
    assert "not a readable image" in errors["png-url-not-png"]["reason"]
    assert errors["http"]["kind"] == "network_media"
    assert errors["outside"]["kind"] == "media_path_not_allowed"
    assert errors["placeholder"]["kind"] == "image_count_mismatch"
    assert "remove the placeholder" in errors["placeholder"]["reason"]
    assert errors["limit"]["kind"] == "too_many_images"
    assert sorted(errors) == sorted(bad)


def kill_job(tmp_path, llava_dir, images, fmt):
    """24 rows with one or two images each: Parquet bytes, or OpenAI-batch data URLs."""
    rows = [{"id": f"r{i}", "prompt": Q1 if i % 3 else Q2,
             "image": [png(images[i % 4])] if i % 3 else [png(images[i % 4]), png(images[0])]}
            for i in range(24)]
    if fmt == "parquet":
        data = write_parquet(tmp_path / "images.parquet", rows)
        return [r["id"] for r in rows], "id", lambda root: image_job(root, llava_dir, data)
    requests = [chat_request(r["id"], [{"type": "text", "text": "What is this?"}] + [
        {"type": "image_url", "image_url": {"url": data_url(b)}} for b in r["image"]])
        for r in rows]
    data = write_jsonl(tmp_path / "batch.jsonl", requests)

    def make(root):
        return make_job(root / "job", job_config(
            llava_dir, str(data), task="chat", sampling=PARAMS,
            input={"path": str(data), "format": "openai-batch"},
            output={"format": "openai-batch"}))
    return [r["custom_id"] for r in requests], "custom_id", make


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "openai-batch"])
def test_kill_9_then_rerun_every_image_row_once(tmp_path, llava_dir, images, fmt):
    ids_in, key, make = kill_job(tmp_path, llava_dir, images, fmt)
    job = make(tmp_path)
    log = tmp_path / "worker.log"
    proc = start_worker(job, log_path=log, HPCINFER_WORKER_STEP_DELAY_S="0.02")
    shard = job / "shards" / "00000"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if shard.exists() and len(list(shard.glob("part-*"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before the kill: " + log.read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (shard / "DONE").exists()
    rc, out = run_worker(job, timeout_s=600)
    assert rc == 0, out
    [records] = read_results(job).values()
    ids = [r[key] for r in records]
    assert sorted(ids) == sorted(ids_in) and len(ids) == len(set(ids))
    assert read_errors(job) == []
    reference = make(tmp_path / "ref")
    rc, out = run_worker(reference, timeout_s=600)
    assert rc == 0, out
    assert records == read_results(reference)[0]
