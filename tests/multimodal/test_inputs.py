"""Pure pieces of hpcinfer/multimodal: image URLs and hashes, chat part conversion, block
hash keys, the batch rows a step's chunks give images, M-RoPE positions of a step."""
from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from hpcinfer.multimodal.inputs import ImageItem, MultiModalInputs
from hpcinfer.multimodal.media import (MediaError, check_image_count, image_hash,
                                       llm_media_args, load_image_url)
from hpcinfer.multimodal.processor import to_hf_messages
from hpcinfer.multimodal.step import mrope_positions, plan_image_rows


def _png(color=(10, 20, 30), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_urls(tmp_path):
    path = tmp_path / "a b.png"
    path.write_bytes(_png())
    data = "data:image/png;base64," + base64.b64encode(_png()).decode()
    allowed = (os.path.realpath(tmp_path),)
    for url in (data, {"url": data}, f"file://{path}", f"file://localhost{path}", str(path),
                f"file://{str(path).replace(' ', '%20')}"):
        assert load_image_url(url, "here", allowed).size == (6, 4)
    with pytest.raises(MediaError, match="here: .*outside input.media_dirs"):
        load_image_url(f"file://{path}", "here")  # no directory allowed: no local files
    with pytest.raises(ValueError, match="here: .*remote host"):
        load_image_url(f"file://server{path}", "here")
    with pytest.raises(ValueError, match="unsupported image URL"):
        load_image_url("relative/cat.png", "here")
    with pytest.raises(ValueError, match="base64 payload does not decode"):
        load_image_url("data:image/png;base64,@@@", "here")
    truncated = "data:image/png;base64," + base64.b64encode(_png()[:40]).decode()
    with pytest.raises(ValueError, match="not a readable image"):
        load_image_url(truncated, "here")


def test_llm_media_args(tmp_path):
    assert llm_media_args(None, "") == (None, ())
    assert llm_media_args({"image": 2, "video": 0}, str(tmp_path)) == (
        2, (os.path.realpath(tmp_path),))
    assert llm_media_args({"image": {"count": 0}}, None) == (0, ())
    for bad, message in [("image=2", "pass a dict"), ({"image": -1}, "count >= 0"),
                         ({"image": True}, "count >= 0"), ({"pictures": 1}, "unknown modality")]:
        with pytest.raises(ValueError, match=message):
            llm_media_args(bad, "")
    with pytest.raises(ValueError, match="does not exist"):
        llm_media_args(None, str(tmp_path / "missing"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        llm_media_args(None, str(tmp_path / "f"))


def test_check_image_count():
    check_image_count(2, 2, "the row", "input.limit_mm_per_prompt", unit="row")
    check_image_count(50, None, "request '0'", "limit_mm_per_prompt")
    with pytest.raises(MediaError, match="request '0' has 3 images but limit_mm_per_prompt "
                                         "allows 2 per prompt") as e:
        check_image_count(3, 2, "request '0'", "limit_mm_per_prompt")
    assert e.value.kind == "too_many_images"


def test_image_hash_is_content():
    a, b = Image.open(io.BytesIO(_png())), Image.open(io.BytesIO(_png()))
    assert image_hash(a) == image_hash(b)
    assert image_hash(a) != image_hash(Image.new("RGB", (6, 4), (10, 20, 31)))
    assert image_hash(a) != image_hash(Image.new("RGB", (4, 6), (10, 20, 30)))  # same bytes


def test_chat_parts_become_transformers_parts():
    image = Image.new("RGB", (3, 3))
    conversation = [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "image_pil", "image_pil": image}]}]
    messages, images = to_hf_messages(conversation, "conversation 0")
    assert messages[0] == conversation[0] and images == [image]
    assert messages[1]["content"] == [{"type": "text", "text": "a"}, {"type": "image"}]
    with pytest.raises(ValueError, match="message 0, part 0: content part type 'audio_url'"):
        to_hf_messages([{"role": "user", "content": [{"type": "audio_url"}]}], "conversation 0")


def _mm(*spans, hashes=None):
    hashes = hashes or list(range(len(spans)))
    return MultiModalInputs([ImageItem(o, n, h, {}) for (o, n), h in zip(spans, hashes)])


def test_block_extra_keys_name_the_images_a_block_holds():
    mm = _mm((5, 10), (20, 4), hashes=[111, 222])
    assert mm.block_extra_keys(0, 4) == ()
    assert mm.block_extra_keys(4, 8) == ((111, 0),)
    assert mm.block_extra_keys(12, 16) == ((111, 7),)
    assert mm.block_extra_keys(12, 24) == ((111, 7), (222, 0))
    assert mm.block_extra_keys(24, 28) == ()


class _Seq:
    def __init__(self, mm):
        self.mm_inputs = mm


def test_plan_rows_slice_each_image_per_chunk():
    # seq 0: image at [2, 8) computed from 4, 3 tokens; seq 1 text; seq 2: image at [0, 3)
    seqs = [_Seq(_mm((2, 6))), _Seq(None), _Seq(_mm((0, 3)))]
    starts, q_lens = np.array([4, 0, 0]), np.array([3, 2, 5])
    cu = np.array([0, 3, 5, 10])
    plan = plan_image_rows(seqs, starts, q_lens, cu)
    assert plan.rows.tolist() == [0, 1, 2, 5, 6, 7]
    assert [(k, lo, hi) for _, k, lo, hi in plan.pieces] == [(0, 2, 5), (0, 0, 3)]
    assert plan_image_rows([_Seq(_mm((2, 6)))], np.array([8]), np.array([1]),
                           np.array([0, 1])) is None  # past the image: no rows


def test_mrope_positions_of_a_step():
    mm = _mm((1, 4))
    mm.rope_positions = np.array([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]])
    mm.rope_delta = -2
    seqs = [_Seq(mm), _Seq(None)]
    # seq 0: prompt tokens 4, 5 and its first generated token 6; seq 1: text at 7, 8
    out = mrope_positions(seqs, np.array([4, 7]), np.array([3, 2]), np.array([4, 5, 6, 7, 8]))
    assert out.tolist() == [[1, 3, 4, 7, 8], [2, 3, 4, 7, 8], [2, 3, 4, 7, 8]]


def test_mrope_positions_are_one_row_without_image_tokens():
    # Three equal rows are plain rope: steps past the image (every decode step) and
    # text-only steps get [T], the shape the decode graphs replay.
    mm = _mm((1, 4))
    mm.rope_positions = np.array([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]])
    mm.rope_delta = -2
    seqs = [_Seq(mm), _Seq(None)]
    decode = mrope_positions(seqs, np.array([7, 9]), np.array([1, 1]), np.array([7, 9]))
    assert decode.ndim == 1 and decode.tolist() == [5, 9]
    # the prompt's last text token and the first generated one: still equal rows
    tail = mrope_positions(seqs[:1], np.array([5]), np.array([2]), np.array([5, 6]))
    assert tail.ndim == 1 and tail.tolist() == [3, 4]
    text = mrope_positions([_Seq(None)], np.array([0]), np.array([3]), np.array([0, 1, 2]))
    assert text.ndim == 1 and text.tolist() == [0, 1, 2]


def test_mrope_positions_token_by_token():
    # Random steps (rows with and without tables, chunks inside, across and past their
    # prompts, deltas 0 and negative) against the definition, one token at a time: a token
    # at position p of a prompt with a table reads column p while p is inside the prompt,
    # else p + delta on all three rows; [T] when all three rows agree.
    rng = np.random.default_rng(0)
    for _ in range(300):
        seqs, starts, q_lens = [], [], []
        for _ in range(int(rng.integers(1, 6))):
            mm = None
            if rng.random() < 0.7:
                mm = _mm((1, 4))
                prompt_len = int(rng.integers(3, 20))
                mm.rope_positions = np.tile(np.arange(prompt_len), (3, 1))
                if rng.random() < 0.5:   # an image span: rows differ
                    mm.rope_positions[1:, 1:3] = [[0, 0], [1, 1]]
                mm.rope_delta = int(rng.integers(-4, 1))
            seqs.append(_Seq(mm))
            starts.append(int(rng.integers(0, 25)))
            q_lens.append(int(rng.integers(1, 5)))
        want = []
        for seq, start, q in zip(seqs, starts, q_lens):
            mm = seq.mm_inputs
            for p in range(start, start + q):
                if mm is None:
                    want.append([p] * 3)
                elif p < mm.rope_positions.shape[1]:
                    want.append(mm.rope_positions[:, p].tolist())
                else:
                    want.append([p + mm.rope_delta] * 3)
        want = np.array(want).T
        positions = np.concatenate([np.arange(s, s + q) for s, q in zip(starts, q_lens)])
        got = mrope_positions(seqs, np.array(starts), np.array(q_lens), positions)
        if (want == want[:1]).all():
            assert got.ndim == 1 and got.tolist() == want[0].tolist()
        else:
            assert got.tolist() == want.tolist()
