"""Session fixtures of the docs test: tiny checkpoints and a fake hub, both made on first use."""
from __future__ import annotations

from pathlib import Path

import pytest


class TinyModels:
    """Tiny random checkpoints by name (PLACEHOLDERS in test_docs.py), each built on first use
    and shared by the whole session. Treat them as read-only."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        if name not in self.paths:
            self.paths[name] = self._build(name, self.root / name)
        return self.paths[name]

    @staticmethod
    def _build(name: str, out_dir: Path) -> Path:
        from hpcinfer.testing.tiny import build_tiny_checkpoint
        from hpcinfer.testing.tiny_pooling import build_tiny_pooling_checkpoint

        if name == "llava":             # a vision-language model with its processor
            from hpcinfer.testing.tiny_vision import build_tiny_llava
            return build_tiny_llava(out_dir)
        if name == "bert-st":           # a sentence-transformers embedding model
            return build_tiny_pooling_checkpoint("bert", out_dir, sentence_transformers=True)
        if name == "xlm-roberta-reranker":    # a cross-encoder has one label
            return build_tiny_pooling_checkpoint("xlm-roberta-cls", out_dir, num_labels=1)
        if name.endswith("-cls"):
            return build_tiny_pooling_checkpoint(name, out_dir)
        return build_tiny_checkpoint(name, out_dir)


class DocsHub:
    """A fake hub on 127.0.0.1 (hpcinfer.testing.fake_hub) serving each of ``repo_ids`` as the
    tiny llama plus a README.md, at the single commit ``commit``; started on first use."""

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_ids = ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B", "BAAI/bge-m3",
                "mistralai/Mistral-7B-Instruct-v0.3", "ORG/NAME")

    def __init__(self, models: TinyModels):
        self.models = models
        self.hub = None

    def endpoint(self) -> str:
        if self.hub is None:
            from hpcinfer.testing.fake_hub import FakeHub, FakeRepo

            llama = self.models.path("llama")
            files = {p.relative_to(llama).as_posix(): p.read_bytes()
                     for p in sorted(llama.rglob("*")) if p.is_file()}
            files["README.md"] = b"# a tiny random llama served by the docs test\n"
            repos = {repo_id: FakeRepo(commits={self.commit: files}, refs={"main": self.commit})
                     for repo_id in self.repo_ids}
            self.hub = FakeHub(repos=repos)
            self.hub.start()
        return self.hub.endpoint

    def stop(self) -> None:
        if self.hub is not None:
            self.hub.stop()


@pytest.fixture(scope="session")
def docs_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("docs-models"))


@pytest.fixture(scope="session")
def docs_hub(docs_models):
    hub = DocsHub(docs_models)
    yield hub
    hub.stop()
