"""Publishing a finished dataset folder to the Hugging Face Hub.

Three pieces, each usable on its own:

- `parse_destination`: where to publish: `hf://datasets/OWNER/NAME[@REVISION]` (or `--repo OWNER/NAME`) for
  the Hub, anything else a local folder;
- `upload_plan`: what would be uploaded (every file and its size), checked against the Hub's repository
  limits before a single byte leaves the machine;
- `upload_steps`: the client calls the upload makes, in order, with their arguments (create the repo, the branch,
  then one folder upload); `--dry-run` prints them with the plan, and `upload_to_hub` makes exactly these calls.
  How many commits the folder upload makes is the client's choice (one, or several `(part N)` commits for a large
  folder), so no per-commit plan is printed: facedata does not choose the commits;
- `upload_to_hub`: creates the dataset repo (private by default) and uploads the folder.

The token comes from the caller, else `HF_TOKEN`, else the user's saved login (`hf auth login`). It is never
printed, logged, returned, or put into an error message: Hub errors become one-line `UserError`s that say what
to do, built from the status code only, and scrubbed of the token in any case.

huggingface_hub versions: up to 1.x, `HfApi.upload_large_folder` is the resumable, multi-commit upload (it keeps
its progress in `FOLDER/.cache/huggingface/`); from 2.x on it is gone and `HfApi.upload_folder` does the same job
(streamed, committed in batches, resumed by re-running the same call: committed files are skipped and uploaded
chunks deduplicated). `upload_to_hub` uses whichever the client has. Either way, re-running an interrupted upload
resumes it, and `.cache/huggingface/` (like `.git/`) is bookkeeping, never data: the library does not upload it
and `upload_plan` does not count it.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Literal
from urllib.parse import unquote

from facedata.core.errors import UserError

log = logging.getLogger(__name__)

REPO_TYPE = "dataset"
HF_SCHEME = "hf://"

# The Hub's repository limits (https://huggingface.co/docs/hub/repositories-recommendations and
# https://huggingface.co/docs/hub/storage-limits). Counts are strict "fewer than" limits.
MAX_ENTRIES_PER_FOLDER = 10_000  # files + subfolders directly in one folder
MAX_FILES_PER_REPO = 100_000
MAX_FILE_BYTES = 50 * 1000**3  # hard limit per file: 50 GB
WARN_FILE_BYTES = 5 * 1000**3  # above this a file uploads slowly and resumes coarsely: warn

NO_TOKEN_MESSAGE = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"

# What huggingface_hub itself never uploads (its DEFAULT_IGNORE_PATTERNS): git metadata and its own upload
# bookkeeping in `.cache/huggingface/` (where upload_large_folder keeps its resumable state).
_IGNORE_PATTERNS = [
    ".git", ".git/*", "*/.git", "**/.git/**",
    ".cache/huggingface", ".cache/huggingface/*", "*/.cache/huggingface", "**/.cache/huggingface/**",
]
# Ours: local-only folders inside a published dataset (`facedata search` keeps its index there).
LOCAL_ONLY_PATTERNS = ["search/*", "search/**"]


# --------------------------------------------------------------------------------------------- destinations


@dataclass(frozen=True)
class Destination:
    """Where a dataset goes: a Hub dataset repo (`repo_id`, optional `revision`) or a local folder (`path`)."""

    kind: Literal["hub", "folder"]
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    @property
    def is_hub(self) -> bool:
        return self.kind == "hub"

    @property
    def url(self) -> str | None:
        """The dataset's page on the Hub (None for a folder)."""
        if not self.is_hub:
            return None
        url = f"{_endpoint()}/datasets/{self.repo_id}"
        return url if self.revision in (None, "main") else f"{url}/tree/{self.revision}"

    def __str__(self) -> str:
        if self.is_hub:
            return f"{HF_SCHEME}datasets/{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        return str(self.path)


def parse_destination(dest: str | os.PathLike | None = None, *, repo: str | None = None) -> Destination:
    """Parse a publish destination.

    `dest` is `hf://datasets/OWNER/NAME` or `hf://datasets/OWNER/NAME@REVISION` for the Hub, or a local folder
    path. `repo` is the value of a `--repo OWNER/NAME[@REVISION]` option, an alternative to an `hf://` dest.
    Give one of the two. A malformed Hub destination raises a one-line `UserError`.
    """
    if repo is not None and dest is not None:
        raise UserError(f"destination: give either {str(dest)!r} or --repo {repo!r}, not both")
    if repo is not None:
        return parse_repo(repo)
    if dest is None or not str(dest).strip():
        raise UserError("destination: empty; give a folder or hf://datasets/OWNER/NAME")
    if isinstance(dest, os.PathLike):
        return Destination(kind="folder", path=Path(dest).expanduser())
    text = dest.strip()
    if text.lower().startswith(HF_SCHEME):
        return _parse_hf_url(text)
    if text.lower().startswith(("http://", "https://")):
        m = re.match(r"https?://(?:www\.)?huggingface\.co/datasets/([^/?#]+/[^/?#@]+)", text, re.IGNORECASE)
        hint = f"hf://datasets/{m.group(1)}" if m else "hf://datasets/OWNER/NAME"
        raise UserError(f"destination {text!r}: a web address is not a destination; use {hint}")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise UserError(f"destination {text!r}: unsupported scheme; use a folder or hf://datasets/OWNER/NAME")
    return Destination(kind="folder", path=Path(text).expanduser())


def parse_repo(value: str) -> Destination:
    """Parse a `--repo OWNER/NAME[@REVISION]` value into a Hub destination."""
    text = (value or "").strip()
    if text.lower().startswith(HF_SCHEME):
        return _parse_hf_url(text)
    name, revision = _split_revision(text, f"--repo {value!r}")
    return Destination(kind="hub", repo_id=check_repo_id(name, where=f"--repo {value!r}"), revision=revision)


def check_repo_id(repo_id: str, *, where: str | None = None) -> str:
    """Return `repo_id` if it is a valid `OWNER/NAME` Hub repo id, else raise a one-line `UserError`."""
    where = where or f"repo {repo_id!r}"
    parts = (repo_id or "").split("/")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"{where}: expected OWNER/NAME (a user or organisation, then the dataset name)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"{where}: {_one_line(str(err))}") from None
    return repo_id


def _parse_hf_url(text: str) -> Destination:
    where = f"destination {text!r}"
    rest = text[len(HF_SCHEME):]
    kind, _, rest = rest.partition("/")
    if kind != "datasets":
        raise UserError(f"{where}: only dataset repos can be published; use hf://datasets/OWNER/NAME")
    name, revision = _split_revision(rest.strip("/"), where)
    if name.count("/") > 1:
        raise UserError(f"{where}: a path inside the repo is not supported; use hf://datasets/OWNER/NAME")
    return Destination(kind="hub", repo_id=check_repo_id(name, where=where), revision=revision)


def _split_revision(text: str, where: str) -> tuple[str, str | None]:
    """`OWNER/NAME@REV` -> (`OWNER/NAME`, `REV`); the revision may be percent-encoded (`refs%2Fpr%2F1`)."""
    if "@" not in text:
        return text, None
    name, _, revision = text.partition("@")
    revision = unquote(revision).strip("/")
    if not revision or "@" in revision or ".." in revision or re.search(r"\s", revision):
        raise UserError(f"{where}: bad revision after '@' (expected a branch name such as main or v1.0)")
    return name, revision


# --------------------------------------------------------------------------------------------- upload plan


@dataclass(frozen=True)
class PlannedFile:
    path: str  # posix path relative to the folder = path in the repo
    size: int


@dataclass
class UploadPlan:
    """Every file the upload sends (with its size), plus warnings. Built by `upload_plan`."""

    folder: Path
    files: list[PlannedFile]
    warnings: list[str] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "files": self.n_files, "bytes": self.total_bytes,
                "warnings": list(self.warnings)}

    def describe(self, destination: str | None = None, *, steps: list[UploadStep] | None = None,
                 max_listed: int = 50) -> str:
        """Human-readable plan for `--dry-run`: totals, the calls the upload makes, then the files (the first
        `max_listed`)."""
        head = f"upload plan: {self.folder}" + (f" -> {destination}" if destination else "")
        lines = [head, f"  {self.n_files} files, {format_bytes(self.total_bytes)}, within the Hub's limits"
                       f" (fewer than {MAX_ENTRIES_PER_FOLDER:,} entries per folder and {MAX_FILES_PER_REPO:,}"
                       f" files, at most {format_bytes(MAX_FILE_BYTES)} per file)"]
        lines += [f"  warning: {w}" for w in self.warnings]
        if steps:
            lines.append("  the upload makes these calls, in this order:")
            lines += [f"    {i}. {step.method}: {step.description}" for i, step in enumerate(steps, 1)]
        lines.append("  files:")
        lines += [f"    {format_bytes(f.size):>10}  {f.path}" for f in self.files[:max_listed]]
        if self.n_files > max_listed:
            lines.append(f"    ... and {self.n_files - max_listed} more")
        return "\n".join(lines)


def upload_plan(folder: str | os.PathLike) -> UploadPlan:
    """List what an upload of `folder` sends and check it against the Hub's limits.

    Files are listed as huggingface_hub lists them (sorted, `.git/` and `.cache/huggingface/` left out). Raises a
    one-line `UserError` naming the folder or file when the Hub would refuse the upload: a folder with 10,000 or
    more entries, a file over 50 GB, 100,000 or more files; warns (log and `plan.warnings`) about files over 5 GB.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder, nothing to upload")
    from huggingface_hub.utils import filter_repo_objects

    root = folder.resolve()
    # The same listing as HfApi.upload_folder: sorted glob, files only, then the ignore patterns.
    by_rel = {p.relative_to(root).as_posix(): p for p in sorted(root.glob("**/*")) if p.is_file()}
    files = [PlannedFile(rel, by_rel[rel].stat().st_size)
             for rel in filter_repo_objects(by_rel.keys(), ignore_patterns=_IGNORE_PATTERNS + LOCAL_ONLY_PATTERNS)]
    if not files:
        raise UserError(f"{folder}: empty folder, nothing to upload")

    problems: list[str] = []
    warnings: list[str] = []
    if len(files) >= MAX_FILES_PER_REPO:
        problems.append(f"{folder}: {len(files):,} files; a Hub repo must hold fewer than {MAX_FILES_PER_REPO:,}:"
                        " merge them into fewer, larger shards")
    entries: dict[str, set[str]] = {}
    for f in files:
        parts = PurePosixPath(f.path).parts
        for depth in range(len(parts)):
            entries.setdefault("/".join(parts[:depth]), set()).add(parts[depth])
    for rel_dir, names in sorted(entries.items()):
        if len(names) >= MAX_ENTRIES_PER_FOLDER:
            problems.append(f"{folder / rel_dir if rel_dir else folder}: {len(names):,} entries in one folder;"
                            f" the Hub allows fewer than {MAX_ENTRIES_PER_FOLDER:,} per folder: split it into"
                            " subfolders")
    for f in files:
        if f.size > MAX_FILE_BYTES:
            problems.append(f"{folder / f.path}: {format_bytes(f.size)} is over the Hub's"
                            f" {format_bytes(MAX_FILE_BYTES)} per-file limit: split it into smaller shards")
        elif f.size > WARN_FILE_BYTES:
            warnings.append(f"{folder / f.path}: {format_bytes(f.size)} is over {format_bytes(WARN_FILE_BYTES)};"
                            " smaller shards upload and resume more reliably")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    for w in warnings:
        log.warning("%s", w)
    return UploadPlan(folder=folder, files=files, warnings=warnings)


@dataclass(frozen=True)
class UploadStep:
    """One client call of an upload: `getattr(api, method)(**kwargs)`, and what it does in words."""

    method: str
    kwargs: dict[str, Any]
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {"call": self.method, "kwargs": dict(self.kwargs), "description": self.description}


def upload_steps(folder: str | os.PathLike, repo_id: str, *, client: Any, private: bool = True,
                 revision: str | None = None, n_files: int | None = None,
                 num_workers: int | None = None) -> list[UploadStep]:
    """The calls `upload_to_hub` makes on `client` (an `HfApi`-like object or class), in order, with their exact
    arguments: the `--dry-run` output is built from the same list that the upload executes.

    The folder goes up in one call: `upload_large_folder` where the client has it (huggingface_hub <= 1.x), else
    `upload_folder`. Either chooses its own commits, so the steps say how many files go up, not how many commits.
    """
    folder = Path(folder).expanduser()
    what = f"{n_files} files" if n_files is not None else "the folder"
    visibility = "private" if private else "public"
    steps = [UploadStep("create_repo", dict(repo_id=repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True),
                        f"dataset repo {repo_id}, created {visibility} if missing (an existing repo is kept as it"
                        " is, visibility included)")]
    if revision is not None and revision != "main" and not revision.startswith("refs/"):
        steps.append(UploadStep("create_branch", dict(repo_id=repo_id, branch=revision, repo_type=REPO_TYPE,
                                                      exist_ok=True),
                                f"branch {revision!r} of {repo_id}, created if missing"))
    if hasattr(client, "upload_large_folder"):
        # huggingface_hub <= 1.x: resumable multi-commit upload; its state lives in
        # FOLDER/.cache/huggingface/ (never uploaded itself), so re-running picks up where it stopped.
        kwargs: dict[str, Any] = dict(repo_id=repo_id, folder_path=str(folder), repo_type=REPO_TYPE,
                                      revision=revision, private=private, ignore_patterns=LOCAL_ONLY_PATTERNS)
        if num_workers is not None:
            kwargs["num_workers"] = num_workers
        steps.append(UploadStep("upload_large_folder", kwargs,
                                f"{what} from {folder} in one call; huggingface_hub commits them in batches of its"
                                " own choosing and re-running resumes (its state is in .cache/huggingface/)"))
    else:
        # huggingface_hub >= 2.0 dropped upload_large_folder: upload_folder streams the files and commits
        # them in batches; re-running skips committed files and dedups uploaded chunks, so it resumes too.
        # It also ignores .git/ and .cache/huggingface/ (left over by an older upload_large_folder).
        steps.append(UploadStep("upload_folder",
                                dict(repo_id=repo_id, folder_path=str(folder), repo_type=REPO_TYPE,
                                     revision=revision, ignore_patterns=LOCAL_ONLY_PATTERNS,
                                     commit_message=f"Upload {folder.name} with facedata"),
                                f"{what} from {folder} in one call; huggingface_hub makes one commit, or several"
                                " ('(part N)') for a large folder, and re-running resumes"))
    return steps


# --------------------------------------------------------------------------------------------- upload


def resolve_token(token: str | None = None) -> tuple[str | None, str | None]:
    """(token, where it came from): the argument, else `HF_TOKEN`, else the saved login. Never log the token."""
    if token and token.strip():
        return token.strip(), "argument"
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env, "HF_TOKEN"
    saved = _saved_token()
    if saved:
        return saved, "saved login"
    return None, None


def _saved_token() -> str | None:
    """The token huggingface_hub would use (`hf auth login`'s token file, HUGGING_FACE_HUB_TOKEN, OIDC...)."""
    import huggingface_hub

    try:
        return huggingface_hub.get_token()
    except Exception as err:  # e.g. a failed OIDC exchange; its message carries no token of ours
        raise UserError(f"could not read the Hugging Face login: {type(err).__name__}:"
                        f" {_one_line(_scrub(str(err), None))}") from None


def upload_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = True, revision: str | None = None,
                  token: str | None = None, dry_run: bool = False, api: Any = None,
                  num_workers: int | None = None, shown_folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Upload `folder` to the Hub dataset repo `repo_id` (created if missing, private by default).

    `dry_run` plans, prints the plan and the calls the upload would make (`upload_steps`) and returns them without
    any Hub call (nor needing a token). Otherwise makes exactly those calls: create the repo (`exist_ok`; an
    existing repo keeps its visibility), the branch `revision` if it is not `main`, then the client's resumable
    folder upload: re-running after an interruption resumes. `api` is an `HfApi`-like client (default
    `HfApi(token=token)`); `num_workers` only applies to `upload_large_folder`. `shown_folder` (dry runs only)
    is the folder named in the printed plan when `folder` is a temporary build of it.
    Returns a summary dict (never the token). Hub and network failures raise one-line `UserError`s.
    """
    folder = Path(folder).expanduser()
    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        revision = None
    plan = upload_plan(folder)
    token, token_source = resolve_token(token)
    dest = Destination(kind="hub", repo_id=repo_id, revision=revision)
    if api is None and dry_run:
        from huggingface_hub import HfApi

        client: Any = HfApi  # the class: which upload method the installed client has
    elif api is None:
        if token is None:
            raise UserError(NO_TOKEN_MESSAGE)
        from huggingface_hub import HfApi

        client = api = HfApi(token=token)
    else:
        client = api
    shown = Path(shown_folder) if dry_run and shown_folder is not None else folder
    steps = upload_steps(shown, repo_id, client=client, private=private, revision=revision, n_files=plan.n_files,
                         num_workers=num_workers)
    shown_plan = UploadPlan(folder=shown, files=plan.files, warnings=plan.warnings)
    result: dict[str, Any] = {
        "destination": str(dest), "repo_id": repo_id, "repo_type": REPO_TYPE, "revision": revision,
        "private": private, "url": dest.url, "files": plan.n_files, "bytes": plan.total_bytes,
        "steps": [s.to_dict() for s in steps], "dry_run": dry_run, "token_source": token_source,
        "plan": shown_plan.to_dict(),
    }
    if dry_run:
        print(shown_plan.describe(str(dest), steps=steps))
        print(f"  token: {token_source or 'missing (' + NO_TOKEN_MESSAGE + ')'}")
        return result
    if token is None:
        raise UserError(NO_TOKEN_MESSAGE)
    log.info("uploading %d files (%s) from %s to %s (%s), token from %s", plan.n_files,
             format_bytes(plan.total_bytes), folder, dest.url, "private" if private else "public", token_source)
    endpoint = str(getattr(api, "endpoint", None) or _endpoint()).rstrip("/")
    with _hub_errors(repo_id, revision, token, endpoint):
        info = None
        for step in steps:
            log.info("upload: %s: %s", step.method, step.description)
            info = getattr(api, step.method)(**step.kwargs)
        result["method"] = steps[-1].method
        for key in ("commit_url", "oid"):
            if getattr(info, key, None):
                result[key] = str(getattr(info, key))
    log.info("uploaded %s", dest.url)
    return result


# --------------------------------------------------------------------------------------------- errors


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Network failures across huggingface_hub's HTTP stacks (httpx2 in 2.x, httpx in 1.x, requests before)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, token: str | None, endpoint: str) -> Iterator[None]:
    """Turn Hub/network failures into one-line `UserError`s that say what to do, without the token.

    The original exception is not chained (its text or request could carry credentials); a scrubbed summary
    goes to the debug log instead.
    """
    from huggingface_hub.errors import (HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    resume = "; re-run the same command to resume"
    try:
        yield
    except UserError:
        raise
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        log.debug("Hub error %s (%s): %s", type(err).__name__, status, _one_line(_scrub(str(err), token)))
        if isinstance(err, RevisionNotFoundError):
            msg = f"branch {revision!r} not found in dataset {repo_id}: create it on the Hub or publish to main"
        elif isinstance(err, RepositoryNotFoundError):
            msg = (f"dataset {repo_id} not found or not writable with this token ({status}): check OWNER/NAME and"
                   f" that the token may write to {repo_id.split('/')[0]}")
        elif status == 401:
            msg = ("the Hugging Face Hub rejected the token (401 Unauthorized): set a valid HF_TOKEN or run"
                   " `hf auth login` again")
        elif status == 403:
            msg = (f"the token may not write to dataset {repo_id} (403 Forbidden): use a token with write access"
                   f" to {repo_id.split('/')[0]} (https://huggingface.co/settings/tokens)")
        elif status == 429:
            msg = f"the Hugging Face Hub is rate-limiting this account (429): wait a few minutes{resume}"
        elif status is not None and status >= 500:
            msg = f"the Hugging Face Hub failed ({status}): try again later{resume}"
        else:
            detail = _one_line(_scrub(getattr(err, "server_message", None) or "", token))
            msg = f"the Hugging Face Hub refused the upload to {repo_id} ({status})" + (f": {detail}" if detail
                                                                                         else "")
        raise UserError(_scrub(msg, token)) from None
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to upload") from None
    except _connection_errors() as err:
        log.debug("Hub connection error %s: %s", type(err).__name__, _one_line(_scrub(str(err), token)))
        raise UserError(f"cannot reach the Hugging Face Hub at {endpoint} ({type(err).__name__}): check the"
                        f" network, proxy or HF_ENDPOINT{resume}") from None
    except ValueError as err:  # e.g. invalid YAML metadata in README.md, checked by the client before uploading
        raise UserError(f"upload to {repo_id} refused: {_one_line(_scrub(str(err), token))}") from None


# --------------------------------------------------------------------------------------------- helpers


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def _scrub(text: str, token: str | None) -> str:
    """Remove `token` (and anything shaped like a Hugging Face token) from `text`."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_RE.sub("hf_***", text)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
