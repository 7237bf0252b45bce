"""A person in a real browser: sign in, upload a folder, watch progress finish, review a flagged case.

Playwright drives Debian's Chromium (/usr/bin/chromium; `.ci/system-packages` installs it) against a live
portal (werkzeug in a thread) and a real celery worker on the embedded SQLite + filesystem broker.
Screenshots go to the test's temporary folder (or $TRIAGE_SCREENSHOTS), never into the repository.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.auth import create_user
from core.config import Settings
from core.models import Review
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
    expect(page.locator("#xray")).to_be_visible()
    page.keyboard.press("+")  # zoom
    if page.locator("#toggle-heatmap").count():
        page.keyboard.press("h")
        expect(page.locator("#heatmap")).to_be_visible()
    page.screenshot(path=str(shots / "3-viewer.png"))

    # One key records a label; the next case opens.
    page.keyboard.press("2")
    page.wait_for_url(lambda url: url != first_url and "/review/" in url)
    expect(page.locator(".notice.info")).to_contain_text("Recorded no_fracture")
    second_url = page.url
    page.keyboard.press("Enter")  # confirm the model's label
    page.wait_for_url(lambda url: url != second_url)
    page.screenshot(path=str(shots / "4-next-case.png"))

    with db.transaction() as session:
        reviews = session.scalars(select(Review).order_by(Review.id)).all()
        assert [r.reviewer_name for r in reviews] == ["radiologist", "radiologist"]
        assert reviews[0].label == "no_fracture" and reviews[1].label in tiny_weights["labels"]
    db.dispose()
