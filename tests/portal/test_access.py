"""Access control: every route needs sign-in, roles limit what each user may do, CSRF, rate limit, cookies, audit."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from core.db import Database
from core.models import AuditEvent, ModelVersion
from tests.conftest import register_tiny_model, xray_sample
from tests.portal.conftest import PASSWORD, csrf_token, predict, session_client, token_client

PUBLIC = {"auth.login", "health.healthz", "health.readyz", "static"}


def _concrete(rule: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: "1" if "id" in m.group(1) else "x.png", rule)


def test_every_route_except_login_and_health_refuses_anonymous_requests(app: Flask, anon: FlaskClient, users: dict) -> None:
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC:
            continue
        url = _concrete(rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = anon.open(url, method=method)
            if url.startswith("/api/") or url == "/metrics":
                assert response.status_code == 401, (method, url, response.status_code)
                assert "error" in response.get_json()
            else:
                assert response.status_code == 302, (method, url, response.status_code)
                assert response.headers["Location"].startswith("/login")
            checked += 1
    assert checked >= 20  # the walk found the app's routes
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/login").status_code == 200
    assert anon.get("/static/style.css").status_code == 200


def test_a_bad_or_revoked_token_is_refused(app: Flask, users: dict, db: Database) -> None:
    assert token_client(app, "trg_not-a-real-token").get("/api/studies").status_code == 401
    assert token_client(app, users["uploader"]).get("/api/studies").status_code == 200
    from core.models import ApiToken, utcnow

    with db.transaction() as session:
        for row in session.scalars(select(ApiToken)):
            row.revoked_at = utcnow()
    assert token_client(app, users["uploader"]).get("/api/studies").status_code == 401


def test_tokens_are_stored_only_as_hashes(users: dict, db: Database) -> None:
    from core.models import ApiToken

    with db.transaction() as session:
        stored = {row.token_hash for row in session.scalars(select(ApiToken))}
    assert len(stored) == 3 and not (stored & set(users.values()))


@pytest.fixture
def flagged_image(app: Flask, users: dict, db: Database, production_model: int, xrays_dir: Path) -> int:
    """One uploaded, predicted and flagged image id."""
    client = token_client(app, users["admin"])
    image = xray_sample(xrays_dir, 1)[0]
    body = client.post("/api/studies", data={"name": "roles", "files": [(io.BytesIO(image.read_bytes()), image.name)]},
                       content_type="multipart/form-data").get_json()
    image_id = body["files"][0]["id"]
    predict(db, [image_id], [0.5])
    return image_id


def test_each_role_sees_only_what_it_may(app: Flask, users: dict, db: Database, flagged_image: int,
                                         settings, tiny_weights: dict) -> None:  # type: ignore[no-untyped-def]
    other_version = register_tiny_model(db, settings, tiny_weights, promote=False)
    uploader, reviewer, admin = (token_client(app, users[r]) for r in ("uploader", "reviewer", "admin"))
    def upload() -> dict:
        return {"name": "x", "files": [(io.BytesIO(b"not an image"), "a.jpg")]}

    # uploader: upload, view, export; no review, no promote, no audit
    assert uploader.post("/api/studies", data=upload(), content_type="multipart/form-data").status_code == 201
    assert uploader.get("/api/studies/1/results").status_code == 200
    assert uploader.get("/api/studies/1/export?format=csv").status_code == 200
    assert uploader.get("/api/review-queue").status_code == 403
    assert uploader.post(f"/api/images/{flagged_image}/review", json={"label": "fracture"}).status_code == 403
    assert uploader.get(f"/review/{flagged_image}").status_code == 403
    assert uploader.post(f"/models/{other_version}/promote").status_code == 403
    assert uploader.get("/admin/audit").status_code == 403
    assert 'href="/review"' not in session_client(app, "uploader").get("/").get_data(as_text=True)

    # reviewer: review; no upload, no promote, no re-review
    assert reviewer.get("/api/review-queue").get_json()["count"] == 1
    assert reviewer.post("/api/studies", data=upload(), content_type="multipart/form-data").status_code == 403
    assert reviewer.post(f"/models/{other_version}/promote").status_code == 403
    assert reviewer.get("/admin/audit").status_code == 403
    assert reviewer.post(f"/api/images/{flagged_image}/review", json={"label": "fracture"}).status_code == 201
    again = reviewer.post(f"/api/images/{flagged_image}/review", json={"label": "no_fracture"})
    assert again.status_code == 409 and "only an admin" in again.get_json()["error"]
    assert "Already reviewed" in session_client(app, "reviewer").get(f"/review/{flagged_image}").get_data(as_text=True)

    # admin: re-review, promote (audited), audit log
    assert admin.post(f"/api/images/{flagged_image}/review", json={"label": "no_fracture", "note": "second look"}).status_code == 201
    browser = session_client(app, "admin")
    models_page = browser.get("/models").get_data(as_text=True)
    promoted = browser.post(f"/models/{other_version}/promote", data={"csrf_token": csrf_token(models_page)})
    assert promoted.status_code == 303
    with db.transaction() as session:
        assert session.get(ModelVersion, other_version).is_production
    audit_page = admin.get("/admin/audit").get_data(as_text=True)
    for action in ("upload", "review", "export", "promote", "login", "view"):
        assert f"<td>{action}</td>" in audit_page, action
    with db.transaction() as session:
        promote = session.scalars(select(AuditEvent).where(AuditEvent.action == "promote")).one()
        assert (promote.username, promote.object_type, promote.object_id) == ("admin", "model_version", str(other_version))
        assert promote.ip == "127.0.0.1" and promote.created_at is not None


def test_csrf_is_required_for_session_writes_but_not_for_tokens(app: Flask, users: dict, flagged_image: int) -> None:
    browser = session_client(app, "reviewer")
    refused = browser.post(f"/api/images/{flagged_image}/review", json={"label": "fracture"})
    assert refused.status_code == 400 and "CSRF" in refused.get_json()["error"]
    page = browser.get("/review").get_data(as_text=True)
    assert browser.post(f"/review/{flagged_image}", data={"label": "fracture"}).status_code == 400
    logout = browser.post("/logout")
    assert logout.status_code == 400  # sign-out needs the token too
    ok = browser.post(f"/api/images/{flagged_image}/review", json={"label": "fracture"},
                      headers={"X-CSRFToken": csrf_token(page)})
    assert ok.status_code == 201
    login_without_token = app.test_client().post("/login", data={"username": "admin", "password": PASSWORD})
    assert login_without_token.status_code == 400


def test_login_is_rate_limited_and_failures_are_audited(app: Flask, users: dict, db: Database, settings) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    for _ in range(settings.login_max_failures):
        wrong = client.post("/login", data={"csrf_token": token, "username": "admin", "password": "wrong password"})
        assert wrong.status_code == 401 and b"Wrong user name or password" in wrong.data
    # Over the limit, even the right password is refused for now.
    limited = client.post("/login", data={"csrf_token": token, "username": "admin", "password": PASSWORD})
    assert limited.status_code == 429 and b"Too many failed sign-ins" in limited.data
    assert client.get("/").status_code == 302  # not signed in
    with db.transaction() as session:
        failures = session.scalars(select(AuditEvent).where(AuditEvent.action == "login_failed")).all()
        assert len(failures) == settings.login_max_failures + 1
        assert all(event.object_id == "admin" and event.ip == "127.0.0.1" for event in failures)


def test_session_cookie_is_httponly_samesite_and_secure_over_https(app: Flask, users: dict) -> None:
    client = app.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={"csrf_token": token, "username": "admin", "password": PASSWORD})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    secure = app.test_client()
    page = secure.get("/login", base_url="https://localhost")
    assert "Secure" in page.headers["Set-Cookie"]
    signed_in = secure.post("/login", base_url="https://localhost", headers={"Referer": "https://localhost/login"}, data={
        "csrf_token": csrf_token(page.get_data(as_text=True)), "username": "admin", "password": PASSWORD})
    assert signed_in.status_code == 303 and "Secure" in signed_in.headers["Set-Cookie"]


def test_login_redirects_only_to_local_pages(app: Flask, users: dict) -> None:
    client = app.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/login?next=https://evil.example/", data={"csrf_token": token, "username": "admin", "password": PASSWORD})
    assert response.status_code == 303 and response.headers["Location"] == "/"
