"""Fenced code blocks of README.md and docs/**/*.md, with their docs-test marks.

A block is marked by an HTML comment on the line right before its opening fence (indented like
the fence when the block sits in a list item)::

    <!-- docs-test: needs-gpu -->
    ```bash
    ...

Several marks may be given, separated by spaces. ``MARKS`` lists every mark and what it means;
tests/docs/test_docs.py says how unmarked blocks are run. Pure text handling: no hpcinfer
imports, no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARKS = {
    "needs-gpu": "needs a CUDA GPU (device: cuda, GPU benchmarks, GPU-only kernels)",
    "needs-cluster": "needs a real cluster: Slurm queue and results over time, several nodes, "
                     "site modules, ssh to a login node, apptainer/singularity",
    "needs-hub": "needs network access to the Hugging Face hub (downloads, tokens)",
    "output": "shows output or an excerpt of a generated file, not a command to run",
    "fragment": "a yaml or python excerpt that cannot run alone; it must still parse",
    "self": "the README's own install/test command, which CI runs itself (SELF_COMMANDS in "
            "tests/docs/test_docs.py names where)",
}
SKIP_MARKS = frozenset({"needs-gpu", "needs-cluster", "needs-hub", "output", "fragment"})

SHELL_LANGS = frozenset({"bash", "sh", "shell", "console"})
PYTHON_LANGS = frozenset({"python", "py"})
YAML_LANGS = frozenset({"yaml", "yml"})
JSON_LANGS = frozenset({"json", "jsonl"})

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_ANGLE_PLACEHOLDER = re.compile(r"<[A-Za-z][A-Za-z0-9 _.-]*>")
_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<marks>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class DocBlock:
    """One fenced block. ``line`` is the 1-based line of the opening fence; ``text`` has the
    fence's indentation removed; ``marks`` is empty for an unmarked block."""

    path: str            # relative to the repo root, e.g. "docs/quickstart.md"
    line: int
    lang: str            # first word of the info string, lower case ("" when none)
    text: str
    marks: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def unknown_marks(self) -> list[str]:
        return [m for m in self.marks if m not in MARKS]

    @property
    def is_skipped(self) -> bool:
        """Marked as not runnable here (it is still parsed where it can be)."""
        return any(m in SKIP_MARKS for m in self.marks)


def doc_pages(repo: Path) -> list[Path]:
    """README.md, then docs/**/*.md in sorted order."""
    return [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]


def read_blocks(page: Path, repo: Path) -> list[DocBlock]:
    """Every fenced block of ``page`` in order. An unclosed fence runs to the end of the file."""
    lines = page.read_text(encoding="utf-8").splitlines()
    rel = page.relative_to(repo).as_posix()
    blocks: list[DocBlock] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        end = i + 1
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        body = [_dedent(line, len(indent)) for line in lines[i + 1:end]]
        info = opening["info"].strip().split()
        blocks.append(DocBlock(rel, i + 1, info[0].lower() if info else "",
                               "\n".join(body) + "\n", _marks_before(lines, i)))
        i = end + 1
    return blocks


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}


def _dedent(line: str, width: int) -> str:
    return line[width:] if line[:width].strip() == "" else line.lstrip()


def _marks_before(lines: list[str], fence_index: int) -> tuple[str, ...]:
    if fence_index == 0:
        return ()
    mark = _MARK.match(lines[fence_index - 1])
    if not mark:
        return ()
    return tuple(mark["marks"].split()) or ("<empty>",)


def substitute(text: str, table: dict[str, str]) -> str:
    """Replace each placeholder of ``table`` (longest first, so a longer placeholder that
    contains a shorter one wins)."""
    for placeholder in sorted(table, key=len, reverse=True):
        text = text.replace(placeholder, table[placeholder])
    return text


def commands_of(text: str) -> str:
    """The shell lines of ``text`` without comments and blank lines (a crude cut at `` #``,
    enough to tell two blocks that run the same commands)."""
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("#"))


def angle_placeholders_as_words(text: str) -> str:
    """``<commit sha>``-style placeholders as a word, so that ``bash -n`` does not read them as
    redirections."""
    return _ANGLE_PLACEHOLDER.sub("PLACEHOLDER", text)


def merged(base: dict, layer: dict) -> dict:
    """``layer`` over ``base``, mappings merged key by key (a YAML excerpt into a job file)."""
    out = dict(base)
    for key, value in layer.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = merged(base[key], value) if both_dicts else value
    return out
