"""The viewer and the upload form in a real browser (Debian Chromium via Playwright) on a live portal.

Windowing a 10-bit MONOCHROME1 DICOM radiograph with presets (the numbers read back), the heat map's
opacity and its request, the study's thumbnail strip with the DICOM attributes, the layout at
1440x900, 1280x720 and 820 wide (screenshots), and a drag-and-drop upload with its progress bar.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from core.auth import create_user
from core.config import Settings
from core.db import Database
from core.models import AuditEvent, ModelVersion, Prediction, Study
from core.storage import heatmap_store
from tests.conftest import deploy_tiny_model, make_settings, xray_sample
from tests.e2e.conftest import LivePortal, wait_for
from tests.e2e.test_browser import PASSWORD, _new_page, browser, shots  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@dataclass
class Reading:
    """A live portal with a DICOM study of two views (the first flagged, with a heat map; the second without)."""

    portal: LivePortal
    db: Database
    settings: Settings
    first: int
    second: int
    page: object


def _heatmap_png() -> bytes:
    picture = PILImage.radial_gradient("L").resize((64, 64)).point(lambda v: 255 - v)
    rgba = PILImage.merge("RGBA", (picture, PILImage.new("L", (64, 64), 40), PILImage.new("L", (64, 64), 0), picture))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def reading(browser, tmp_path: Path, dicom_dir: Path, tiny_weights: dict,  # type: ignore[no-untyped-def]  # noqa: F811
            live_portal_factory: Callable[[Settings], LivePortal]) -> Iterator[Reading]:
    from core.studies import add_upload, create_study, finish_study_if_complete
    from tests.portal.test_review_flow import predict

    settings = make_settings(tmp_path / "var")
    db, version_id = deploy_tiny_model(settings, tiny_weights)
    with db.transaction() as session:
        create_user(session, "reviewer", PASSWORD, "admin")  # reviews, and sees the upload form for the screenshots
        study = create_study(session, "Wrist", session.get(ModelVersion, version_id))
        first, second = (add_upload(session, settings, study, name, (dicom_dir / name).read_bytes()).id
                         for name in ("RG3_UNCR.dcm", "RG3_J2KR.dcm"))
        study_id = study.id
    predict(db, {first: 0.6, second: 0.3})
    with db.transaction() as session:
        prediction = session.scalars(select(Prediction).where(Prediction.image_id == first)).one()
        prediction.heatmap_key = heatmap_store(settings).put_bytes(_heatmap_png())[1]
        finish_study_if_complete(session, study_id)
    portal = live_portal_factory(settings)
    yield Reading(portal, db, settings, first, second, _new_page(browser, portal))
    db.dispose()


def _open(reading: Reading, image_id: int, page: object | None = None) -> object:
    from playwright.sync_api import expect

    page = page or reading.page
    page.goto(f"{reading.portal.url}/review/{image_id}")  # type: ignore[attr-defined]
    # The first request makes the full-depth PNG (kept for the next): allow it time on a busy machine.
    expect(page.locator("#stage")).to_have_attribute("data-ready", "1", timeout=90_000)  # type: ignore[attr-defined]
    return page


def _centre_grey(page: object) -> int:
    return page.evaluate(  # type: ignore[attr-defined]
        "(() => { const c = document.getElementById('xray');"
        " return c.getContext('2d').getImageData(c.width >> 1, c.height >> 1, 1, 1).data[0]; })()")


def test_windowing_a_dicom_image_with_presets_reads_the_numbers_back(reading: Reading) -> None:
    from playwright.sync_api import expect

    page = _open(reading, reading.first)
    # The file's own window (Window Center 550, Width 1024) is the default, and its preset is offered.
    expect(page.locator("#preset")).to_have_value("file")
    expect(page.locator("#ww")).to_have_value("1024")
    expect(page.locator("#wl")).to_have_value("550")
    default_grey = _centre_grey(page)

    page.select_option("#preset", "full")  # the 10-bit range 0-1023
    expect(page.locator("#ww")).to_have_value("1024")
    expect(page.locator("#wl")).to_have_value("512")
    page.select_option("#preset", "bone")
    expect(page.locator("#preset")).to_have_value("bone")
    bone_width = float(page.locator("#ww").input_value())
    assert 1 <= bone_width < 1024  # a narrower window over the image's brightest values

    page.fill("#ww", "300")
    page.fill("#wl", "400")
    page.press("#wl", "Enter")
    expect(page.locator("#preset")).to_have_value("custom")
    expect(page.locator("#stage")).to_have_attribute("data-ww", "300")

    page.select_option("#preset", "file")
    expect(page.locator("#ww")).to_have_value("1024")
    page.locator("#stage").click()
    page.keyboard.press("i")  # invert: each grey level becomes its opposite
    expect(page.locator("#invert")).to_have_attribute("aria-pressed", "true")
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    assert _centre_grey(page) == 255 - default_grey

    # Shift-drag: 100 px sideways widens the window by 100/stage-width of the value range (1023).
    width_before = float(page.locator("#ww").input_value())
    box = page.locator("#stage").bounding_box()
    page.keyboard.down("Shift")
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 300, box["y"] + 200, steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")
    stage_width = page.locator("#stage").evaluate("e => e.clientWidth")
    assert float(page.locator("#ww").input_value()) == pytest.approx(width_before + 100 * 1023 / stage_width, abs=0.02)

    page.keyboard.press("0")  # reset: the file's window, not inverted
    expect(page.locator("#ww")).to_have_value("1024")
    expect(page.locator("#invert")).to_have_attribute("aria-pressed", "false")


def test_rotate_flip_fit_and_one_to_one(reading: Reading) -> None:
    from playwright.sync_api import expect

    page = _open(reading, reading.first)
    expect(page.locator("#stage")).to_have_attribute("data-zoom", "1")  # fitted
    page.click("button[data-action=actual]")
    scale = 1760 / page.locator("#xray").bounding_box()["width"]
    assert scale == pytest.approx(1.0, abs=0.01)  # one image pixel per screen pixel (device pixel ratio 1)
    page.click("button[data-action=fit]")
    expect(page.locator("#stage")).to_have_attribute("data-zoom", "1")
    page.keyboard.press("r")
    assert "rotate(90deg)" in page.locator("#layer").evaluate("e => e.style.transform")
    page.click("#flip-h")
    expect(page.locator("#flip-h")).to_have_attribute("aria-pressed", "true")
    assert "scale(-1, 1)" in page.locator("#layer").evaluate("e => e.style.transform")


def test_the_heat_map_has_an_opacity_control_a_legend_and_lies_over_the_image(reading: Reading) -> None:
    from playwright.sync_api import expect

    page = _open(reading, reading.first)
    expect(page.locator("#heat-tools .explains")).to_contain_text("influence on Fracture")
    page.locator("#stage").click()
    page.keyboard.press("h")
    expect(page.locator("#heatmap")).to_be_visible()
    expect(page.locator(".legend-bar")).to_be_visible()
    page.locator("#heat-opacity").fill("25")
    expect(page.locator("#heatmap")).to_have_css("opacity", "0.25")
    expect(page.locator("#heat-opacity-value")).to_have_text("25 %")
    page.locator("#heat-opacity").fill("90")
    expect(page.locator("#heatmap")).to_have_css("opacity", "0.9")
    heat, image = page.locator("#heatmap").bounding_box(), page.locator("#xray").bounding_box()
    assert heat == pytest.approx(image, abs=0.5)  # exactly over the image, not the black around it


def test_a_heat_map_is_asked_for_and_shown_when_the_worker_made_it(reading: Reading) -> None:
    from playwright.sync_api import expect

    page = _open(reading, reading.second)
    expect(page.locator("#toggle-heatmap")).to_be_disabled()
    page.click("#request-heatmap")
    expect(page.locator("#heatmap-message")).to_contain_text("Making the heat map")

    def asked() -> bool:
        with reading.db.transaction() as session:
            return session.scalars(select(AuditEvent).where(AuditEvent.action == "heatmap_request")).first() is not None

    wait_for(asked, 20, "the heat map request")
    with reading.db.transaction() as session:  # what the worker's triage.heatmap task does
        prediction = session.scalars(select(Prediction).where(Prediction.image_id == reading.second)).one()
        prediction.heatmap_key = heatmap_store(reading.settings).put_bytes(_heatmap_png())[1]
    expect(page.locator("#heatmap")).to_be_visible()  # the page polled and shows it
    expect(page.locator("#toggle-heatmap")).to_be_checked()


def test_the_study_strip_opens_the_other_view_and_shows_the_dicom_attributes(reading: Reading) -> None:
    from playwright.sync_api import expect

    page = _open(reading, reading.first)
    expect(page.locator(".attributes dt")).to_have_text(["Body part", "Laterality", "View", "Modality"])
    expect(page.locator(".attributes dd")).to_have_text(["EXTREMITY", "Right", "AP", "CR"])
    expect(page.locator(".strip .strip-item")).to_have_count(2)
    page.locator(f".strip a[href='/review/{reading.second}']").click()
    page.wait_for_url(lambda url: url.endswith(f"/review/{reading.second}"))
    expect(page.locator(".strip .strip-item.current")).to_have_attribute("title", "RG3_J2KR.dcm")


@pytest.mark.parametrize("size", [(1440, 900), (1280, 720), (820, 1180)])
def test_screenshots_of_the_viewer_with_a_dicom_image(browser, reading: Reading, shots: Path, size: tuple) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    width, height = size
    page = _open(reading, reading.first, _new_page(browser, reading.portal, width, height))
    page.locator("#stage").click()
    page.keyboard.press("h")
    page.screenshot(path=str(shots / f"viewer-dicom-{width}x{height}.png"))
    stage = page.locator("#stage").bounding_box()
    assert stage["width"] >= width * 0.55  # the image is never squeezed by the side panel
    assert stage["height"] >= 300
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.goto(reading.portal.url + "/")
    page.screenshot(path=str(shots / f"studies-{width}x{height}.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_drag_and_drop_upload_shows_progress_and_creates_the_study(  # noqa: F811
    browser, tmp_path: Path, xrays_dir: Path, tiny_weights: dict, shots: Path,  # type: ignore[no-untyped-def]
    live_portal_factory: Callable[[Settings], LivePortal],
) -> None:
    from playwright.sync_api import expect

    settings = make_settings(tmp_path / "var")
    db, _ = deploy_tiny_model(settings, tiny_weights)
    with db.transaction() as session:
        create_user(session, "reviewer", PASSWORD, "admin")
    portal = live_portal_factory(settings)
    page = _new_page(browser, portal)
    expect(page.locator("label.picker")).to_have_text(["Choose a folder", "Choose files or a zip"])

    page.click("#upload-submit")  # the name is required first
    page.fill("input[name=name]", "Dropped ward")
    page.click("#upload-submit")
    expect(page.locator("#upload-error")).to_have_text("Choose at least one image, folder or zip to upload.")

    # Drop files: a DataTransfer built in the page from the files' bytes, dispatched on the drop zone.
    samples = xray_sample(xrays_dir, 3)
    payload = [{"name": p.name, "bytes": list(p.read_bytes())} for p in samples]
    page.evaluate(
        """files => {
            const transfer = new DataTransfer();
            for (const f of files) { transfer.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: "image/jpeg"})); }
            const zone = document.getElementById("drop-zone");
            zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        payload,
    )
    expect(page.locator("#chosen")).to_contain_text("3 files chosen")
    page.screenshot(path=str(shots / "upload-dropped.png"))
    # Watch the progress bar: every value it shows is kept in sessionStorage, which outlives the navigation.
    page.evaluate("""() => {
        const bar = document.getElementById("upload-bar"), box = document.getElementById("upload-progress");
        new MutationObserver(() => {
            const seen = JSON.parse(sessionStorage.getItem("progressSeen") || "[]");
            seen.push({value: bar.value, shown: !box.hidden});
            sessionStorage.setItem("progressSeen", JSON.stringify(seen));
        }).observe(document.getElementById("upload-percent"), {childList: true, characterData: true, subtree: true});
    }""")
    page.click("#upload-submit")
    page.wait_for_url(lambda url: "/studies/" in url, timeout=90_000)
    expect(page.locator("h1")).to_contain_text("Dropped ward", timeout=30_000)
    seen = page.evaluate("JSON.parse(sessionStorage.getItem('progressSeen') || '[]')")
    assert seen and all(step["shown"] for step in seen) and seen[-1]["value"] == 100, seen
    with db.transaction() as session:
        study = session.scalars(select(Study).where(Study.name == "Dropped ward")).one()
        assert sorted(image.filename for image in study.images) == sorted(p.name for p in samples)
    db.dispose()
