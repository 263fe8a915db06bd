"""Errors of the hub side: each message says what to do next.

The CLI prints `str(error)` as one line on stderr and exits with `EXIT_CODE`; nothing here ever
carries a token (messages are built from model ids, revisions and file names only).
"""
from __future__ import annotations

EXIT_CODE = 2


class HubError(Exception):
    """Base class: a user-facing problem with downloading, finding or checking a model."""


class ModelNotDownloaded(HubError):
    """The model has no download record (or its snapshot is gone) and we may not use the network."""

    def __init__(self, model_id: str, revision: str | None = None, detail: str = "") -> None:
        self.model_id = model_id
        self.revision = revision
        rev = f" --revision {revision}" if revision else ""
        what = f"model {model_id}" + (f" at revision {revision}" if revision else "")
        reason = f" ({detail})" if detail else ""
        super().__init__(
            f"{what} is not downloaded{reason}: "
            f"run `hpcinfer download {model_id}{rev}` on the login node first"
        )


class ModelPathNotFound(ModelNotDownloaded):
    """model.id looks like a filesystem path, but nothing is there."""

    def __init__(self, path: str) -> None:
        self.model_id = path
        self.revision = None
        HubError.__init__(
            self,
            f"model path {path} is not a directory: run `hpcinfer download ID` on the login node "
            f"first and use the model id, or fix the path",
        )


class ModelAccessError(HubError):
    """401/403/404/gated: the token is missing, wrong, or has no access to the repo."""

    def __init__(self, model_id: str, status: int | None, is_gated: bool,
                 has_token: bool | None = None) -> None:
        self.model_id = model_id
        self.status = status
        self.is_gated = is_gated
        code = f"HTTP {status}" if status else "no access"
        if is_gated:
            kind = "the model is gated"
        elif status == 404:
            kind = "no such model (check the id), or it is private or gated"
        else:
            kind = "the model is private or gated"
        token = {None: "", True: " (a token was sent but has no access)",
                 False: " (no token found)"}[has_token]
        super().__init__(
            f"cannot download {model_id} ({code}): {kind}{token}; request access on its page "
            f"https://huggingface.co/{model_id} , then provide a token with access: "
            f"`hf auth login` on the login node or `export HF_TOKEN=...`"
        )


class DownloadError(HubError):
    """Network, server or disk trouble while downloading; re-running resumes."""


class VerificationError(HubError):
    """A snapshot is incomplete or corrupt; the message names the bad file."""

    def __init__(self, path: str, problem: str, advice: str = "") -> None:
        self.path = path
        self.problem = problem
        advice = advice or ("run `hpcinfer download` for this model again (it re-fetches missing "
                            "or damaged files)")
        super().__init__(f"{path}: {problem}; {advice}")
