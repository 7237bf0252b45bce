"""Exports, re-runs side by side, model statistics and plots, readiness and metrics, upload safety, user CLI."""

from __future__ import annotations

import csv
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from core.config import Settings
from core.db import Database
from core.models import AuditEvent, Image, Study
from core.studies import finish_study_if_complete
from tests.conftest import PROJECT_ROOT, register_tiny_model, xray_sample
from tests.e2e.conftest import settings_env
from tests.portal.conftest import broker_messages, csrf_token, files_under, predict, session_client


@pytest.fixture
def study(client: FlaskClient, db: Database, production_model: int, xrays_dir: Path) -> dict:
    """A finished study: three radiographs (two flagged) and one refused file named like a formula."""
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in xray_sample(xrays_dir, 3)]
    files.append((io.BytesIO(b"text"), "=HYPERLINK(1).jpg"))
    body = client.post("/api/studies", data={"name": "features", "files": files}, content_type="multipart/form-data").get_json()
    good = [f["id"] for f in body["files"] if f["status"] == "queued"]
    predict(db, good, [0.55, 0.97, 0.6])
    with db.transaction() as session:
        finish_study_if_complete(session, body["id"])
    return {"id": body["id"], "good": good}


def test_exports_as_csv_and_json_are_complete_and_audited(client: FlaskClient, db: Database, study: dict) -> None:
    response = client.get(f"/studies/{study['id']}/export.csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert f"study-{study['id']}.csv" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert len(rows) == 4
    by_id = {int(row["image_id"]): row for row in rows}
    assert by_id[study["good"][0]]["flagged"] == "True" and by_id[study["good"][0]]["label"] == "fracture"
    refused = next(row for row in rows if row["status"] == "failed")
    assert refused["filename"] == "'=HYPERLINK(1).jpg"  # no formula injection into spreadsheets
    exported = client.get(f"/api/studies/{study['id']}/export?format=json").get_json()
    assert exported["study"]["id"] == study["id"] and len(exported["images"]) == 4
    assert client.get(f"/api/studies/{study['id']}/export?format=xml").status_code == 400
    with db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "export")) == 2


def test_study_page_has_a_sortable_filterable_table_and_live_list(client: FlaskClient, study: dict) -> None:
    page = client.get(f"/studies/{study['id']}").get_data(as_text=True)
    assert 'id="results-filter"' in page and 'data-sort="number"' in page and "table.js" in page
    assert 'class="thumb"' in page and "export.csv" in page
    index = client.get("/").get_data(as_text=True)
    assert 'data-list-url="/api/studies"' in index and "studies.js" in index and f'data-study="{study["id"]}"' in index


def test_rerun_with_another_version_reuses_the_images_and_shows_both_side_by_side(
    app: Flask, db: Database, settings: Settings, tiny_weights: dict, study: dict
) -> None:
    other = register_tiny_model(db, settings, tiny_weights, promote=False)
    browser = session_client(app, "uploader")
    page = browser.get(f"/studies/{study['id']}").get_data(as_text=True)
    before_files = files_under(settings.storage_dir)
    response = browser.post(f"/studies/{study['id']}/rerun", data={"csrf_token": csrf_token(page), "model_version_id": other})
    assert response.status_code == 303
    with db.transaction() as session:
        rerun = session.scalars(select(Study).where(Study.rerun_of_id == study["id"])).one()
        copies = session.scalars(select(Image).where(Image.study_id == rerun.id)).all()
        originals = session.scalars(select(Image).where(Image.id.in_(study["good"]))).all()
        assert rerun.model_version_id == other and len(copies) == 3
        assert sorted(c.sha256 for c in copies) == sorted(o.sha256 for o in originals)
        assert {c.storage_key for c in copies} == {o.storage_key for o in originals}
        rerun_id, copy_ids = rerun.id, [c.id for c in copies]
    assert files_under(settings.storage_dir) == before_files  # nothing uploaded or stored again
    assert any(m["args"] == [rerun_id, copy_ids] for m in broker_messages(settings))
    predict(db, copy_ids, [0.99, 0.99, 0.99])
    side = browser.get(f"/studies/{study['id']}").get_data(as_text=True)
    assert "Model versions side by side" in side and f"#{rerun_id}" in side and "99 %" in side and "55 %" in side
    same = browser.post(f"/studies/{rerun_id}/rerun", data={"csrf_token": csrf_token(side), "model_version_id": other})
    assert same.status_code == 409


def test_models_page_shows_agreement_confusion_flag_rate_and_plots(
    client: FlaskClient, db: Database, settings: Settings, study: dict, production_model: int, tmp_path: Path
) -> None:
    first, _, third = study["good"]
    client.post(f"/api/images/{first}/review", json={"label": "fracture"})
    client.post(f"/api/images/{third}/review", json={"label": "no_fracture"})
    from core.models import ModelVersion

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "confusion_matrix.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    with db.transaction() as session:
        session.get(ModelVersion, production_model).extra = {"run_dir": str(run_dir)}
    page = client.get("/models").get_data(as_text=True)
    assert "50 % (1 of 2 reviewed cases)" in page
    assert 'class="grid confusion"' in page and "67 %" in page  # 2 of 3 predictions flagged today
    assert f"/models/{production_model}/plots/confusion_matrix.png" in page
    assert client.get(f"/models/{production_model}/plots/confusion_matrix.png").status_code == 200
    assert client.get(f"/models/{production_model}/plots/..%2Fsecret.png").status_code == 404


def test_readyz_and_metrics(app: Flask, anon: FlaskClient, client: FlaskClient, study: dict, db: Database) -> None:
    ready = anon.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"] == {"database": "ok", "broker": "ok", "production_model": "ok"}
    assert anon.get("/metrics").status_code == 401  # metrics need a token
    text = client.get("/metrics").get_data(as_text=True)
    assert 'triage_images_total{outcome="classified"} 3.0' in text
    assert 'triage_images_total{outcome="failed"} 1.0' in text
    assert "triage_images_flagged_total 2.0" in text
    assert "triage_review_backlog 2.0" in text
    assert "triage_review_backlog_oldest_seconds" in text and "triage_queue_wait_seconds 0.0" in text


def test_readyz_without_a_model_or_broker_is_503(tmp_path: Path) -> None:
    from core.migrate import upgrade
    from portal import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "var", broker_url="redis://127.0.0.1:1/0")
    upgrade(settings.database_url)
    body = create_app(settings).test_client().get("/readyz")
    assert body.status_code == 503
    checks = body.get_json()["checks"]
    assert checks["database"] == "ok" and "broker unreachable" in checks["broker"] and "no production model" in checks["production_model"]


def _png_header_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_decompression_bomb_and_non_image_are_refused_clearly_and_nothing_stored(
    client: FlaskClient, settings: Settings, production_model: int, tmp_path: Path
) -> None:
    before = files_under(tmp_path)
    bomb = _png_header_claiming(100_000, 100_000)
    assert len(bomb) < 100
    response = client.post("/api/studies", data={"name": "bomb", "files": [
        (io.BytesIO(bomb), "../../bomb.png"), (io.BytesIO(b"%PDF-1.4 not an image"), "scan.pdf")]},
        content_type="multipart/form-data")
    assert response.status_code == 201
    files = {f["filename"]: f for f in response.get_json()["files"]}
    assert files["../../bomb.png"]["status"] == "failed"
    assert "image too large: 100000x100000" in files["../../bomb.png"]["error"] and "TRIAGE_MAX_IMAGE_PIXELS" in files["../../bomb.png"]["error"]
    assert "not an image" in files["scan.pdf"]["error"]
    new = [p for p in files_under(tmp_path) - before if not p.name.startswith("triage.db")]
    assert new == []  # nothing written anywhere: not in the image store, not next to it
    assert broker_messages(settings) == []


def test_user_cli_creates_accounts_and_tokens(settings: Settings, db: Database, app: Flask) -> None:
    env = settings_env(settings)
    create = subprocess.run([sys.executable, "-m", "admin.cli", "user", "create", "dr.bones", "--role", "reviewer", "--password-stdin"],
                            input="a long enough secret\n", cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert create.returncode == 0, create.stderr
    assert "created user 'dr.bones' with role reviewer" in create.stdout
    short = subprocess.run([sys.executable, "-m", "admin.cli", "user", "create", "x", "--role", "admin", "--password-stdin"],
                           input="short\n", cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "at least 10 characters" in short.stderr
    token = subprocess.run([sys.executable, "-m", "admin.cli", "user", "token", "dr.bones"],
                           cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert token.returncode == 0, token.stderr
    value = token.stdout.strip()
    assert value.startswith("trg_")
    api = app.test_client()
    assert api.get("/api/review-queue", headers={"Authorization": f"Bearer {value}"}).status_code == 200
    assert api.get("/api/review-queue", headers={"Authorization": f"Bearer {value}x"}).status_code == 401
