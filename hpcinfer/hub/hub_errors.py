"""Turn huggingface_hub / httpx exceptions into our one-line, what-to-do errors.

Kept apart from errors.py because this one imports huggingface_hub (lazily, when an exception
actually arrives) while errors.py is imported by workers that must not need it.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from hpcinfer.hub.errors import DownloadError, HubError, ModelAccessError


@contextlib.contextmanager
def translate_hub_errors(model_id: str, revision: str) -> Iterator[None]:
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        if not _is_hub_failure(exc):
            raise  # a bug (ours or the hub client's) keeps its traceback
        raise _translate(exc, model_id, revision) from exc


def _is_hub_failure(exc: Exception) -> bool:
    from huggingface_hub import errors as hub

    chain = list(_causes(exc))
    return (isinstance(exc, OSError) or _is_network(chain) or any(
        isinstance(e, (hub.HfHubHTTPError, hub.OfflineModeIsEnabled, hub.HFValidationError))
        for e in chain))


def _translate(exc: Exception, model_id: str, revision: str) -> Exception:
    from huggingface_hub import errors as hub

    chain = list(_causes(exc))
    for err in chain:
        if isinstance(err, hub.HFValidationError):
            return DownloadError(f"{model_id!r} is not a hub model id: use ORG/NAME as shown on "
                                 f"huggingface.co (letters, digits, '-', '_', '.'), or a local "
                                 f"directory in model.id")
        if isinstance(err, hub.GatedRepoError):
            return ModelAccessError(model_id, _status(err), is_gated=True, has_token=_has_token())
        if isinstance(err, hub.RevisionNotFoundError):
            return DownloadError(f"revision {revision} of {model_id} does not exist on the hub: "
                                 f"check --revision (a branch, tag or commit sha)")
        if isinstance(err, getattr(hub, "RemoteEntryNotFoundError", hub.EntryNotFoundError)):
            return DownloadError(f"a file of {model_id} at {revision} disappeared from the hub "
                                 f"while downloading ({_url(err)}): run the download again")
        if isinstance(err, hub.RepositoryNotFoundError) or _status(err) in (401, 403):
            return ModelAccessError(model_id, _status(err), is_gated=False, has_token=_has_token())
        if isinstance(err, hub.OfflineModeIsEnabled):
            return DownloadError("huggingface_hub is in offline mode (HF_HUB_OFFLINE): unset it "
                                 "and run `hpcinfer download` on the login node")
    if isinstance(exc, hub.HfHubHTTPError):
        return DownloadError(f"the hub answered HTTP {_status(exc)} for {model_id} ({_url(exc)}): "
                             f"try again later; re-running resumes the download")
    if isinstance(exc, OSError) and not _is_network(chain):
        return DownloadError(f"downloading {model_id} failed on this machine: {exc}; free space or "
                             f"fix permissions of the cache, then re-run to resume")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return DownloadError(f"cannot reach {endpoint} to download {model_id} "
                         f"({type(chain[-1]).__name__}): check the network or proxy (HTTPS_PROXY), "
                         f"then re-run the same command; finished files are kept")


def _has_token() -> bool | None:
    # Whether huggingface_hub found a token (HF_TOKEN or `hf auth login`); the value stays unread
    # by us beyond this None check and is never part of a message.
    try:
        from huggingface_hub import get_token
        return get_token() is not None
    except Exception:  # noqa: BLE001 - only a hint in the message
        return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _url(err: BaseException) -> str:
    response = getattr(err, "response", None)
    request = getattr(response, "request", None)
    # The URL names repo, revision and file; it never carries the token (that is a header).
    return str(getattr(request, "url", "")) or "unknown url"


def _is_network(chain: list[BaseException]) -> bool:
    kinds: list[type] = [ConnectionError, TimeoutError]
    # huggingface_hub >= 1.0 speaks httpx (2.x: its fork httpx2), older releases requests.
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError")):
        try:
            kinds.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return any(isinstance(e, tuple(kinds)) for e in chain)
