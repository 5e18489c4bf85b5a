"""facedata.publish.hub: destinations, the upload plan (Hub limits, commits) and the upload against a fake Hub client.

The Hub is not reachable from the test machine: everything up to the client call is real (the plan, the token
lookup, huggingface_hub's own error types); the client itself is `FakeHubApi`, which records calls and raises
real huggingface_hub/httpx2 errors on demand. One test drives a real `HfApi` at a closed local port.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from facedata.publish import hub
from facedata.core.errors import UserError
from facedata.publish.hub import LOCAL_ONLY_PATTERNS, Destination, parse_destination, upload_plan, upload_to_hub

TOKEN = "hf_TestTokenDoNotLeak0123456789abcdef"


# --------------------------------------------------------------------------------------------- fake client


def http_error(status: int, cls: type[HfHubHTTPError] = HfHubHTTPError) -> HfHubHTTPError:
    """A real huggingface_hub HTTP error whose message and request carry the token (it must not leak)."""
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create",
                             headers={"authorization": f"Bearer {TOKEN}"})
    response = httpx2.Response(status, request=request)
    return cls(f"{status} Client Error for token {TOKEN}\nmore lines", response=response)


class FakeHubApi:
    """Records calls like HfApi (huggingface_hub 2.x: no upload_large_folder); `fail` maps a method to an error."""

    def __init__(self, fail: dict[str, BaseException] | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail = fail or {}

    def _record(self, name: str, args: tuple, kwargs: dict):
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    @property
    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", (repo_id,), kwargs)
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self._record("create_branch", (repo_id,), kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", (), kwargs)

        class Info:
            oid = "0" * 40
            commit_url = f"https://huggingface.co/datasets/{kwargs['repo_id']}/commit/{'0' * 40}"

        return Info()


class FakeLegacyHubApi(FakeHubApi):
    """huggingface_hub <= 1.x shape: has the resumable upload_large_folder."""

    def upload_large_folder(self, **kwargs):
        self._record("upload_large_folder", (), kwargs)


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch):
    """Tests see no HF_TOKEN and no saved login unless they set one."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_saved_token", lambda: None)


def make_files(folder, n: int, prefix: str = "f", size: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with open(folder / f"{prefix}{i:05d}.bin", "wb") as fh:
            if size:
                fh.write(b"x" * size)
    return folder


@pytest.fixture
def dataset(tmp_path):
    """A small dataset folder, with the bookkeeping huggingface_hub leaves (never data)."""
    root = tmp_path / "ds"
    make_files(root / "data", 3, size=10)
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# ds\n")
    (root / ".cache" / "huggingface" / "upload").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "upload" / "state.metadata").write_text("resume state")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main")
    make_files(root / "search" / "0123abcd" / "all", 2, size=10)  # `facedata search`'s local index
    return root


# --------------------------------------------------------------------------------------------- destinations


def test_parse_hub_destinations():
    d = parse_destination("hf://datasets/alice/faces")
    assert d == Destination(kind="hub", repo_id="alice/faces", revision=None, path=None)
    assert d.is_hub and d.url == "https://huggingface.co/datasets/alice/faces"
    assert str(d) == "hf://datasets/alice/faces"
    assert parse_destination("hf://datasets/alice/faces@v1.0").revision == "v1.0"
    assert parse_destination("hf://datasets/alice/faces/").repo_id == "alice/faces"
    assert parse_destination("hf://datasets/alice/faces@refs%2Fpr%2F3").revision == "refs/pr/3"
    assert parse_destination(repo="alice/faces") == Destination(kind="hub", repo_id="alice/faces")
    assert parse_destination(repo="alice/faces@dev").revision == "dev"
    assert parse_destination(repo="hf://datasets/alice/faces").repo_id == "alice/faces"


def test_parse_folder_destinations(tmp_path):
    assert parse_destination(str(tmp_path / "out")) == Destination(kind="folder", path=tmp_path / "out")
    assert parse_destination("out/dir").path.as_posix() == "out/dir"  # a relative path, not OWNER/NAME
    assert parse_destination(tmp_path).kind == "folder"
    assert parse_destination("~/x").path == parse_destination(os.path.expanduser("~/x")).path


@pytest.mark.parametrize("dest, expected", [
    ("hf://models/alice/faces", "only dataset repos"),
    ("hf://alice/faces", "only dataset repos"),
    ("hf://datasets/alice", "OWNER/NAME"),
    ("hf://datasets/", "OWNER/NAME"),
    ("hf://datasets/alice/faces/sub/dir", "path inside the repo"),
    ("hf://datasets/al--ice/faces", "--"),
    ("hf://datasets/alice/fa ces", "alphanumeric"),
    ("hf://datasets/alice/faces@", "bad revision"),
    ("hf://datasets/alice/faces@a b", "bad revision"),
    ("https://huggingface.co/datasets/alice/faces", "use hf://datasets/alice/faces"),
    ("s3://bucket/faces", "unsupported scheme"),
    ("", "empty"),
])
def test_malformed_destinations_are_one_line_user_errors(dest, expected):
    with pytest.raises(UserError) as exc:
        parse_destination(dest)
    assert expected in str(exc.value)
    assert "\n" not in str(exc.value)


def test_repo_option_errors():
    with pytest.raises(UserError, match="not both"):
        parse_destination("hf://datasets/a/b", repo="a/b")
    with pytest.raises(UserError, match="OWNER/NAME"):
        parse_destination(repo="faces")
    with pytest.raises(UserError, match="--repo"):
        parse_destination(repo="a/b/c")


# --------------------------------------------------------------------------------------------- plan


def test_plan_lists_250_small_files(tmp_path):
    root = make_files(tmp_path / "ds", 250, size=3)
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "x.lock").write_text("")
    plan = upload_plan(root)
    assert plan.n_files == 250 and plan.total_bytes == 750
    assert plan.files[0].path == "f00000.bin" and plan.files[-1].path == "f00249.bin"
    assert not any(".cache" in f.path for f in plan.files)
    text = plan.describe("hf://datasets/a/b", max_listed=5)
    assert "250 files" in text and "... and 245 more" in text and "hf://datasets/a/b" in text
    assert "commit 1" not in text  # facedata does not choose the commits: no per-commit plan is shown
    assert plan.to_dict() == {"folder": str(root), "files": 250, "bytes": 750, "warnings": []}


def test_plan_leaves_out_hub_bookkeeping_and_the_search_index(dataset):
    plan = upload_plan(dataset)
    assert [f.path for f in plan.files] == ["README.md", "data/f00000.bin", "data/f00001.bin", "data/f00002.bin"]


def test_plan_refuses_a_folder_with_10001_files(tmp_path):
    root = tmp_path / "ds"
    make_files(root / "images", 10_001)
    (root / "README.md").write_text("x")
    with pytest.raises(UserError) as exc:
        upload_plan(root)
    msg = str(exc.value)
    assert str(root / "images") in msg and "10,001 entries" in msg and "subfolders" in msg
    assert "\n" not in msg


def test_plan_folder_limit_counts_entries_and_is_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "MAX_ENTRIES_PER_FOLDER", 4)
    root = make_files(tmp_path / "ds", 2)
    make_files(root / "a", 1)
    assert upload_plan(root).n_files == 3  # 3 entries at the root: 2 files + 1 subfolder
    make_files(root / "b", 1)
    with pytest.raises(UserError, match="4 entries in one folder"):
        upload_plan(root)


def test_plan_refuses_too_many_files_per_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "MAX_FILES_PER_REPO", 6)
    root = tmp_path / "ds"
    for d in "abc":
        make_files(root / d, 2)
    with pytest.raises(UserError, match="6 files; a Hub repo must hold fewer than 6"):
        upload_plan(root)


def test_plan_refuses_a_file_over_50_gb_and_warns_over_5_gb(tmp_path, caplog):
    root = make_files(tmp_path / "ds", 1)
    big = root / "huge.tar"
    big.touch()
    os.truncate(big, 51 * 1000**3)  # sparse: no disk used
    with pytest.raises(UserError) as exc:
        upload_plan(root)
    assert str(big) in str(exc.value) and "50.0 GB per-file limit" in str(exc.value)
    os.truncate(big, 6 * 1000**3)
    with caplog.at_level(logging.WARNING, logger="facedata"):
        plan = upload_plan(root)
    assert len(plan.warnings) == 1 and str(big) in plan.warnings[0]
    assert str(big) in caplog.text


def test_plan_refuses_empty_or_missing_folder(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        upload_plan(tmp_path / "missing")
    (tmp_path / "e" / ".cache" / "huggingface").mkdir(parents=True)
    with pytest.raises(UserError, match="empty folder"):
        upload_plan(tmp_path / "e")


# --------------------------------------------------------------------------------------------- upload


def test_dry_run_calls_nothing_and_needs_no_token(dataset, capsys):
    api = FakeHubApi()
    result = upload_to_hub(dataset, "alice/faces", dry_run=True, api=api)
    assert api.calls == []
    assert result["dry_run"] and result["files"] == 4
    assert [s["call"] for s in result["steps"]] == ["create_repo", "upload_folder"]
    out = capsys.readouterr().out
    assert "upload plan" in out and "hf://datasets/alice/faces" in out and "data/f00000.bin" in out
    assert "4 files" in out and "1. create_repo: dataset repo alice/faces, created private" in out
    assert "2. upload_folder: 4 files" in out
    assert "no Hugging Face token" in out


def test_dry_run_shows_the_token_source_not_the_token(dataset, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api = FakeHubApi()
    result = upload_to_hub(dataset, "alice/faces", dry_run=True, api=api)
    assert api.calls == [] and result["token_source"] == "HF_TOKEN"
    out = capsys.readouterr().out
    assert "token: HF_TOKEN" in out and TOKEN not in out and TOKEN not in repr(result)


def test_upload_creates_private_repo_then_uploads(dataset):
    api = FakeHubApi()
    result = upload_to_hub(dataset, "alice/faces", token=TOKEN, api=api)
    assert api.names == ["create_repo", "upload_folder"]
    assert api.calls[0] == ("create_repo", ("alice/faces",),
                            {"repo_type": "dataset", "private": True, "exist_ok": True})
    kwargs = api.calls[1][2]
    assert kwargs["repo_id"] == "alice/faces" and kwargs["folder_path"] == str(dataset)
    assert kwargs["repo_type"] == "dataset" and kwargs["revision"] is None
    assert kwargs["ignore_patterns"] == LOCAL_ONLY_PATTERNS  # a search index stays local
    assert result["method"] == "upload_folder" and result["oid"] == "0" * 40
    assert result["private"] is True and result["url"] == "https://huggingface.co/datasets/alice/faces"
    assert TOKEN not in repr(result)


@pytest.mark.parametrize("client, revision", [(FakeHubApi, None), (FakeHubApi, "v2"), (FakeLegacyHubApi, "v2"),
                                              (FakeLegacyHubApi, "main")])
def test_dry_run_shows_the_calls_the_upload_makes(dataset, capsys, client, revision):
    """Issue 14: the plan `--dry-run` prints is the upload: the same calls, in the same order, same arguments."""
    planned = upload_to_hub(dataset, "alice/faces", dry_run=True, api=client(), revision=revision, private=False)
    printed = capsys.readouterr().out
    api = client()
    done = upload_to_hub(dataset, "alice/faces", token=TOKEN, api=api, revision=revision, private=False)
    assert [(s["call"], s["kwargs"]) for s in planned["steps"]] == [(name, {**dict(zip(["repo_id"], args)), **kw})
                                                                   for name, args, kw in api.calls]
    assert done["steps"] == planned["steps"] and done["method"] == api.names[-1]
    for i, (name, _, _) in enumerate(api.calls, 1):
        assert f"    {i}. {name}: " in printed
    assert f"    {len(api.calls) + 1}. " not in printed
    assert ("create_branch" in api.names) == (revision == "v2")
    assert TOKEN not in printed + repr(planned) + repr(done)


def test_dry_run_without_a_client_plans_for_the_installed_one(dataset, capsys):
    result = upload_to_hub(dataset, "alice/faces", dry_run=True)
    method = "upload_large_folder" if hasattr(HfApi, "upload_large_folder") else "upload_folder"
    assert [s["call"] for s in result["steps"]] == ["create_repo", method]
    shown = upload_to_hub(dataset, "alice/faces", dry_run=True, shown_folder="/somewhere/else")
    assert shown["plan"]["folder"] == "/somewhere/else" and "/somewhere/else" in capsys.readouterr().out


def test_legacy_client_uses_upload_large_folder(dataset):
    api = FakeLegacyHubApi()
    upload_to_hub(dataset, "alice/faces", token=TOKEN, api=api, private=False, revision="v2", num_workers=3)
    assert api.names == ["create_repo", "create_branch", "upload_large_folder"]
    assert api.calls[0][2]["private"] is False
    assert api.calls[1] == ("create_branch", ("alice/faces",),
                            {"branch": "v2", "repo_type": "dataset", "exist_ok": True})
    assert api.calls[2][2] == {"repo_id": "alice/faces", "folder_path": str(dataset), "repo_type": "dataset",
                               "revision": "v2", "private": False, "num_workers": 3,
                               "ignore_patterns": LOCAL_ONLY_PATTERNS}


def test_main_revision_needs_no_branch(dataset):
    api = FakeHubApi()
    upload_to_hub(dataset, "alice/faces", token=TOKEN, api=api, revision="main")
    assert api.names == ["create_repo", "upload_folder"] and api.calls[1][2]["revision"] == "main"


def test_installed_client_matches_the_path_taken():
    """huggingface_hub 2.x dropped upload_large_folder; upload_folder is the resumable upload there."""
    assert hasattr(HfApi, "upload_folder") and hasattr(HfApi, "create_repo") and hasattr(HfApi, "create_branch")


def test_missing_token_is_a_user_error_and_calls_nothing(dataset):
    api = FakeHubApi()
    with pytest.raises(UserError) as exc:
        upload_to_hub(dataset, "alice/faces", api=api)
    assert str(exc.value) == "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
    assert api.calls == []


def test_token_comes_from_hf_token_and_is_never_shown(dataset, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    made = {}

    def fake_hfapi(token=None, **kwargs):
        made["token"] = token
        return made.setdefault("api", FakeHubApi())

    monkeypatch.setattr("huggingface_hub.HfApi", fake_hfapi)
    with caplog.at_level(logging.DEBUG):
        result = upload_to_hub(dataset, "alice/faces")
    assert made["token"] == TOKEN  # HfApi(token=...) got the env token
    assert made["api"].names == ["create_repo", "upload_folder"]
    assert result["token_source"] == "HF_TOKEN"
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text + repr(result)
    assert "token from HF_TOKEN" in caplog.text


def test_token_sources_in_order(monkeypatch):
    monkeypatch.setattr(hub, "_saved_token", lambda: "hf_savedtoken123456")
    assert hub.resolve_token() == ("hf_savedtoken123456", "saved login")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub.resolve_token() == (TOKEN, "HF_TOKEN")
    assert hub.resolve_token("hf_explicit123456") == ("hf_explicit123456", "argument")


def test_saved_token_reads_huggingface_hub_login(monkeypatch):
    monkeypatch.undo()  # the real _saved_token, i.e. huggingface_hub.get_token()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub._saved_token() == TOKEN


def assert_clean_one_line(exc_info, capsys, caplog):
    msg = str(exc_info.value)
    assert "\n" not in msg and TOKEN not in msg
    assert exc_info.value.__cause__ is None and exc_info.value.__suppress_context__
    assert TOKEN not in "".join(traceback.format_exception(exc_info.value))
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text
    return msg


def test_401_becomes_one_line_user_error_without_token(dataset, capsys, caplog):
    api = FakeHubApi(fail={"create_repo": http_error(401)})
    with caplog.at_level(logging.DEBUG), pytest.raises(UserError) as exc:
        upload_to_hub(dataset, "alice/faces", token=TOKEN, api=api)
    msg = assert_clean_one_line(exc, capsys, caplog)
    assert "401" in msg and "rejected the token" in msg and "hf auth login" in msg
    assert api.names == ["create_repo"]


def test_connection_error_becomes_one_line_user_error_without_token(dataset, capsys, caplog):
    err = httpx2.ConnectError(f"[Errno 111] Connection refused (token {TOKEN})")
    api = FakeHubApi(fail={"upload_folder": err})
    with caplog.at_level(logging.DEBUG), pytest.raises(UserError) as exc:
        upload_to_hub(dataset, "alice/faces", token=TOKEN, api=api)
    msg = assert_clean_one_line(exc, capsys, caplog)
    assert "cannot reach the Hugging Face Hub" in msg and "resume" in msg
    assert api.names == ["create_repo", "upload_folder"]


@pytest.mark.parametrize("error, expected", [
    (http_error(403), "403 Forbidden"),
    (http_error(404, RepositoryNotFoundError), "not found or not writable"),
    (http_error(429), "rate-limiting"),
    (http_error(503), "try again later"),
    (http_error(400), "refused the upload"),
    (ConnectionResetError("reset"), "cannot reach"),
    (TimeoutError("timed out"), "cannot reach"),
    (ValueError(f"Invalid metadata in README.md ({TOKEN})"), "README.md"),
])
def test_other_hub_errors_are_one_line(dataset, capsys, caplog, error, expected):
    api = FakeHubApi(fail={"upload_folder": error})
    with caplog.at_level(logging.DEBUG), pytest.raises(UserError) as exc:
        upload_to_hub(dataset, "alice/faces", token=TOKEN, api=api)
    assert expected in assert_clean_one_line(exc, capsys, caplog)


def test_bad_repo_id_fails_before_any_call(dataset):
    api = FakeHubApi()
    with pytest.raises(UserError, match="OWNER/NAME"):
        upload_to_hub(dataset, "faces", token=TOKEN, api=api)
    assert api.calls == []


def test_real_client_at_a_closed_port_is_a_clean_user_error(dataset, capsys, caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = HfApi(endpoint=f"http://127.0.0.1:{port}", token=TOKEN)
    with caplog.at_level(logging.DEBUG), pytest.raises(UserError) as exc:
        upload_to_hub(dataset, "alice/faces", token=TOKEN, api=api)
    msg = assert_clean_one_line(exc, capsys, caplog)
    assert "cannot reach the Hugging Face Hub" in msg and f"127.0.0.1:{port}" in msg
