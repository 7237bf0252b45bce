"""Portal fixtures: an app on the migrated test database and the embedded filesystem broker, and accounts.

``client`` is signed in as an admin (session cookie) and also sends the admin's API token, so it may
call both the pages and the JSON API; tests of access control use :func:`session_client`,
:func:`token_client` and ``anon`` instead.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from core import registry
from core.auth import create_user, get_user, issue_token
from core.config import Settings
from core.db import Database
from core.models import Image, ModelVersion
from core.studies import save_predictions
from portal import create_app

PASSWORD = "correct horse battery"
ROLES = ("admin", "reviewer", "uploader")


@pytest.fixture
def app(settings: Settings, db: Database) -> Iterator[Flask]:
    """A portal app on the test settings (database migrated, no model registered yet)."""
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    app.extensions["triage_db"].dispose()


@pytest.fixture
def users(db: Database) -> dict[str, str]:
    """One account per role, named after the role; returns role -> API token."""
    tokens = {}
    with db.transaction() as session:
        for role in ROLES:
            user = create_user(session, role, PASSWORD, role)
            tokens[role] = issue_token(session, user, "tests")[1]
    return tokens


def login(client: FlaskClient, username: str, password: str = PASSWORD) -> FlaskClient:
    """Sign ``client`` in through the login form (with its CSRF token)."""
    page = client.get("/login")
    response = client.post("/login", data={"csrf_token": csrf_token(page.get_data(as_text=True)),
                                           "username": username, "password": password})
    assert response.status_code == 303, response.get_data(as_text=True)[:500]
    return client


def session_client(app: Flask, username: str) -> FlaskClient:
    """A client signed in with a session cookie only."""
    return login(app.test_client(), username)


def token_client(app: Flask, token: str) -> FlaskClient:
    """A client that sends only ``Authorization: Bearer <token>``."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


def admin_token(db: Database) -> str:
    """Create an admin account on ``db`` and return an API token for it."""
    with db.transaction() as session:
        user = get_user(session, "admin") or create_user(session, "admin", PASSWORD, "admin")
        return issue_token(session, user, "tests")[1]


@pytest.fixture
def client(app: Flask, users: dict[str, str]) -> FlaskClient:
    """A test client signed in as the admin (session) that also sends the admin's API token."""
    client = session_client(app, "admin")
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {users['admin']}"
    return client


@pytest.fixture
def anon(app: Flask) -> FlaskClient:
    """A client that is not signed in."""
    return app.test_client()


@pytest.fixture
def demo_model(db: Database, settings: Settings, tiny_weights: dict[str, object]) -> int:
    """Id of a promoted demo model version (3 labels) in the test database."""
    with db.transaction() as session:
        version = registry.register_version(
            session, settings, name="demo model", is_demo=True,
            **{**tiny_weights, "labels": ["comminuted_fracture", "no_fracture", "simple_fracture"]},  # type: ignore[arg-type]
        )
        registry.promote(session, version.id)
        return version.id


@dataclass
class FakeResult:
    """A prediction result as the worker's predictor returns it (the fields save_predictions reads)."""

    probabilities: dict[str, float]
    label: str
    confidence: float
    flagged: bool
    flag_reason: str | None
    flag_kind: str | None = None
    fracture_probability: float | None = None


def predict(db: Database, image_ids: list[int], confidences: list[float]) -> None:
    """Write predictions for ``image_ids`` as the worker would; confidence < threshold is flagged."""
    with db.transaction() as session:
        pairs = []
        for image_id, confidence in zip(image_ids, confidences):
            image = session.get(Image, image_id)
            version: ModelVersion = image.study.model_version
            top, *rest = version.labels
            share = (1.0 - confidence) / len(rest)
            flagged = confidence < version.threshold
            pairs.append(
                (image, FakeResult({top: confidence, **{label: share for label in rest}}, top, confidence, flagged,
                                   "low confidence" if flagged else None))
            )
        save_predictions(session, pairs[0][0].study.model_version_id, pairs)


def broker_messages(settings: Settings) -> list[dict[str, object]]:
    """Task messages waiting in the filesystem broker: headers plus decoded args."""
    messages = []
    for path in sorted((settings.broker_folder / "queue").glob("*.msg")):
        payload = json.loads(path.read_text())
        body = json.loads(base64.b64decode(payload["body"]))
        messages.append({"task": payload["headers"]["task"], "args": body[0], "file": path.name})
    return messages


def csrf_token(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html) or re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert match, "page has no CSRF token"
    return match.group(1)


def files_under(root: Path) -> set[Path]:
    """Every file below ``root``."""
    return {path for path in root.rglob("*") if path.is_file()}
