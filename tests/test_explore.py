"""`facedata explore`: a real server on 127.0.0.1 over a real run, driven in Debian's chromium.

The run (tests/explore_fixture.py) holds a caption with markup, a user filter's two reasons (one of
them `unsafe`, which the page must never show), an opt-out gallery and an opt-out match. The
browser tests click through the page and compare what it shows with the run's parquet; the
security tests send raw requests. Screenshots go to the pytest temp folder (printed).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.conftest import REPO, stop_process_group, wait_for
from tests.explore_fixture import HOSTILE_CAPTION, make_explore_run

CHROMIUM = os.environ.get("FACEDATA_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def explore_run(tmp_path_factory) -> Path:
    return make_explore_run(tmp_path_factory.mktemp("explore"))


@pytest.fixture(scope="module")
def records(explore_run) -> list[dict]:
    from facedata.pipeline import open_run

    return open_run(explore_run).to_pylist()


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _start(run: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "facedata.cli", "explore", str(run), "--port", "0", *extra],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = proc.stdout.readline()
    assert line.startswith("facedata explore: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() is not None else "")
    url = line.split()[2]
    import httpx

    wait_for(lambda: httpx.get(url + "api/info", timeout=5).status_code == 200, 60, "explore server", proc)
    return proc, url


@pytest.fixture(scope="module")
def server(explore_run):
    proc, url = _start(explore_run)
    yield url, proc
    stop_process_group(proc)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("explore_screenshots")
    print(f"\nexplore screenshots: {folder}")
    return folder


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server[0])
    page.wait_for_selector("body[data-ready]")
    yield page
    assert not errors, f"script errors on the page: {errors}"
    # Nothing from the run ran as script, on any page the test visited.
    assert page.evaluate("window.__pwned") is None
    context.close()


def _attr(record: dict, name: str):
    described = record.get("face_attributes") or []
    if not described:
        return None
    value = described[0]["values"][name]
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


# ------------------------------------------------------------------------------------------ command


def test_bad_path_is_one_line_before_any_server(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for path, expected in ((tmp_path / "missing", "no such folder"), (tmp_path / "file.txt", "not a folder"),
                           (tmp_path, "not a run directory")):
        proc = subprocess.run([sys.executable, "-m", "facedata.cli", "explore", str(path), "--port", "0"],
                              env=_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("facedata: error: ") and expected in lines[0], proc.stderr


def test_binds_loopback_only(server):
    import psutil

    url, proc = server
    assert urlsplit(url).hostname == "127.0.0.1"
    listening = [c.laddr for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


# ------------------------------------------------------------------------------------------ browser


def test_funnel_to_reason_to_sample(page, server, records, screens):
    from playwright.sync_api import expect

    statuses = Counter(r["status"] for r in records)
    reasons = page.locator("[data-testid=reason]")
    shown = {reasons.nth(i).get_attribute("data-reason"): int(reasons.nth(i).get_attribute("data-count"))
             for i in range(reasons.count())}
    # Every reason the run recorded, a user step's own included, with its count.
    assert shown == {s: n for s, n in statuses.items() if s != "ok"}
    assert {"unsafe", "blurry_caption", "optout_match"} <= set(shown)
    assert page.locator("[data-testid=reason][data-reason=blurry_caption]").get_attribute("data-stage") == "safety"
    page.screenshot(path=str(screens / "funnel.png"), full_page=True)

    # The unsafe-flagged image is counted only: no card, no thumbnail, no sample page.
    unsafe_key = next(r["key"] for r in records if r["status"] == "unsafe")
    expect(page.locator("[data-testid=hidden-count]")).to_contain_text("1 hidden")
    assert page.locator(f"[data-key='{unsafe_key}']").count() == 0
    page.locator("[data-testid=reason][data-reason=unsafe]").click()
    expect(page.locator("[data-testid=chip]")).to_have_count(0)  # not clickable

    page.locator("[data-testid=reason][data-reason=blurry_caption]").click()
    expected_keys = [r["key"] for r in records if r["status"] == "blurry_caption"]
    cards = page.locator("[data-testid=card]")
    expect(cards).to_have_count(len(expected_keys))
    assert [cards.nth(i).get_attribute("data-key") for i in range(cards.count())] == expected_keys
    expect(page.locator("[data-testid=result-total]")).to_have_text(str(len(expected_keys)))
    thumb = cards.first.locator("img")
    expect(thumb).to_have_js_property("complete", True)
    assert thumb.evaluate("img => img.naturalWidth") > 0
    page.screenshot(path=str(screens / "reason_grid.png"), full_page=True)

    cards.first.locator("[data-testid=card-key]").click()
    expect(page.locator("[data-testid=sample-key]")).to_have_text(f"Sample {expected_keys[0]}")
    record = next(r for r in records if r["key"] == expected_keys[0])
    image = page.locator("[data-testid=image]")
    expect(image).to_have_js_property("complete", True)
    assert image.evaluate("img => img.naturalWidth") == record["width"]
    expect(page.locator("[data-testid=face-box]")).to_have_count(record["n_faces"])
    expect(page.locator("[data-testid=landmark]")).to_have_count(5 * record["n_faces"])
    stages = page.locator("[data-testid=stages] tr")
    rows = [stages.nth(i).inner_text().split("\t") for i in range(stages.count())]
    assert ["safety", "blurry_caption"] in [[c.strip() for c in row] for row in rows]
    assert [c.strip() for c in rows[-1]] == ["captions", "not reached"]
    page.screenshot(path=str(screens / "sample_dropped.png"), full_page=True)

    # A kept sample: its attributes with confidences, as the parquet holds them.
    kept = next(r for r in records if r["status"] == "ok" and r["face_attributes"])
    page.goto(f"{server[0]}#/sample/{kept['key']}")
    expect(page.locator("[data-testid=sample-key]")).to_have_text(f"Sample {kept['key']}")
    face = kept["face_attributes"][0]
    table = page.locator("[data-testid=attributes]").first
    for name, value in face["values"].items():
        if value is not None and not isinstance(value, float):
            shown_value = str(value).lower() if isinstance(value, bool) else value
            row = table.locator("tr", has=page.locator(f"td:text-is('{name}')"))
            cells = row.locator("td")
            assert cells.nth(1).inner_text() == shown_value
            assert cells.nth(2).inner_text() == f"{round(100 * face['confidences'][name])}%"
    expect(page.locator("[data-testid=sample-face-caption]")).to_have_text(kept["face_caption"])
    expect(page.locator("[data-testid=sample-split]")).to_have_text(kept["split"])
    page.screenshot(path=str(screens / "sample.png"), full_page=True)


def test_two_facets_combine_with_counts_from_the_parquet(page, records, screens):
    from playwright.sync_api import expect

    visible = [r for r in records if r["status"] != "unsafe"]
    split = Counter(r["split"] for r in records if _attr(r, "gender") == "female" and r["split"]).most_common(1)[0][0]
    page.locator("[data-testid=facet-value][data-facet=gender][data-value=female] input").check()
    expect(page.locator("[data-testid=chip]")).to_have_count(1)
    page.locator(f"[data-testid=facet-value][data-facet=split][data-value='{split}'] input").check()
    expect(page.locator("[data-testid=chip]")).to_have_count(2)
    both = [r for r in records if _attr(r, "gender") == "female" and r["split"] == split]
    expect(page.locator("[data-testid=facet-total]")).to_have_text(f"{len(both)} samples match")
    expect(page.locator("[data-testid=result-total]")).to_have_text(str(len([r for r in both if r in visible])))
    expect(page.locator("[data-testid=card]")).to_have_count(len([r for r in both if r in visible]))
    # Each facet counts the samples that pass every other filter: expression under both,
    # split under gender alone, gender under split alone.
    def shown(facet: str) -> dict[str, int]:
        values = page.locator(f"[data-testid=facet-value][data-facet={facet}]")
        return {values.nth(i).get_attribute("data-value"): int(values.nth(i).get_attribute("data-count"))
                for i in range(values.count())}

    def counted(rows, key) -> dict[str, int]:
        return dict(Counter("(none)" if key(r) is None else str(key(r)) for r in rows))

    assert shown("expression") == counted(both, lambda r: _attr(r, "expression"))
    assert shown("split") == counted([r for r in records if _attr(r, "gender") == "female"], lambda r: r["split"])
    assert shown("gender") == counted([r for r in records if r["split"] == split], lambda r: _attr(r, "gender"))
    assert shown("status") == counted(both, lambda r: r["status"])
    page.screenshot(path=str(screens / "facets.png"), full_page=True)


def test_caption_search_and_markup_stays_text(page, server, records, screens):
    from playwright.sync_api import expect

    page.fill("[data-testid=search]", "beach")
    page.press("[data-testid=search]", "Enter")
    expect(page.locator("[data-testid=query-chip]")).to_have_count(1)
    hostile = next(r for r in records if r["caption"] == HOSTILE_CAPTION)
    cards = page.locator("[data-testid=card]")
    expect(cards).to_have_count(1)
    assert cards.first.get_attribute("data-key") == hostile["key"]
    # The markup is shown as the caption's text, not parsed: no script ran, no element was made.
    expect(cards.first.locator("[data-testid=web-caption]")).to_have_text(HOSTILE_CAPTION)
    assert page.locator("main script, img[onerror], img[src=x]").count() == 0
    page.screenshot(path=str(screens / "search.png"), full_page=True)

    # A face-caption word: the count the page gives is the parquet's.
    word = "jet-black"
    page.fill("[data-testid=search]", word)
    page.press("[data-testid=search]", "Enter")
    expected = [r for r in records if r["status"] != "unsafe"
                and (word in (r["caption"] or "").lower() or word in (r["face_caption"] or "").lower())]
    assert expected
    expect(page.locator("[data-testid=result-total]")).to_have_text(str(len(expected)))

    page.goto(f"{server[0]}#/sample/{hostile['key']}")
    expect(page.locator("[data-testid=sample-caption]")).to_have_text(HOSTILE_CAPTION)
    assert page.locator("main script, img[onerror], img[src=x]").count() == 0


def test_identity_page(page, records, screens):
    from playwright.sync_api import expect

    page.locator("[data-testid=nav-identities]").click()
    cards = page.locator("[data-testid=identity-card]")
    ids = Counter(r["identity_id"] for r in records if r["identity_id"] is not None)
    expect(cards).to_have_count(len(ids))
    page.screenshot(path=str(screens / "identities.png"), full_page=True)
    cards.first.locator("a").first.click()
    top = ids.most_common(1)[0]
    expect(page.locator("[data-testid=identity-title]")).to_have_text(f"Identity {top[0]}")
    members = [r for r in records if r["identity_id"] == top[0] and r["status"] not in ("unsafe", "near_duplicate")]
    expect(page.locator("[data-testid=members] [data-testid=card]")).to_have_count(len(members))
    outliers = [r for r in members if r["identity_outlier"]]
    expect(page.locator("[data-testid=members] [data-testid=outlier]")).to_have_count(len(outliers))
    page.screenshot(path=str(screens / "identity.png"), full_page=True)


def test_optout_identity_appends_its_embeddings_to_the_gallery(page, explore_run, records, screens):
    from playwright.sync_api import expect

    from facedata.explore.server import configured_optout_gallery
    from facedata.core.run_layout import RunLayout

    gallery = configured_optout_gallery(explore_run)
    before = set(gallery.iterdir())
    sample = next(r for r in records if r["status"] == "ok" and r["identity_id"] is not None)
    page.goto(page.url.split("#")[0] + f"#/sample/{sample['key']}")
    page.locator("[data-testid=optout-identity]").click()
    expect(page.locator("#dialog")).to_be_visible()
    page.screenshot(path=str(screens / "optout_confirm.png"))
    assert set(gallery.iterdir()) == before  # nothing written before the confirmation
    page.locator("[data-testid=confirm-yes]").click()
    expect(page.locator("[data-testid=optout-result]")).to_contain_text("Opted out")
    added = set(gallery.iterdir()) - before
    assert len(added) == 1
    written = np.load(added.pop())
    layout = RunLayout(explore_run)
    expected = [np.load(layout.shard_file("faces", int(r["key"]) // 4, "embeddings.npy"))[r["faces"][r["primary_face"]]["embedding_index"]]
                for r in records if r["identity_id"] == sample["identity_id"]]
    assert written.shape == (len(expected), 512)
    np.testing.assert_allclose(np.sort(written, axis=0), np.sort(np.stack(expected).astype(np.float32), axis=0), atol=1e-6)
    page.screenshot(path=str(screens / "optout_done.png"), full_page=True)


# ------------------------------------------------------------------------------------------ security


def _raw(url: str, method: str, path: str, headers: dict | None = None, body: bytes | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    # http.client sends the path as given: no normalisation of `..` or percent-escapes on the way.
    conn.putrequest(method, path, skip_host="Host" in (headers or {}))
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    response = conn.getresponse()
    return response.status, response.read()


def test_serves_only_files_inside_the_run(server, explore_run, tmp_path):
    url = server[0]
    status, body = _raw(url, "GET", "/files/identity/gallery.png")
    assert status == 200 and body.startswith(b"\x89PNG")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:secret")
    link = explore_run / "outside_link.txt"
    link.symlink_to(secret)
    try:
        for path in ("/files/../../../../etc/passwd", "/files/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                     "/files/..%2f..%2f..%2f..%2fetc%2fpasswd", "/files/%2fetc%2fpasswd", "/files//etc/passwd",
                     f"/files/{secret}", "/files/%252e%252e%252f%252e%252e%252fetc/passwd",
                     "/files/identity/../../../../etc/passwd", "/files/identity/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                     "/files/outside_link.txt", "/static/..%2f__init__.py", "/static/%2e%2e/server.py",
                     "/files/..\\..\\etc\\passwd"):
            status, body = _raw(url, "GET", path)
            assert status in (403, 404), (path, status)
            assert b"root:" not in body and b"import" not in body, path
    finally:
        link.unlink()


def test_optout_needs_the_page_token_and_the_same_origin(server, explore_run, records, browser):
    from facedata.explore.server import configured_optout_gallery
    from facedata.demo.server import LoopbackServer

    url, _ = server
    gallery = configured_optout_gallery(explore_run)
    before = set(gallery.iterdir())
    host = urlsplit(url).netloc
    status, page_html = _raw(url, "GET", "/", {"Host": host})
    token = page_html.decode().split('name="explore-token" content="')[1].split('"')[0]
    body = json.dumps({"identity_id": next(r["identity_id"] for r in records if r["identity_id"] is not None)}).encode()
    json_type = {"Host": host, "Content-Type": "application/json"}
    attempts = {
        "no token": ({**json_type}, 403),
        "wrong token": ({**json_type, "X-Explore-Token": "x" + token[1:]}, 403),
        "other origin": ({**json_type, "X-Explore-Token": token, "Origin": "http://evil.example"}, 403),
        "null origin": ({**json_type, "X-Explore-Token": token, "Origin": "null"}, 403),
        "cross-site fetch": ({**json_type, "X-Explore-Token": token, "Sec-Fetch-Site": "cross-site"}, 403),
        "form post": ({"Host": host, "Content-Type": "text/plain", "X-Explore-Token": token}, 415),
        "rebound host": ({**json_type, "X-Explore-Token": token, "Host": f"evil.example:{urlsplit(url).port}"}, 421),
    }
    for what, (headers, expected) in attempts.items():
        status, _ = _raw(url, "POST", "/api/optout", headers, body)
        assert status == expected, what
    assert set(gallery.iterdir()) == before

    # A real page on another origin (another loopback port) posting to the server: refused.
    other = explore_run.parent / "other_site"
    other.mkdir(exist_ok=True)
    (other / "index.html").write_text("<html><body>another site</body></html>")
    with LoopbackServer(other) as site:
        context = browser.new_context()
        page = context.new_page()
        page.goto(site.url("index.html"))
        result = page.evaluate("""async ([target, body, token]) => {
            try {
              const r = await fetch(target, {method: "POST", body, headers: {"Content-Type": "application/json",
                                                                              "X-Explore-Token": token}});
              return r.status;
            } catch (e) { return "blocked: " + e.message; }
        }""", [url + "api/optout", body.decode(), token])
        context.close()
    assert result != 200
    assert set(gallery.iterdir()) == before


def test_hidden_status_is_never_served(server, records):
    unsafe_key = next(r["key"] for r in records if r["status"] == "unsafe")
    for path in (f"/api/sample/{unsafe_key}", f"/api/thumb/{unsafe_key}", f"/api/image/{unsafe_key}"):
        status, body = _raw(server[0], "GET", path, {"Host": urlsplit(server[0]).netloc})
        assert status == 403, path
        assert b"\xff\xd8" not in body[:4]
    status, body = _raw(server[0], "GET", "/api/samples?f=status:unsafe", {"Host": urlsplit(server[0]).netloc})
    answer = json.loads(body)
    assert answer["rows"] == [] and answer["hidden"] == 1


# ------------------------------------------------------------------------------------------ FLIP


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny FLIP model saved as facedata train saves checkpoints: enough to check that
    the page's search embeds, ranks by cosine and shows what the model finds (not that it finds
    well: the tests in test_flip_search.py train one on the demo for that)."""
    import torch

    from facedata.flip.config import ModelSection
    from facedata.flip.model import build_flip_model
    from facedata.flip.train import CHECKPOINT_FORMAT

    torch.manual_seed(0)
    model = {"config": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64,
                                                        "head_width": 32, "layers": 1},
                        "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}
    flip = build_flip_model(ModelSection.model_validate(model))
    path = tmp_path_factory.mktemp("flip") / "tiny.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": flip.model.state_dict(), "step": 0,
                "config": {"model": model, "data": {"use_crops": True, "crop_scale": 1.5}}}, path)
    return path


def test_text_to_face_search_and_more_like_this(explore_run, records, tiny_checkpoint, browser, screens, tmp_path):
    from playwright.sync_api import expect

    from facedata.flip.embed import embed_images, embed_texts, load_checkpoint
    from facedata.explore.images import ShardImages

    proc, url = _start(explore_run, "--checkpoint", str(tiny_checkpoint), "--cache-dir", str(tmp_path / "cache"))
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.goto(url)
        page.fill("[data-testid=face-search]", "a smiling woman with black hair")
        page.press("[data-testid=face-search]", "Enter")
        kept = [r for r in records if r["status"] == "ok"]
        cards = page.locator("[data-testid=face-search-results] [data-testid=card]")
        expect(cards).to_have_count(len(kept))
        keys = [cards.nth(i).get_attribute("data-key") for i in range(cards.count())]
        shown = [float(cards.nth(i).locator("[data-testid=similarity]").inner_text().split()[-1]) for i in range(len(keys))]
        page.screenshot(path=str(screens / "face_search.png"), full_page=True)
        # The ranking is the model's cosine between the query and each kept image's face crop.
        ckpt = load_checkpoint(tiny_checkpoint)
        images = ShardImages(explore_run, tmp_path / "unused")
        by_key = {r["key"]: r for r in kept}
        text = embed_texts(ckpt, ["a smiling woman with black hair"])[0]
        image_vectors = embed_images(ckpt, [images.image(int(k) // 4, k)[0] for k in keys],
                                     boxes=[by_key[k]["faces"][by_key[k]["primary_face"]]["bbox"] for k in keys])
        expected = image_vectors @ text
        np.testing.assert_allclose(shown, expected, atol=2e-3)
        assert shown == sorted(shown, reverse=True)

        page.goto(f"{url}#/sample/{keys[0]}")
        page.locator("[data-testid=more-like-this]").click()
        similar = page.locator("[data-testid=similar-results] [data-testid=card]")
        expect(similar).to_have_count(len(kept) - 1)
        assert keys[0] not in [similar.nth(i).get_attribute("data-key") for i in range(similar.count())]
        context.close()
    finally:
        stop_process_group(proc)
