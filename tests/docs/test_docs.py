"""Docs are tested: every fenced block of README.md and docs/**/*.md is one test, id `file:line`.

How a block is treated (marks: the HTML comment on the line right before the fence, e.g.
`<!-- docs-test: needs-gpu -->`; the list is hpcinfer.testing.docs_blocks.MARKS):

- **Unmarked bash/sh/shell/console** blocks run with `bash -e -o pipefail` in the page's working
  dir. Each page gets one working dir, shared by its blocks, which run in page order (a block
  run alone first runs the unmarked blocks above it): a `job.yaml` written by an `hpcinfer init`
  block is there for the next block. The dir is a small checkout: copies of the repo's
  `configs/` and `dev/` (so `configs/examples/quickstart.yaml` and `bash dev/quickstart.sh`
  work as in the repo, writing under the dir) and `.venv` linking to the repo's venv, whose
  bin/ is first on PATH (`hpcinfer`, `python`); the real test models' cache
  (hpcinfer.testing.real_models, $HPCINFER_TEST_MODELS) is shared with the test suite, like
  the venv. HOME, the HF cache, $SCRATCH and $PROJECT are
  inside the dir and HF_HUB_OFFLINE=1: nothing reaches the hub or the user's files, except that
  a block naming one of conftest.DocsHub.repo_ids downloads it from a fake hub on 127.0.0.1.
- **Unmarked python** blocks run with the venv's python in the same dir.
- **yaml** blocks: a job file (top-level `model` and `input`) is written to the working dir and
  loaded with the config loader, environment checks included (`load_job`: schema, profile,
  paths, model dir, output dir); then, over a one-row input made from the columns it names
  (OpenAI batch input: the requests of the last jsonl block above it on the page), `hpcinfer
  validate` must pass. Anything else must be marked `fragment`: it must parse, have
  only job-file keys at the top, and load (without the environment checks) once merged into a
  minimal job file (check_yaml_fragment).
- **json/jsonl** blocks must parse (jsonl line by line) unless marked `output`.
- Blocks without a language (or text) are not commands: they must be marked `output`.
- **Marked** blocks do not run but are still checked where they can be: shell with `bash -n`
  (`<commit sha>`-style placeholders read as words), python with `ast.parse`, yaml `fragment`s
  as above. `self` (README only) is allowed for the commands in SELF_COMMANDS, each checked to
  be run by the CI file named there; the block's other lines run.
- Nothing skips (CI=true or not): a marked block passes once its checks pass.

Placeholders are replaced before a block runs or is loaded (PLACEHOLDERS below: snapshot paths
and hub ids -> tiny random checkpoints, conftest.TinyModels, built once per session on first
use). A block that cannot run here even with a placeholder gets the honest mark; a new
placeholder goes in the table. Cost: about 80 s of CPU in all (README's `bash dev/quickstart.sh`
and `LLM(..., tensor_parallel_size=2)` are the longest, ~15 s each).

An unmarked block identical to one that already passed, both being the first runnable block of
their pages (so no page state differs), passes by reference instead of running twice.

When a block fails, the message shows the block as run, its output, and the two ways out:
fix the page (or the code), or mark the block.
"""
from __future__ import annotations

import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from hpcinfer.testing.docs_blocks import (JSON_LANGS, MARKS, PYTHON_LANGS, SHELL_LANGS,
                                          YAML_LANGS, DocBlock, angle_placeholders_as_words,
                                          commands_of, doc_pages, merged, read_blocks,
                                          substitute)
from hpcinfer.testing.real_models import cache_root as real_models_cache

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
BLOCK_TIMEOUT_S = 180

# Commands a README block may carry under `self`: command -> (file CI runs, text it contains).
SELF_COMMANDS = {
    "bash dev/test.sh": (".ci/run", "bash dev/test.sh"),
}

# placeholder -> name of a tiny checkpoint (built lazily by TinyModels) or "{workdir}/...".
PLACEHOLDERS = {
    "/path/to/snapshot": "llama",
    "Qwen/Qwen2.5-0.5B-Instruct": "llama",
    "/path/to/minilm": "bert-st",
    "/path/to/all-MiniLM-L6-v2": "bert-st",
    "/path/to/Qwen2.5-1.5B-apeach": "qwen2-cls",
    "/path/to/classifier-snapshot": "qwen2-cls",
    "/path/to/Skywork-Reward-Llama": "llama-cls",
    "/path/to/reward-model": "llama-cls",
    "/path/to/bge-reranker-v2-m3": "xlm-roberta-reranker",
    "/path/to/reranker": "xlm-roberta-reranker",
    "/tmp/mn/models/Llama-3.1-405B-Instruct": "llama",
    "/tmp/mn": "{workdir}/mn",
    "/path/to/a/model/dir": "llama",
    "/path/to/llava-snapshot": "llava",    # docs/vision.md
    "/project/def-pi/hf-hub": "{workdir}/project/def-pi/hf-hub",
    "<commit sha>": "{hub_commit}",        # the fake hub's commit (conftest.DocsHub)
    # The real SmolLM2 answers at ~2 tokens/s on 2 busy cores: README's `bash dev/quickstart.sh`
    # runs it once; other blocks that name it get the tiny llama.
    "$(python -m hpcinfer.testing.real_models smollm2-135m-instruct)": "llama",
}


BLOCKS = [block for page in doc_pages(REPO) for block in read_blocks(page, REPO)]


class Pages:
    """One working dir per page; remembers which blocks ran there (blocks run in page order)."""

    def __init__(self, root: Path, models, hub):
        self.root, self.models, self.hub = root, models, hub   # conftest: TinyModels, DocsHub
        self.dirs: dict[str, Path] = {}
        self.ran: set[str] = set()
        self.passed_first: dict[str, str] = {}   # command key of a page's first block -> id

    def workdir(self, page: str) -> Path:
        if page not in self.dirs:
            workdir = self.root / page.replace("/", "__")
            workdir.mkdir(parents=True)
            for name in ("configs", "dev"):
                shutil.copytree(REPO / name, workdir / name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            (workdir / ".venv").symlink_to(REPO / ".venv")
            (workdir / "home").mkdir()
            self.dirs[page] = workdir
        return self.dirs[page]

    def table(self, text: str, workdir: Path) -> dict[str, str]:
        """The substitutions ``text`` needs (only those checkpoints are built)."""
        table = {}
        for placeholder, target in PLACEHOLDERS.items():
            if placeholder in text:
                table[placeholder] = (target.format(workdir=workdir, hub_commit=self.hub.commit)
                                      if "{" in target else str(self.models.path(target)))
        return table

    def env(self, text: str, workdir: Path) -> dict[str, str]:
        env = _env(workdir)
        if any(repo_id in text for repo_id in self.hub.repo_ids):
            for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
                env.pop(name)
            env.update(HF_ENDPOINT=self.hub.endpoint(), NO_PROXY="127.0.0.1,localhost",
                       HF_HUB_DISABLE_TELEMETRY="1")
            for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
                env.pop(name, None)
        return env

    def same_first_block_passed(self, block: DocBlock) -> str | None:
        """The id of an identical block that passed as the first runnable block of another page
        (e.g. `bash dev/quickstart.sh` in README.md and docs/quickstart.md): with no page state
        before it, running it again would test nothing new."""
        first = next(b for b in BLOCKS if b.path == block.path and _runs(b))
        return self.passed_first.get(_command_key(block)) if first == block else None

    def run_earlier(self, block: DocBlock) -> None:
        """Run the page's unmarked runnable blocks above ``block`` that have not run yet."""
        for earlier in BLOCKS:
            if earlier.path == block.path and earlier.line < block.line \
                    and earlier.id not in self.ran and _runs(earlier):
                run_block(earlier, self)


@pytest.fixture(scope="session")
def pages(tmp_path_factory, docs_models, docs_hub):
    return Pages(tmp_path_factory.mktemp("docs-pages"), docs_models, docs_hub)


def _runs(block: DocBlock) -> bool:
    return not block.is_skipped and block.lang in SHELL_LANGS | PYTHON_LANGS


def _site_env(workdir: Path) -> dict[str, str]:
    """What cluster guides take for granted ($SCRATCH, $PROJECT), inside the working dir."""
    return {"SCRATCH": str(workdir / "scratch"), "PROJECT": str(workdir / "project")}


def _env(workdir: Path) -> dict[str, str]:
    env = {**os.environ, **_site_env(workdir)}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               VIRTUAL_ENV=str(VENV_BIN.parent),
               HOME=str(workdir / "home"), HF_HOME=str(workdir / "home" / "hf"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HPCINFER_TEST_MODELS=str(real_models_cache()))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "PYTHONPATH"):
        env.pop(name, None)
    return env


def _fail(block: DocBlock, text: str, problem: str, output: str = "") -> None:
    shown = "\n".join(f"    {line}" for line in text.rstrip("\n").splitlines())
    tail = output[-6000:]
    pytest.fail(
        f"{block.id}: {problem}\n--- the block as run ---\n{shown}\n"
        + (f"--- its output (last 6000 characters) ---\n{tail}\n" if output else "")
        + "--- what to do ---\nfix the page (or the code it describes) so the block works, or, "
        "if it cannot run here, put the honest mark on the line above its fence, e.g. "
        "`<!-- docs-test: needs-gpu -->` (marks: " + ", ".join(MARKS) + "; see "
        "tests/docs/test_docs.py); a new placeholder goes in PLACEHOLDERS there.",
        pytrace=False)


def run_block(block: DocBlock, pages: Pages) -> None:
    """Run an unmarked shell or python block in its page's working dir."""
    workdir = pages.workdir(block.path)
    pages.ran.add(block.id)
    text = _runnable_text(block)
    text = substitute(text, pages.table(text, workdir))
    if block.lang in PYTHON_LANGS:
        script = workdir / f"block_L{block.line}.py"
        script.write_text(text)
        argv = [str(VENV_BIN / "python"), str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", text]
    try:
        proc = subprocess.run(argv, cwd=workdir, env=pages.env(text, workdir),
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        _fail(block, text, f"did not finish within {BLOCK_TIMEOUT_S} s (in {workdir})",
              (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
              else exc.stdout or "")
    if proc.returncode != 0:
        _fail(block, text, f"exited with status {proc.returncode} (ran in {workdir})",
              proc.stdout)
    print(f"{block.id} ran in {workdir}:\n{proc.stdout}")   # shown with pytest -rP
    if next(b for b in BLOCKS if b.path == block.path and _runs(b)) == block:
        pages.passed_first.setdefault(_command_key(block), block.id)


def _runnable_text(block: DocBlock) -> str:
    """The block without its `self` lines (CI runs those itself)."""
    if "self" not in block.marks:
        return block.text
    return "".join(line for line in block.text.splitlines(keepends=True)
                   if _self_command(line) is None)


def _command_key(block: DocBlock) -> str:
    return f"{block.lang}\n{commands_of(_runnable_text(block))}"


def _self_command(line: str) -> str | None:
    command = commands_of(line)
    return command if command in SELF_COMMANDS else None


def check_self(block: DocBlock) -> None:
    if block.path != "README.md":
        _fail(block, block.text, "`self` is only for the README's own install/test commands")
    commands = [c for c in map(_self_command, block.text.splitlines()) if c]
    if not commands:
        _fail(block, block.text, "marked `self` but has none of the commands in SELF_COMMANDS")
    for command in commands:
        ci_file, needle = SELF_COMMANDS[command]
        if needle not in (REPO / ci_file).read_text():
            _fail(block, block.text, f"`{command}` is marked `self`, but {ci_file} (which CI "
                  f"runs) no longer contains `{needle}`: CI does not run it")


def check_yaml(block: DocBlock, pages: Pages) -> None:
    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        _fail(block, block.text, f"is not valid YAML: {exc}")
    if not isinstance(data, dict):
        _fail(block, block.text, "is not a YAML mapping (a job file or an excerpt of one)")
    from hpcinfer.config import ConfigError, JobConfig, load_job

    unknown = sorted(set(data) - set(JobConfig.model_fields))
    if unknown:
        _fail(block, block.text, f"has top-level keys {unknown} that a job file does not have "
              f"(job file keys: {list(JobConfig.model_fields)})")
    if "fragment" in block.marks:
        check_yaml_fragment(block, data, pages)
        return
    if not {"model", "input"} <= set(data):
        _fail(block, block.text, "is an excerpt, not a whole job file (no model/input): mark it "
              "`fragment` if that is meant")

    workdir = pages.workdir(block.path)
    text = substitute(block.text, pages.table(block.text, workdir))
    job_file = workdir / f"job_L{block.line}.yaml"
    job_file.write_text(text)
    try:
        cfg = load_job(job_file)
    except ConfigError as exc:
        _fail(block, text, f"the job file does not load: {exc}")
    if cfg.input.format == "openai-batch":
        requests = _requests_shown_above(block)
        if requests is None:
            return      # no example requests on the page: the loader's checks are all we do
        write_inputs(cfg.input, requests)
    else:
        write_inputs(cfg.input, json.dumps(one_row(cfg.input)) + "\n")
    proc = subprocess.run([str(VENV_BIN / "hpcinfer"), "validate", str(job_file)], cwd=workdir,
                          env=pages.env(text, workdir), capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    if proc.returncode != 0:
        _fail(block, text, f"`hpcinfer validate` fails (exit {proc.returncode}) over inputs "
              "made from the file's own column names (or the page's example requests)",
              proc.stdout + proc.stderr)
    print(f"{block.id}: hpcinfer validate {job_file}:\n{proc.stdout}{proc.stderr}")


def _requests_shown_above(block: DocBlock) -> str | None:
    """The last jsonl block above ``block`` on its page (OpenAI batch requests), if any."""
    above = [b for b in BLOCKS if b.path == block.path and b.line < block.line
             and b.lang == "jsonl"]
    return above[-1].text if above else None


def one_row(section) -> dict:
    """A row holding every column the input section names (the page's data is not here)."""
    row = {name: "hello world" for name in (section.prompt_field, section.text_field,
                                            section.text_1_field, section.text_2_field,
                                            *section.passthrough) if name}
    if section.id_field:
        row[section.id_field] = "row-0"
    if section.messages_field:
        row[section.messages_field] = [{"role": "user", "content": "hello"}]
    return row


def write_inputs(section, jsonl: str) -> None:
    """For each input glob that matches nothing, one file with the ``jsonl`` rows (as Parquet
    for a .parquet glob)."""
    for pattern in section.path:
        pattern = Path(pattern)
        if any(pattern.parent.glob(pattern.name)):
            continue
        path = pattern.parent / pattern.name.replace("*", "part-0")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = [json.loads(line) for line in jsonl.splitlines() if line.strip()]
            pq.write_table(pa.Table.from_pylist(rows), path)
        elif path.suffix == ".txt":
            path.write_text("hello world\n")
        else:
            path.write_text(jsonl)


def check_yaml_fragment(block: DocBlock, data: dict, pages: Pages) -> None:
    """Merge the excerpt into a minimal job (the page's cluster for docs/clusters/<name>.md;
    task embed when it sets pooling) and load it without the environment checks: its keys and
    values must still be valid."""
    from hpcinfer.config import ConfigError, load_job

    cluster = Path(block.path).stem if block.path.startswith("docs/clusters/") else "generic"
    pooling = "pooling" in data
    base = {"name": "docs-fragment", "cluster": cluster, "task": "embed" if pooling else "generate",
            "model": {"id": "/nonexistent/model"},
            "input": {"path": "in.jsonl", ("text_field" if pooling else "prompt_field"): "x"},
            "output": {"dir": "out"}}
    workdir = pages.workdir(block.path)
    job_file = workdir / f"fragment_L{block.line}.yaml"
    job_file.write_text(yaml.safe_dump(merged(base, data), sort_keys=False))
    try:
        with mock.patch.dict(os.environ, _site_env(workdir)):
            load_job(job_file, check_environment=False)
    except ConfigError as exc:
        _fail(block, job_file.read_text(), f"the excerpt, merged into a minimal job file (shown), "
              f"does not load: {exc}")


def check_json(block: DocBlock) -> None:
    docs = block.text.splitlines() if block.lang == "jsonl" else [block.text]
    for doc in filter(str.strip, docs):
        try:
            json.loads(doc)
        except json.JSONDecodeError as exc:
            _fail(block, block.text, f"is not valid {block.lang} ({exc}); mark it `output` if it "
                  "shows the shape of output rather than literal data")


def check_syntax(block: DocBlock) -> None:
    """What a marked block must still satisfy."""
    if block.lang in SHELL_LANGS:
        proc = subprocess.run(["bash", "-n"], input=angle_placeholders_as_words(block.text),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            _fail(block, block.text, "is not valid bash (bash -n)", proc.stderr)
    elif block.lang in PYTHON_LANGS:
        try:
            ast.parse(block.text)
        except SyntaxError as exc:
            _fail(block, block.text, f"is not valid Python: {exc}")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: DocBlock, pages: Pages) -> None:
    if block.unknown_marks:
        _fail(block, block.text, f"unknown docs-test mark(s) {block.unknown_marks}; "
              f"known: {', '.join(MARKS)}")
    if "fragment" in block.marks and block.lang not in YAML_LANGS | PYTHON_LANGS:
        _fail(block, block.text, "`fragment` is only for yaml or python excerpts")
    if "self" in block.marks:
        check_self(block)
    if block.lang in YAML_LANGS and "output" not in block.marks:
        check_yaml(block, pages)
    elif block.lang in JSON_LANGS and "output" not in block.marks:
        check_json(block)
    elif block.lang not in SHELL_LANGS | PYTHON_LANGS | YAML_LANGS | JSON_LANGS \
            and "output" not in block.marks:
        _fail(block, block.text, f"a block in language {block.lang or '(none)'!r} is not run: "
              "give the fence a language that runs (bash, python, yaml) or mark it `output`")
    elif block.is_skipped:
        if "output" not in block.marks:
            check_syntax(block)
    elif block.lang in SHELL_LANGS | PYTHON_LANGS:
        same = pages.same_first_block_passed(block)
        if same:
            print(f"{block.id}: the same block passed as {same}, first on its page too")
            return
        pages.run_earlier(block)
        if block.id not in pages.ran:
            run_block(block, pages)


def test_every_page_has_its_blocks_collected():
    """The collector sees every fence: a page whose fences do not pair up would hide blocks."""
    for page in doc_pages(REPO):
        lines = page.read_text(encoding="utf-8").splitlines()
        fences = sum(1 for line in lines if line.strip().startswith(("```", "~~~")))
        blocks = read_blocks(page, REPO)
        assert fences == 2 * len(blocks), (
            f"{page.relative_to(REPO)}: {fences} fence lines but {len(blocks)} blocks: "
            "an unclosed fence, or a fence inside a block")


def test_multi_node_page_shows_the_script_its_job_file_renders(tmp_path, pages):
    """docs/multi-node.md shows a job file and, "verbatim", the script it renders: an `output`
    block that would drift silently, so it is compared with a fresh render (paths under
    /tmp/mn mapped to a temp dir, the interpreter path normalized)."""
    blocks = read_blocks(REPO / "docs/multi-node.md", REPO)
    job = next(b for b in blocks if b.lang in YAML_LANGS and "name: tp4-pp2" in b.text)
    shown = next(b for b in blocks if b.text.startswith("#!/bin/bash\n# hpcinfer "))
    site = tmp_path / "mn"
    (site / "prompts").mkdir(parents=True)
    (site / "prompts" / "part-0.jsonl").write_text('{"id": "q0", "prompt": "Hello"}\n')
    (site / "multinode.yaml").write_text(substitute(job.text, {
        "/tmp/mn/models/Llama-3.1-405B-Instruct": str(pages.models.path("llama")),
        "/tmp/mn": str(site)}))
    proc = subprocess.run([str(VENV_BIN / "hpcinfer"), "render", str(site / "multinode.yaml")],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rendered = (site / "out" / "submit.sbatch").read_text().replace(str(site), "/tmp/mn")
    python = re.compile(r"^worker=\(\S+ -m hpcinfer\.worker", re.M)
    normalized = [python.sub("worker=(PYTHON -m hpcinfer.worker", text)
                  for text in (shown.text, rendered)]
    if normalized[0] != normalized[1]:
        diff = "".join(difflib.unified_diff(normalized[0].splitlines(True),
                                            normalized[1].splitlines(True),
                                            f"{shown.id} (shown)", "rendered now"))
        pytest.fail(f"{shown.id}: the script shown is not what `hpcinfer render` writes now:\n"
                    f"{diff}\nif the change is meant, paste the rendered script into the page "
                    f"(render {job.id}'s job file with /tmp/mn as in the page)", pytrace=False)


def test_a_failing_block_fails_showing_the_block_its_output_and_what_to_do(pages):
    block = DocBlock("docs/not-a-page.md", 3, "bash", "echo said-by-the-block\nexit 3\n", ())
    with pytest.raises(pytest.fail.Exception) as failure:
        run_block(block, pages)
    message = str(failure.value)
    assert "docs/not-a-page.md:3: exited with status 3" in message
    assert "    exit 3" in message and "\nsaid-by-the-block\n" in message
    assert "<!-- docs-test: needs-gpu -->" in message


def test_an_unknown_mark_or_an_unmarked_output_block_fails(pages):
    for block in (DocBlock("docs/not-a-page.md", 9, "bash", "true\n", ("needs-gpus",)),
                  DocBlock("docs/not-a-page.md", 19, "", "some output\n", ())):
        with pytest.raises(pytest.fail.Exception):
            test_doc_block(block, pages)
