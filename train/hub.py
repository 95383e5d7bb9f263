"""The Hugging Face Hub, both ways, through `huggingface_hub`: push a model folder, fetch a model's files.

A push is one `create_commit`: the client uploads the large files first (LFS or Xet), then asks for
one commit, which the Hub applies whole or not at all. The client leaves out every file whose hash
equals the one already on the Hub, so pushing the same folder again makes no commit. (`upload_folder`
is not used: with `hf_xet` installed it may split a folder over several commits.) The token comes from
the usual places (`HF_TOKEN`, `hf auth login`) and is never printed or stored; every failure is one
line (HubError) that says what to do.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from prep.text import causes, first_line

TOKENS_PAGE = "https://huggingface.co/settings/tokens"


class HubError(Exception):
    """The Hub could not be reached, refused the token, or lacks the repo; one line, never the token."""


class Pushed(NamedTuple):
    url: str  # the repo's page
    commit: str  # the commit the revision points at after the push
    changed: bool  # False: every file was already there, no commit was made


def _api():
    """An HfApi with the usual token (None if there is none), quiet: a failure that remains is our one line."""
    import huggingface_hub
    from huggingface_hub.utils import logging

    logging.set_verbosity_error()  # retry warnings and "No files have been modified"; we say what happened
    token = huggingface_hub.get_token()
    return huggingface_hub.HfApi(token=token), token


def push_folder(folder: Path, files: list[str], managed: tuple[str, ...], repo_id: str, *, message: str,
                private: bool = False, revision: str | None = None) -> Pushed:
    """Commit `files` (names in `folder`) to the model repo `repo_id` in one commit on `revision`
    (a branch, made from main if missing; default main), creating the repo if missing (`private` only
    applies then). Files of `managed` that the repo holds but `files` lacks are deleted in the same commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    _check_repo_id(repo_id)
    api, token = _api()
    if token is None:
        raise HubError(f"no Hugging Face token to push {repo_id} with: run `hf auth login` or set HF_TOKEN to a token "
                       f"with write access ({TOKENS_PAGE})")
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = api.model_info(repo_id, revision=revision)
        there = {s.rfilename for s in before.siblings or []}
        operations = [CommitOperationAdd(name, str(folder / name)) for name in files]
        operations += [CommitOperationDelete(name) for name in managed if name in there and name not in files]
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except Exception as e:  # HTTP and network errors have no common base below Exception
        if not _is_hub_error(e):
            raise
        raise HubError(_push_error(e, repo_id, token)) from None
    return Pushed(str(url), commit.oid, commit.oid != before.sha)


def repo_files(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    """(commit, file names) of a model repo at `revision` (default main)."""
    _check_repo_id(repo_id)
    api, token = _api()
    try:
        info = api.model_info(repo_id, revision=revision)
    except Exception as e:  # as in push_folder
        if not _is_hub_error(e):
            raise
        raise HubError(_fetch_error(e, repo_id, revision, token)) from None
    return info.sha, sorted(s.rfilename for s in info.siblings or [])


def download(repo_id: str, name: str, commit: str) -> Path:
    """One file of a model repo at a commit, through the Hugging Face cache (no download if cached)."""
    from huggingface_hub import hf_hub_download

    _, token = _api()
    try:
        return Path(hf_hub_download(repo_id, name, revision=commit, token=token))
    except Exception as e:  # as in push_folder
        if not _is_hub_error(e):
            raise
        raise HubError(_fetch_error(e, repo_id, commit, token)) from None


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it must be USER/NAME")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a Hub repo id ({first_line(e)})") from None


def _is_hub_error(e: BaseException) -> bool:
    """An HTTP answer of the Hub, or a failure of the client's transport, anywhere in e's chain;
    anything else is a bug and keeps its traceback. By the client's own exception types: its
    HfHubHTTPError, Python's ConnectionError and TimeoutError, and the root error of the HTTP library
    the client's own session is made of (httpx2 for huggingface_hub 1.x; found from the session, not
    from a list of module names, so the next rename of that library is followed too)."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import get_session

    library = sys.modules[type(get_session()).__module__.split(".")[0]]
    transport = getattr(library, "HTTPError", ConnectionError)  # httpx's (and requests') root error class
    return any(isinstance(x, (HfHubHTTPError, ConnectionError, TimeoutError, transport)) for x in causes(e))


def _status(e: BaseException) -> tuple[int | None, str]:
    """(HTTP status, the server's message) of an HfHubHTTPError met in `e` or its causes; (None, "") if none."""
    from huggingface_hub.errors import HfHubHTTPError

    for x in causes(e):
        if isinstance(x, HfHubHTTPError) and x.response is not None:
            return x.response.status_code, (x.server_message or "").strip().rstrip(".")
    return None, ""


def _reason(e: BaseException, token: str | None) -> str:
    """The first line of the deepest cause (the network error under the client's wrapping), token masked."""
    *_, e = causes(e)
    return f"{type(e).__name__}: {first_line(e, token)}"


def _push_error(e: BaseException, repo_id: str, token: str | None) -> str:
    status, said = _status(e)
    said = f": {said}" if said else ""
    if status == 401:
        return (f"{repo_id}: the Hub did not accept the token (HTTP 401{said}); run `hf auth login` again or set "
                f"HF_TOKEN to a valid token with write access ({TOKENS_PAGE})")
    if status == 403:
        return (f"{repo_id}: this token has no write access there (HTTP 403{said}); use a token with write access "
                f"to {repo_id.split('/')[0]} ({TOKENS_PAGE})")
    if status is not None:
        return f"{repo_id}: the Hub refused the push (HTTP {status}{said}); nothing was committed"
    return (f"{repo_id}: the connection to the Hub failed during the push ({_reason(e, token)}); a commit is all "
            f"or nothing, so the repo holds its previous version or the whole new one: run the same command again")


def _fetch_error(e: BaseException, repo_id: str, revision: str | None, token: str | None) -> str:
    status, said = _status(e)
    said = f": {said}" if said else ""
    at = f" at revision {revision}" if revision else ""
    if status in (401, 404):
        return (f"{repo_id}: no such model repo{at} on the Hub, or this token cannot see it (HTTP {status}{said}); "
                f"check the name, or log in (`hf auth login`) for a private repo")
    if status is not None:
        return f"{repo_id}: the Hub refused the download{at} (HTTP {status}{said})"
    return f"{repo_id}: cannot reach the Hub ({_reason(e, token)}); check the network, or pass a local model folder"
