"""Groups (radiology sites): a study belongs to its uploader's group; other groups' users get 404 on
every route that names it, and never see it listed or queued; admins see every group's."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image as PILImage
from sqlalchemy import select

from core.auth import create_user, get_user, issue_token
from core.config import Settings
from core.db import Database
from core.groups import create_group, set_group
from core.models import Group, Prediction, Study
from core.storage import heatmap_store
from tests.conftest import register_tiny_model
from tests.portal.conftest import PASSWORD, csrf_token, predict, session_client, token_client

OWNED = {"study_id", "image_id", "prediction_id"}  # path parts naming a group's data
_ARGUMENT = re.compile(r"<(?:\w+(?:\([^)]*\))?:)?(\w+)>")


@dataclass
class Sites:
    """Two groups' clients (by role) and the ids of group north's study, image and prediction."""

    north: dict[str, FlaskClient]
    south: dict[str, FlaskClient]
    study_id: int
    image_id: int
    prediction_id: int
    other_version: int


def _png() -> bytes:
    buffer = io.BytesIO()
    PILImage.linear_gradient("L").resize((128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def sites(app: Flask, users: dict, db: Database, settings: Settings, production_model: int,
          tiny_weights: dict) -> Sites:
    clients: dict[str, dict[str, FlaskClient]] = {"north": {}, "south": {}}
    with db.transaction() as session:
        for site in clients:
            group = create_group(session, site)
            for role in ("uploader", "reviewer"):
                user = create_user(session, f"{site}-{role}", PASSWORD, role)
                set_group(session, user, group.id)
                clients[site][role] = token_client(app, issue_token(session, user, "tests")[1])
    body = clients["north"]["uploader"].post(
        "/api/studies", data={"name": "north study", "files": [(io.BytesIO(_png()), "north.png")]},
        content_type="multipart/form-data").get_json()
    image_id = body["files"][0]["id"]
    predict(db, [image_id], [0.5])  # flagged: a review case
    with db.transaction() as session:
        prediction = session.scalars(select(Prediction).where(Prediction.image_id == image_id)).one()
        prediction.heatmap_key = heatmap_store(settings).put_bytes(_png())[1]
        prediction_id = prediction.id
    return Sites(clients["north"], clients["south"], body["id"], image_id, prediction_id,
                 register_tiny_model(db, settings, tiny_weights, promote=False))


def test_a_study_belongs_to_its_uploaders_group(sites: Sites, db: Database) -> None:
    with db.transaction() as session:
        north = session.scalars(select(Group).where(Group.name == "north")).one()
        assert session.get(Study, sites.study_id).group_id == north.id
        assert get_user(session, "north-uploader").group_id == north.id


def _url(rule: str, sites: Sites) -> str:
    values = {"study_id": sites.study_id, "image_id": sites.image_id, "prediction_id": sites.prediction_id,
              "fmt": "csv", "version_id": sites.other_version}
    return _ARGUMENT.sub(lambda m: str(values.get(m.group(1), "x")), rule)


def test_every_route_naming_another_groups_data_is_a_404(app: Flask, sites: Sites) -> None:
    body = {"model_version_id": str(sites.other_version + 1000)}  # writes that would change nothing for the owner either
    covered = set()
    owned_rules = [rule for rule in app.url_map.iter_rules() if OWNED & set(rule.arguments)]
    for rule in owned_rules:
        url = _url(rule.rule, sites)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for role in ("uploader", "reviewer"):
                kwargs = {"json": {}} if url.startswith("/api/") and method == "POST" else {"data": body}
                own = sites.north[role].open(url, method=method, **kwargs)
                if own.status_code == 403:  # the role may not use this route at all, whatever the group
                    assert sites.south[role].open(url, method=method, **kwargs).status_code == 403
                    continue
                assert own.status_code != 404, (role, method, url, own.status_code, own.get_data(as_text=True)[:200])
                other = sites.south[role].open(url, method=method, **kwargs)
                assert other.status_code == 404, (role, method, url, other.status_code)
                assert "north" not in other.get_data(as_text=True)
                covered.add((rule.rule, method))
    assert covered == {(r.rule, m) for r in owned_rules for m in r.methods - {"HEAD", "OPTIONS"}}
    assert len(covered) >= 12  # the walk found the study, image, export, report, re-run, review and heat-map routes


def test_other_groups_never_see_the_study_listed_or_queued(app: Flask, sites: Sites, users: dict) -> None:
    def listed(client: FlaskClient) -> bool:
        return any(s["id"] == sites.study_id for s in client.get("/api/studies").get_json()["studies"])

    assert listed(sites.north["uploader"]) and listed(sites.north["reviewer"])
    assert not listed(sites.south["uploader"]) and not listed(sites.south["reviewer"])
    assert not listed(token_client(app, users["uploader"]))  # the default group is a group too
    assert listed(token_client(app, users["admin"]))  # admins see every group's

    assert sites.north["reviewer"].get("/api/review-queue").get_json()["count"] == 1
    assert sites.south["reviewer"].get("/api/review-queue").get_json()["count"] == 0
    assert sites.south["reviewer"].get(f"/api/review-queue?study={sites.study_id}").get_json()["count"] == 0
    assert token_client(app, users["admin"]).get("/api/review-queue").get_json()["count"] == 1

    assert "north study" in sites.north["uploader"].get("/").get_data(as_text=True)
    assert "north study" not in sites.south["uploader"].get("/").get_data(as_text=True)
    assert f"/review/{sites.image_id}" in sites.north["reviewer"].get("/review").get_data(as_text=True)
    assert f"/review/{sites.image_id}" not in sites.south["reviewer"].get("/review").get_data(as_text=True)


def test_a_rerun_stays_in_the_original_group_and_admins_manage_groups(app: Flask, sites: Sites, users: dict,
                                                                      db: Database) -> None:
    admin = session_client(app, "admin")
    page = admin.get("/admin/users").get_data(as_text=True)
    assert 'data-group="' in page and "north" in page
    rerun = admin.post(f"/studies/{sites.study_id}/rerun",
                       data={"csrf_token": csrf_token(page), "model_version_id": str(sites.other_version)})
    assert rerun.status_code == 303
    with db.transaction() as session:
        original, copy = session.get(Study, sites.study_id), session.scalars(select(Study).order_by(Study.id.desc())).first()
        assert copy.rerun_of_id == original.id and copy.group_id == original.group_id

    # The admin moves the default group's uploader into south: from now on it sees south's studies only.
    created = admin.post("/admin/groups", data={"csrf_token": csrf_token(page), "name": "east"})
    assert created.status_code == 303
    with db.transaction() as session:
        east = session.scalars(select(Group).where(Group.name == "east")).one().id
        target = get_user(session, "uploader").id
    moved = admin.post(f"/admin/users/{target}/group", data={"csrf_token": csrf_token(page), "group_id": str(east)})
    assert moved.status_code == 303
    mover = token_client(app, users["uploader"])
    body = mover.post("/api/studies", data={"name": "east study", "files": [(io.BytesIO(_png()), "e.png")]},
                      content_type="multipart/form-data").get_json()
    assert mover.get(f"/api/studies/{body['id']}").status_code == 200
    assert sites.north["uploader"].get(f"/api/studies/{body['id']}").status_code == 404
    assert admin.post(f"/admin/users/{target}/group", data={"csrf_token": csrf_token(page), "group_id": "999"}).status_code == 404
    duplicate = admin.post("/admin/groups", data={"csrf_token": csrf_token(page), "name": "east"})
    assert duplicate.status_code == 400 and b"already exists" in duplicate.data
    actions = token_client(app, users["admin"]).get("/admin/audit").get_data(as_text=True)
    assert "<td>group_create</td>" in actions and "<td>user_group</td>" in actions
