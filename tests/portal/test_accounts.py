"""Accounts: sessions end on logout, password change and disabling; admin pages for users and tokens;
a user's own tokens; the login rate limit per account and per address; trusted proxies; safe redirects."""

from __future__ import annotations

import re

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from core.auth import get_user
from core.config import Settings
from core.db import Database
from core.models import ApiToken, AuditEvent, Study
from portal import create_app
from tests.portal.conftest import PASSWORD, csrf_token, login, session_client, token_client

COOKIE = "triage_session"
NEW_PASSWORD = "a brand new passphrase"


def copy_of(app: Flask, client: FlaskClient) -> FlaskClient:
    """Another client holding a copy of ``client``'s session cookie (as a thief would)."""
    thief = app.test_client()
    thief.set_cookie(COOKIE, client.get_cookie(COOKIE).value)  # type: ignore[union-attr]
    return thief


def signed_in(client: FlaskClient) -> bool:
    """Whether ``client``'s session still opens a page (anonymous requests are redirected to /login)."""
    return client.get("/").status_code == 200


def post_form(client: FlaskClient, url: str, page: str = "/", **data: str):  # type: ignore[no-untyped-def]
    """POST a form with the CSRF token of ``page``."""
    token = csrf_token(client.get(page).get_data(as_text=True))
    return client.post(url, data={"csrf_token": token, **data})


def audit_actions(db: Database, action: str) -> list[AuditEvent]:
    with db.transaction() as session:
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))
        session.expunge_all()
        return events


def user_id(db: Database, name: str) -> int:
    with db.transaction() as session:
        return get_user(session, name).id  # type: ignore[union-attr]


# --- 1. sessions end -------------------------------------------------------------------------------------------


def test_logout_ends_every_session_of_the_user_including_copied_cookies(app: Flask, users: dict, db: Database,
                                                                       production_model: int) -> None:
    browser = session_client(app, "uploader")
    laptop = session_client(app, "uploader")  # a second sign-in elsewhere
    thief = copy_of(app, browser)
    page = thief.get("/").get_data(as_text=True)
    assert "uploader" in page
    scraped = csrf_token(page)

    logout = browser.post("/logout", data={"csrf_token": csrf_token(browser.get("/").get_data(as_text=True))})
    assert logout.status_code == 303

    assert not signed_in(browser) and not signed_in(laptop) and not signed_in(thief)
    assert thief.get("/api/studies").status_code == 401
    assert thief.get("/studies/1").status_code == 302
    upload = thief.post("/studies", data={"csrf_token": scraped, "name": "stolen", "files": []})
    assert upload.status_code == 302 and upload.headers["Location"].startswith("/login")
    with db.transaction() as session:
        assert session.scalars(select(Study)).first() is None
    # Signing in again works, and only the new session is valid.
    again = session_client(app, "uploader")
    assert signed_in(again) and not signed_in(thief)
    assert token_client(app, users["uploader"]).get("/api/studies").status_code == 200  # tokens are not sessions


def test_changing_the_password_ends_the_other_sessions_and_keeps_this_one(app: Flask, users: dict, db: Database) -> None:
    browser = session_client(app, "reviewer")
    other = session_client(app, "reviewer")
    thief = copy_of(app, browser)

    wrong = post_form(browser, "/account/password", "/account", current_password="not it",
                      new_password=NEW_PASSWORD, confirm_password=NEW_PASSWORD)
    assert wrong.status_code == 400 and b"current password is wrong" in wrong.data
    differ = post_form(browser, "/account/password", "/account", current_password=PASSWORD,
                       new_password=NEW_PASSWORD, confirm_password=NEW_PASSWORD + "x")
    assert differ.status_code == 400 and b"differ" in differ.data
    short = post_form(browser, "/account/password", "/account", current_password=PASSWORD,
                      new_password="short", confirm_password="short")
    assert short.status_code == 400 and b"at least 10 characters" in short.data
    assert signed_in(other) and signed_in(thief)  # failed attempts change nothing

    changed = post_form(browser, "/account/password", "/account", current_password=PASSWORD,
                        new_password=NEW_PASSWORD, confirm_password=NEW_PASSWORD)
    assert changed.status_code == 303
    assert signed_in(browser)
    assert not signed_in(other) and not signed_in(thief)
    old = app.test_client()
    page = old.get("/login").get_data(as_text=True)
    assert old.post("/login", data={"csrf_token": csrf_token(page), "username": "reviewer",
                                    "password": PASSWORD}).status_code == 401
    assert signed_in(login(app.test_client(), "reviewer", NEW_PASSWORD))
    (event,) = audit_actions(db, "password_change")
    assert (event.username, event.object_id) == ("reviewer", "reviewer")


def test_disabling_a_user_ends_their_sessions_and_tokens_until_enabled(app: Flask, users: dict, db: Database) -> None:
    victim = session_client(app, "uploader")
    thief = copy_of(app, victim)
    admin = session_client(app, "admin")
    uploader_id = user_id(db, "uploader")

    assert post_form(admin, f"/admin/users/{uploader_id}/disable", "/admin/users").status_code == 303
    assert not signed_in(victim) and not signed_in(thief)
    assert token_client(app, users["uploader"]).get("/api/studies").status_code == 401
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    assert client.post("/login", data={"csrf_token": csrf_token(page), "username": "uploader",
                                       "password": PASSWORD}).status_code == 401
    assert "disabled" in admin.get("/admin/users").get_data(as_text=True)

    assert post_form(admin, f"/admin/users/{uploader_id}/enable", "/admin/users").status_code == 303
    assert not signed_in(victim) and not signed_in(thief)  # the old sessions stay ended
    assert token_client(app, users["uploader"]).get("/api/studies").status_code == 200
    assert signed_in(session_client(app, "uploader"))
    assert [e.object_id for e in audit_actions(db, "user_disable")] == ["uploader"]
    assert [e.object_id for e in audit_actions(db, "user_enable")] == ["uploader"]


def test_an_admin_cannot_disable_themselves_or_the_last_admin(app: Flask, users: dict, db: Database) -> None:
    admin = session_client(app, "admin")
    refused = post_form(admin, f"/admin/users/{user_id(db, 'admin')}/disable", "/admin/users")
    assert refused.status_code == 409 and b"your own account" in refused.data
    assert signed_in(admin)


def test_an_admin_resets_a_password_and_that_user_is_signed_out(app: Flask, users: dict, db: Database) -> None:
    victim = session_client(app, "reviewer")
    admin = session_client(app, "admin")
    reviewer_id = user_id(db, "reviewer")
    short = post_form(admin, f"/admin/users/{reviewer_id}/password", "/admin/users", password="short")
    assert short.status_code == 400 and signed_in(victim)
    assert post_form(admin, f"/admin/users/{reviewer_id}/password", "/admin/users", password=NEW_PASSWORD).status_code == 303
    assert not signed_in(victim)
    assert signed_in(login(app.test_client(), "reviewer", NEW_PASSWORD))
    assert signed_in(admin)  # other users' sessions are untouched
    (event,) = audit_actions(db, "password_reset")
    assert (event.username, event.object_id) == ("admin", "reviewer")


# --- 2. admin pages and own tokens -----------------------------------------------------------------------------


def test_admin_creates_a_user_who_can_then_sign_in(app: Flask, users: dict, db: Database) -> None:
    admin = session_client(app, "admin")
    created = post_form(admin, "/admin/users", "/admin/users", username="carol", role="reviewer", password=NEW_PASSWORD)
    assert created.status_code == 303
    assert 'data-user="carol"' in admin.get("/admin/users").get_data(as_text=True)
    assert signed_in(login(app.test_client(), "carol", NEW_PASSWORD))
    again = post_form(admin, "/admin/users", "/admin/users", username="carol", role="reviewer", password=NEW_PASSWORD)
    assert again.status_code == 400 and b"already exists" in again.data
    bad_role = post_form(admin, "/admin/users", "/admin/users", username="dave", role="root", password=NEW_PASSWORD)
    assert bad_role.status_code == 400 and b"role must be one of" in bad_role.data
    (event,) = audit_actions(db, "user_create")
    assert (event.username, event.object_id, event.detail) == ("admin", "carol", '{"group": null, "role": "reviewer"}')


def test_admin_issues_lists_and_revokes_tokens(app: Flask, users: dict, db: Database) -> None:
    admin = session_client(app, "admin")
    uploader_id = user_id(db, "uploader")
    issued = post_form(admin, f"/admin/users/{uploader_id}/tokens", "/admin/users", label="PACS script")
    assert issued.status_code == 201
    token = re.search(r'<code class="token">(trg_[^<]+)</code>', issued.get_data(as_text=True)).group(1)  # type: ignore[union-attr]
    assert token not in admin.get("/admin/users").get_data(as_text=True)  # shown once
    assert token_client(app, token).get("/api/studies").status_code == 200

    listing = admin.get(f"/admin/tokens?user={uploader_id}").get_data(as_text=True)
    assert "PACS script" in listing and token not in listing
    with db.transaction() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.name == "PACS script")).one()
        token_id = row.id
    assert post_form(admin, f"/admin/tokens/{token_id}/revoke", "/admin/tokens").status_code == 303
    assert token_client(app, token).get("/api/studies").status_code == 401
    assert "revoked" in admin.get("/admin/tokens").get_data(as_text=True)
    assert admin.post("/admin/tokens/999/revoke", data={"csrf_token": csrf_token(admin.get("/admin/tokens").get_data(as_text=True))}).status_code == 404
    assert audit_actions(db, "token")[0].detail == '{"for": "uploader", "label": "PACS script", "via": "portal"}'
    (revoked,) = audit_actions(db, "token_revoke")
    assert (revoked.username, revoked.object_id) == ("admin", str(token_id))


def test_only_admins_reach_the_admin_pages(app: Flask, users: dict, db: Database) -> None:
    for role in ("uploader", "reviewer"):
        client = token_client(app, users[role])
        assert client.get("/admin/users").status_code == 403
        assert client.get("/admin/tokens").status_code == 403
        assert client.post(f"/admin/users/{user_id(db, 'admin')}/disable").status_code == 403
        assert client.post("/admin/users", data={"username": "x", "role": "admin", "password": NEW_PASSWORD}).status_code == 403
    assert 'href="/admin/users"' in session_client(app, "admin").get("/").get_data(as_text=True)
    assert 'href="/admin/users"' not in session_client(app, "reviewer").get("/").get_data(as_text=True)


def test_a_user_sees_and_revokes_only_their_own_tokens(app: Flask, users: dict, db: Database) -> None:
    browser = session_client(app, "reviewer")
    page = browser.get("/account").get_data(as_text=True)
    assert "tests" in page and "Change password" in page
    with db.transaction() as session:
        tokens = {row.user.username: row.id for row in session.scalars(select(ApiToken))}
    assert f'data-token="{tokens["admin"]}"' not in page
    foreign = post_form(browser, f"/account/tokens/{tokens['admin']}/revoke", "/account")
    assert foreign.status_code == 404
    assert token_client(app, users["admin"]).get("/api/studies").status_code == 200
    assert post_form(browser, f"/account/tokens/{tokens['reviewer']}/revoke", "/account").status_code == 303
    assert token_client(app, users["reviewer"]).get("/api/studies").status_code == 401
    assert "revoked" in browser.get("/account").get_data(as_text=True)
    (event,) = audit_actions(db, "token_revoke")
    assert (event.username, event.object_id) == ("reviewer", str(tokens["reviewer"]))


# --- 3. redirects after sign-in --------------------------------------------------------------------------------

EVIL_NEXT = [
    "/%09/evil.example", "/%0A/evil.com", "/%0D%0A/evil.com", "%09//evil.example", "//evil.example",
    "/%5Cevil.example", "%5C%5Cevil.example", "https://evil.example/", "javascript:alert(1)",
    "/%E2%80%8B/evil.example", "%20//evil.example", "/%C2%85/evil.example",
]


@pytest.mark.parametrize("target", EVIL_NEXT)
def test_login_never_redirects_off_site(app: Flask, users: dict, db: Database, target: str) -> None:
    client = app.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post(f"/login?next={target}", data={"csrf_token": token, "username": "admin", "password": PASSWORD})
    assert response.status_code == 303 and response.headers["Location"] == "/"
    signed = client.get(f"/login?next={target}")  # signed in: GET /login redirects at once
    assert signed.status_code == 302 and signed.headers["Location"] == "/"
    assert len(audit_actions(db, "login")) == 1


def test_login_returns_to_the_page_asked_for(app: Flask, users: dict) -> None:
    client = app.test_client()
    sent = client.get("/review?order=suspicious")
    assert sent.status_code == 302
    login_url = sent.headers["Location"]
    token = csrf_token(client.get(login_url).get_data(as_text=True))
    response = client.post(login_url, data={"csrf_token": token, "username": "admin", "password": PASSWORD})
    assert response.status_code == 303 and response.headers["Location"] == "/review?order=suspicious"


# --- 5. rate limit per account and per address; trusted proxies -------------------------------------------------


def _attempt(client: FlaskClient, username: str, password: str, **headers: str):  # type: ignore[no-untyped-def]
    token = csrf_token(client.get("/login", headers=headers).get_data(as_text=True))
    return client.post("/login", data={"csrf_token": token, "username": username, "password": password}, headers=headers)


def test_one_users_failures_do_not_lock_out_others_at_the_same_address(app: Flask, users: dict, settings: Settings) -> None:
    client = app.test_client()
    for _ in range(settings.login_max_failures):
        assert _attempt(client, "uploader", "wrong password").status_code == 401
    assert _attempt(client, "uploader", PASSWORD).status_code == 429  # that account waits
    assert _attempt(app.test_client(), "reviewer", PASSWORD).status_code == 303  # a colleague does not


@pytest.fixture
def proxied_app(settings: Settings, db: Database) -> Flask:
    """A portal behind one trusted reverse proxy, with a per-address limit of 3 failures."""
    app = create_app(settings.model_copy(update={"trusted_proxies": 1, "login_max_address_failures": 3}))
    app.config["TESTING"] = True
    yield app  # type: ignore[misc]
    app.extensions["triage_db"].dispose()


def test_behind_a_trusted_proxy_the_forwarded_address_is_limited_and_audited(proxied_app: Flask, users: dict,
                                                                            db: Database) -> None:
    client = proxied_app.test_client()
    guesser = {"X-Forwarded-For": "203.0.113.7"}
    for name in ("nobody", "someone", "admin"):
        assert _attempt(client, name, "wrong password", **guesser).status_code == 401
    assert _attempt(client, "reviewer", PASSWORD, **guesser).status_code == 429  # that address waits
    assert _attempt(client, "reviewer", PASSWORD, **{"X-Forwarded-For": "198.51.100.2"}).status_code == 303
    failures = audit_actions(db, "login_failed")
    assert {e.ip for e in failures} == {"203.0.113.7"}
    assert failures[-1].detail == '{"limit": "address", "reason": "rate limited"}'
    assert audit_actions(db, "login")[0].ip == "198.51.100.2"


def test_without_trusted_proxies_forwarded_headers_are_ignored(app: Flask, users: dict, db: Database) -> None:
    assert _attempt(app.test_client(), "admin", "wrong", **{"X-Forwarded-For": "203.0.113.7"}).status_code == 401
    assert [e.ip for e in audit_actions(db, "login_failed")] == ["127.0.0.1"]
