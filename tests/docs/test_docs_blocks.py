"""The block collector and its text helpers (hpcinfer/testing/docs_blocks.py) on small pages."""
from __future__ import annotations

from hpcinfer.testing.docs_blocks import (angle_placeholders_as_words, commands_of, merged,
                                          read_blocks, substitute)

PAGE = """# Title

<!-- docs-test: needs-gpu -->
```Bash
nvidia-smi
```

1. In a list:

   <!--docs-test:  output   fragment -->
   ```yaml
   model:
     id: x
   ```

<!-- docs-test: -->
```python
print(1)
```

<!-- a comment, not a mark -->
~~~
plain
~~~
"""


def _blocks(tmp_path, text=PAGE):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(text)
    return read_blocks(page, tmp_path)


def test_blocks_have_file_line_ids_languages_and_marks(tmp_path):
    blocks = _blocks(tmp_path)
    assert [(b.id, b.lang, b.marks) for b in blocks] == [
        ("docs/page.md:4", "bash", ("needs-gpu",)),
        ("docs/page.md:11", "yaml", ("output", "fragment")),
        ("docs/page.md:17", "python", ("<empty>",)),
        ("docs/page.md:22", "", ()),
    ]
    assert blocks[1].text == "model:\n  id: x\n"     # the list item's indentation is removed
    assert blocks[0].is_skipped and not blocks[3].is_skipped


def test_an_empty_or_misspelt_mark_is_unknown(tmp_path):
    blocks = _blocks(tmp_path, "<!-- docs-test: needs-gpus -->\n```bash\nx\n```\n")
    assert blocks[0].unknown_marks == ["needs-gpus"]
    assert read_blocks(_write(tmp_path / "empty.md", PAGE), tmp_path)[2].unknown_marks == \
        ["<empty>"]


def _write(path, text):
    path.write_text(text)
    return path


def test_an_unclosed_fence_runs_to_the_end(tmp_path):
    blocks = _blocks(tmp_path, "text\n```bash\nls\nmore\n")
    assert len(blocks) == 1 and blocks[0].text == "ls\nmore\n"


def test_longer_placeholders_are_replaced_first():
    table = {"/tmp/mn": "/w/mn", "/tmp/mn/models/big": "/tiny"}
    assert substitute("a /tmp/mn/models/big b /tmp/mn/out", table) == "a /tiny b /w/mn/out"


def test_commands_drop_comments_and_blank_lines():
    assert commands_of("# hi\nbash dev/quickstart.sh   # note\n\n  ls -l\n") == \
        "bash dev/quickstart.sh\nls -l"


def test_angle_placeholders_become_words():
    assert angle_placeholders_as_words("x --revision <commit sha> > out") == \
        "x --revision PLACEHOLDER > out"


def test_an_excerpt_merges_into_a_job_key_by_key():
    base = {"name": "j", "resources": {"time": "1:00:00", "mem": "1G"}}
    assert merged(base, {"resources": {"mem": "4G"}, "task": "embed"}) == {
        "name": "j", "resources": {"time": "1:00:00", "mem": "4G"}, "task": "embed"}
