"""HTML pages render, show the demo banner, serve image bytes safely; JSON errors; no torch import."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from flask.testing import FlaskClient

from core.config import Settings
from core.db import Database
from tests.conftest import PROJECT_ROOT, xray_sample
from tests.portal.conftest import predict, token_client

BANNER = "Demo model — not for clinical use"


def _upload(client: FlaskClient, files: dict[str, bytes]) -> dict:
    data = {"name": "pages", "files": [(io.BytesIO(content), name) for name, content in files.items()]}
    response = client.post("/api/studies", data=data, content_type="multipart/form-data")
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_pages_render_with_study_data_and_no_demo_banner_for_a_real_model(
    client: FlaskClient, db: Database, production_model: int, xrays_dir: Path
) -> None:
    image = xray_sample(xrays_dir, 1)[0]
    body = _upload(client, {image.name: image.read_bytes(), "broken.jpg": b"plain text"})
    good = next(item["id"] for item in body["files"] if item["status"] == "queued")
    predict(db, [good], [0.5])

    index = client.get("/").get_data(as_text=True)
    assert "#1 pages" in index and "#1 tiny test model" in index
    # a folder picker, a files-or-zip picker (zips are unpacked like the archive field), each labelled in words
    for field in ('name="files" multiple webkitdirectory', 'id="files-input"', ".zip,", 'name="csrf_token"',
                  ">Choose a folder<", ">Choose files or a zip<"):
        assert field in index
    assert BANNER not in index

    study = client.get(f"/studies/{body['id']}")
    assert study.status_code == 200
    html = study.get_data(as_text=True)
    assert f'data-status-url="/api/studies/{body["id"]}"' in html and "study.js" in html  # live polling
    assert image.name in html and "broken.jpg" in html and "not an image" in html
    assert f'src="/images/{good}/file"' in html and "50 %" in html and "Model unsure: 50 % &lt; 90 % needed" in html
    assert "unsafe-inline" not in study.headers["Content-Security-Policy"]
    assert "<script>" not in html  # no inline script: the CSP allows only same-origin files

    review = client.get("/review").get_data(as_text=True)
    assert f'id="case-{good}"' in review
    models = client.get("/models").get_data(as_text=True)
    assert "test_efficientnet" in models and "production" in models and "Fracture, No fracture" in models
    static = client.get("/static/study.js")
    assert static.status_code == 200 and b"/api/" not in static.data  # the URL comes from the page
    assert client.get("/studies/9999").status_code == 404


def test_every_page_shows_the_demo_banner_for_a_demo_model(client: FlaskClient, demo_model: int) -> None:
    for path in ("/", "/review", "/models", "/no-such-page"):
        page = client.get(path).get_data(as_text=True)
        assert BANNER in page, path
    models = client.get("/models").get_data(as_text=True)
    assert f"#{demo_model} demo model (demo, not for clinical use)" in models
    assert "Comminuted fracture, No fracture, Simple fracture" in models
    api_models = client.get("/api/models").get_json()["models"]
    assert api_models[0]["is_demo"] is True and api_models[0]["is_production"] is True


def test_no_model_page_says_how_to_get_one(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    assert "No production model" in page and "--promote" in page
    assert BANNER not in page


def test_image_file_is_served_by_id_with_a_sniffed_type(
    client: FlaskClient, settings: Settings, production_model: int, xrays_dir: Path
) -> None:
    content = xray_sample(xrays_dir, 1)[0].read_bytes()
    body = _upload(client, {"../../etc/passwd.png": content, "bad.jpg": b"<script>alert(1)</script>"})
    good, bad = body["files"]
    assert good["filename"] == "../../etc/passwd.png"  # display only
    response = client.get(f"/images/{good['id']}/file")
    assert response.status_code == 200 and response.data == content
    assert response.mimetype == "image/jpeg"  # from the bytes, not the .png name
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "passwd" not in response.headers.get("Content-Disposition", "")
    missing = client.get(f"/images/{bad['id']}/file")
    assert missing.status_code == 404 and b"refused" in missing.data
    assert client.get("/images/9999/file").status_code == 404


def test_api_errors_are_json_and_healthz_is_ok(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    missing = client.get("/api/no-such-thing")
    assert missing.status_code == 404 and "error" in missing.get_json()
    wrong_method = client.delete("/api/studies")
    assert wrong_method.status_code == 405 and "error" in wrong_method.get_json()
    assert client.get("/no-such-page").mimetype == "text/html"


def test_unexpected_error_is_a_500_with_the_session_rolled_back(app, users: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    @app.get("/api/boom")
    def boom():  # type: ignore[no-untyped-def]
        """Fail on purpose."""
        raise RuntimeError("boom")

    response = token_client(app, users["admin"]).get("/api/boom")
    assert response.status_code == 500
    assert "Internal error" in response.get_json()["error"] and "boom" not in response.get_json()["error"]


def test_importing_the_portal_and_serving_requests_does_not_import_torch(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from core.migrate import upgrade\n"
        "from core.config import get_settings\n"
        "upgrade(get_settings().database_url)\n"
        "from core.db import Database\n"
        "from core.auth import create_user, issue_token\n"
        "with Database(get_settings()).transaction() as s:\n"
        "    token = issue_token(s, create_user(s, 'admin', 'long enough password', 'admin'))[1]\n"
        "import portal\n"
        "app = portal.create_app()\n"
        "client = app.test_client()\n"
        "client.environ_base['HTTP_AUTHORIZATION'] = 'Bearer ' + token\n"
        "for path in ('/', '/review', '/models', '/admin/audit', '/api/studies', '/api/models', '/api/openapi.json', '/healthz', '/metrics'):\n"
        "    assert client.get(path).status_code == 200, path\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'worker', 'core.ml') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "TRIAGE_DATA_DIR": str(tmp_path / "var"), "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
