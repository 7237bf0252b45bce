"""A person in a real browser: sign in, upload a folder, watch progress finish, review a flagged case.

Playwright drives Debian's Chromium (/usr/bin/chromium; `.ci/system-packages` installs it) against a live
portal (werkzeug in a thread) and a real celery worker on the embedded SQLite + filesystem broker.
Screenshots go to the test's temporary folder (or $TRIAGE_SCREENSHOTS), never into the repository.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from core.auth import create_user
from core.config import Settings
from core.db import Database
from core.models import AuditEvent, Review
from tests.conftest import IN_CI, make_settings, deploy_tiny_model, xray_sample
from tests.e2e.conftest import LivePortal, LiveWorker

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "browser test password"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def browser() -> Iterator[object]:
    """Headless Debian Chromium via Playwright."""
    if not CHROMIUM.exists():
        if IN_CI:
            pytest.fail("/usr/bin/chromium missing: .ci/system-packages installs it")
        pytest.skip("Chromium not found at /usr/bin/chromium; run .ci/system-packages (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
        )
        yield instance
        instance.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: $TRIAGE_SCREENSHOTS if set, else the test's temporary folder."""
    folder = Path(os.environ.get("TRIAGE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_sign_in_upload_a_folder_watch_progress_and_review_flagged_cases(
    browser, tmp_path: Path, xrays_dir: Path, tiny_weights: dict, shots: Path,  # type: ignore[no-untyped-def]
    live_worker_factory: Callable[[Settings], LiveWorker], live_portal_factory: Callable[[Settings], LivePortal],
) -> None:
    from playwright.sync_api import expect

    settings = make_settings(tmp_path / "var")
    db, _ = deploy_tiny_model(settings, tiny_weights)
    with db.transaction() as session:
        create_user(session, "radiologist", PASSWORD, "admin")
    live_worker_factory(settings)
    portal = live_portal_factory(settings)

    folder = tmp_path / "ward 4"
    folder.mkdir()
    for path in xray_sample(xrays_dir, 12):
        shutil.copy(path, folder / path.name)

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(portal.url + "/")
    assert "/login" in page.url  # anonymous: sent to sign in
    page.fill("input[name=username]", "radiologist")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator(".who")).to_contain_text("radiologist")

    page.fill("input[name=name]", "Ward 4 from the browser")
    page.set_input_files("#folder-input", str(folder))
    page.screenshot(path=str(shots / "1-upload.png"), full_page=True)
    page.click("form.upload button[type=submit]")
    expect(page.locator("h1")).to_contain_text("Ward 4 from the browser")

    # Progress reaches the end by itself (the page polls; nobody reloads it).
    expect(page.locator("#study-status")).to_have_text("done", timeout=240_000)
    expect(page.locator("#results tbody tr")).to_have_count(12)
    page.screenshot(path=str(shots / "2-study-done.png"), full_page=True)

    flagged_rows = page.locator("#results tbody tr.flagged")
    flagged = flagged_rows.count()
    assert flagged >= 2, "the random tiny model leaves several images under its 0.9 threshold"
    page.click("nav >> text=Review")
    expect(page.locator("#queue-summary")).to_contain_text(f"{flagged} flagged case")
    page.click("#start-review")
    expect(page.locator("#review-form")).to_be_visible()
    first_url = page.url
    expect(page.locator("#stage")).to_have_attribute("data-ready", "1", timeout=60_000)
    page.keyboard.press("+")  # zoom
    if page.locator("#toggle-heatmap").is_enabled():  # a heat map is stored for this case
        page.keyboard.press("h")
        expect(page.locator("#heatmap")).to_be_visible()
    page.screenshot(path=str(shots / "3-viewer.png"))

    # One key records a label (keys follow the order the probabilities are shown in); the next case opens.
    key = page.locator(".label-button[data-label='no_fracture']").get_attribute("data-key")
    page.keyboard.press(key)
    page.wait_for_url(lambda url: url != first_url and "/review/" in url)
    expect(page.locator("#last-review")).to_contain_text("Recorded No fracture")
    second_url = page.url
    page.keyboard.press("a")  # accept the model's label
    page.wait_for_url(lambda url: url != second_url)
    page.screenshot(path=str(shots / "4-next-case.png"))

    with db.transaction() as session:
        reviews = session.scalars(select(Review).order_by(Review.id)).all()
        assert [r.reviewer_name for r in reviews] == ["radiologist", "radiologist"]
        assert reviews[0].label == "no_fracture" and reviews[1].label in tiny_weights["labels"]
    db.dispose()


# --- The review workspace: no worker needed, the predictions are written as the worker would. ---

@dataclass
class Workspace:
    """A live portal with one study of five classified images and a signed-in reviewer's browser page."""

    portal: LivePortal
    db: Database
    ids: dict[str, int]
    page: object

    def open(self, path: str) -> None:
        self.page.goto(self.portal.url + path)  # type: ignore[attr-defined]

    def reviews(self) -> list[Review]:
        with self.db.transaction() as session:
            return list(session.scalars(select(Review).order_by(Review.id)))


def _new_page(browser, portal: LivePortal, width: int = 1440, height: int = 900):  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(20_000)
    page.goto(portal.url + "/login")
    page.fill("input[name=username]", "reviewer")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url)
    return page


@pytest.fixture
def workspace(browser, tmp_path: Path, xrays_dir: Path, tiny_weights: dict,  # type: ignore[no-untyped-def]
              live_portal_factory: Callable[[Settings], LivePortal]) -> Iterator[Workspace]:
    """Unsure cases a (p fracture 0.6), b (0.3), c (0.8), a confident image (0.97) and an audit sample (0.02)."""
    from core.models import Image, ModelVersion
    from core.studies import add_upload, create_study, finish_study_if_complete
    from tests.portal.test_review_flow import predict

    settings = make_settings(tmp_path / "var")
    db, version_id = deploy_tiny_model(settings, tiny_weights)
    with db.transaction() as session:
        create_user(session, "reviewer", PASSWORD, "reviewer")
        study = create_study(session, "Ward 7", session.get(ModelVersion, version_id))
        images = [add_upload(session, settings, study, path.name, path.read_bytes()) for path in xray_sample(xrays_dir, 5)]
        ids = dict(zip(("a", "b", "confident", "c", "audit"), (image.id for image in images)), study=study.id)
    predict(db, {ids["a"]: 0.6, ids["b"]: 0.3, ids["confident"]: 0.97, ids["c"]: 0.8, ids["audit"]: 0.02}, audit=(ids["audit"],))
    with db.transaction() as session:
        assert all(session.get(Image, i).status.value == "done" for key, i in ids.items() if key != "study")
        finish_study_if_complete(session, ids["study"])
    portal = live_portal_factory(settings)
    yield Workspace(portal, db, ids, _new_page(browser, portal))
    db.dispose()


def test_enter_in_the_note_or_on_a_link_records_nothing_and_a_accepts_the_models_label(workspace: Workspace) -> None:
    from playwright.sync_api import expect

    page, ids = workspace.page, workspace.ids
    workspace.open(f"/review/{ids['a']}")
    page.fill("#note", "cortical break distal radius")
    page.press("#note", "Enter")
    page.press("#note", "a")  # typing, not accepting
    page.press("#note", "1")
    page.wait_for_timeout(800)
    assert page.url.endswith(f"/review/{ids['a']}") and workspace.reviews() == []
    expect(page.locator("#note")).to_have_value("cortical break distal radius" + "a1")

    page.focus("#back-to-queue")
    page.keyboard.press("a")  # no label from a focused link
    page.wait_for_timeout(500)
    assert workspace.reviews() == []
    page.keyboard.press("Enter")  # the link does what links do: the queue opens, nothing is recorded
    page.wait_for_url(lambda url: url.endswith("/review"))
    assert workspace.reviews() == []

    workspace.open(f"/review/{ids['a']}")
    page.locator("#stage").click()
    page.keyboard.press("Enter")  # Enter is never "accept"
    page.wait_for_timeout(500)
    assert workspace.reviews() == []
    page.keyboard.press("a")
    page.wait_for_url(lambda url: f"/review/{ids['a']}" not in url)
    (review,) = workspace.reviews()
    assert review.label == "fracture" and review.image_id == ids["a"]


def test_undo_skip_previous_and_no_layout_shift(workspace: Workspace) -> None:
    from playwright.sync_api import expect

    page, ids = workspace.page, workspace.ids
    workspace.open("/review")
    page.click("#start-review")
    page.wait_for_url(lambda url: url.endswith(f"/review/{ids['a']}"))
    heading = page.locator(".case-panel h1").bounding_box()["y"]

    page.keyboard.press("s")  # skip: nothing recorded, the next case opens
    page.wait_for_url(lambda url: url.endswith(f"/review/{ids['b']}"))
    page.keyboard.press("p")  # previous: back to the skipped case
    page.wait_for_url(lambda url: url.endswith(f"/review/{ids['a']}"))
    assert workspace.reviews() == []

    page.locator(".label-button[data-label='no_fracture']").click()
    page.wait_for_url(lambda url: url.endswith(f"/review/{ids['b']}"))
    expect(page.locator("#last-review")).to_contain_text("Recorded No fracture")
    assert page.locator(".case-panel h1").bounding_box()["y"] == heading  # the message moved nothing down
    assert [r.label for r in workspace.reviews()] == ["no_fracture"]

    page.keyboard.press("u")  # undo: the review is gone and its case opens again
    page.wait_for_url(lambda url: url.endswith(f"/review/{ids['a']}"))
    expect(page.locator("#review-status")).to_contain_text("Undone: No fracture")
    assert workspace.reviews() == []
    with workspace.db.transaction() as session:
        assert session.scalars(select(AuditEvent).where(AuditEvent.action == "review_undo")).one().username == "reviewer"


def test_an_unflagged_image_opens_from_the_study_page_and_can_be_reviewed(workspace: Workspace) -> None:
    from playwright.sync_api import expect

    page, ids = workspace.page, workspace.ids
    workspace.open(f"/studies/{ids['study']}")
    expect(page.locator("#review-study")).to_contain_text("Review this study's flags (4 waiting)")
    page.locator(f"#image-{ids['confident']} a.open-case").click()
    expect(page.locator("#case-reason")).to_have_text("Not flagged: spot check")
    key = page.locator(".label-button[data-label='fracture']").get_attribute("data-key")
    assert key == "1"  # the model's 97 % is shown first
    page.keyboard.press(key)
    page.wait_for_url(lambda url: f"/review/{ids['confident']}" not in url)
    assert [(r.image_id, r.label) for r in workspace.reviews()] == [(ids["confident"], "fracture")]


def test_the_worklist_sorts_by_fracture_probability(workspace: Workspace) -> None:
    page, ids = workspace.page, workspace.ids
    workspace.open("/review")

    def rows() -> list[int]:
        return [int(row.get_attribute("id").split("-")[1]) for row in page.locator("#worklist tbody tr").all()]

    assert rows() == [ids["a"], ids["b"], ids["c"], ids["audit"]]
    page.click("#sort-fracture")
    page.wait_for_url(lambda url: "order=suspicious" in url)
    assert rows() == [ids["c"], ids["a"], ids["b"], ids["audit"]]
    page.click("#sort-fracture")
    page.wait_for_url(lambda url: "order=least_suspicious" in url)
    assert rows() == [ids["audit"], ids["b"], ids["a"], ids["c"]]
    page.click("#start-review")  # the cases open in the order shown
    page.wait_for_url(lambda url: f"/review/{ids['audit']}?order=least_suspicious" in url)


def test_zoom_and_window_can_persist_between_cases(workspace: Workspace) -> None:
    from playwright.sync_api import expect

    page, ids = workspace.page, workspace.ids
    workspace.open(f"/review/{ids['a']}")
    expect(page.locator("#stage")).to_have_attribute("data-ready", "1", timeout=60_000)
    page.check("#keep-view")
    page.locator("#stage").click()
    page.keyboard.press("+")
    page.select_option("#preset", "soft")
    page.keyboard.press("i")
    expect(page.locator("#stage")).to_have_attribute("data-zoom", "1.25")
    page.keyboard.press("s")
    page.wait_for_url(lambda url: url.endswith(f"/review/{ids['b']}"))
    expect(page.locator("#stage")).to_have_attribute("data-ready", "1", timeout=60_000)
    expect(page.locator("#stage")).to_have_attribute("data-zoom", "1.25")  # relative to this image's fit
    expect(page.locator("#preset")).to_have_value("soft")
    expect(page.locator("#invert")).to_have_attribute("aria-pressed", "true")
    page.uncheck("#keep-view")
    page.keyboard.press("s")
    page.wait_for_url(lambda url: url.endswith(f"/review/{ids['c']}"))
    expect(page.locator("#stage")).to_have_attribute("data-zoom", "1")
    expect(page.locator("#preset")).to_have_value("full")  # a JPEG: its 8-bit range as it is


def _wait_until(page, expression: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``expression`` in the page (page.wait_for_function evaluates strings, which the portal's CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(100)


@pytest.mark.parametrize("size", [(1440, 900), (1280, 720)])
def test_screenshots_of_the_worklist_and_the_viewer(browser, workspace: Workspace, shots: Path, size: tuple) -> None:  # type: ignore[no-untyped-def]
    width, height = size
    page = _new_page(browser, workspace.portal, width, height)
    page.goto(workspace.portal.url + "/review")
    _wait_until(page, "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(shots / f"review-{width}x{height}.png"))
    page.goto(workspace.portal.url + f"/review/{workspace.ids['a']}")
    page.locator(".label-button[data-label='fracture']").click()
    page.wait_for_url(lambda url: url.endswith(f"/review/{workspace.ids['b']}"))
    _wait_until(page, "document.getElementById('stage').dataset.ready === '1'", 60)
    page.screenshot(path=str(shots / f"viewer-{width}x{height}.png"))
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # nothing sticks out sideways
