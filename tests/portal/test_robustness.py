"""No request makes the portal answer 5xx: a sweep generated from app.url_map sends huge, negative,
non-numeric, NUL and deeply nested values to every route and method; 413s say which limit was hit."""

from __future__ import annotations

import inspect
import io
import re
import sys
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image as PILImage

from core.auth import create_user, issue_token
from core.db import Database
from tests.portal.conftest import PASSWORD, csrf_token, predict, session_client, token_client

HUGE = "9" * 20
NESTED_JSON = "[" * 50_000 + "]" * 50_000
NESTED = "[" * 1000 + "]" * 1000
#: Values sent in the query string and form fields, one parameter at a time ...
EACH_VALUES = (HUGE, "abc", "\x00")
#: ... and these to every parameter of the route at once.
ALL_VALUES = (HUGE, "-" + HUGE, "-1", "0", "abc", "1e400", NESTED, "é\u202e\x7f")
#: JSON bodies: every parameter set to one of these, then raw documents.
JSON_VALUES = (HUGE, -int(HUGE), "abc", [[[[]]]], None)
#: Values of path parts, by URL converter.
PATH_VALUES = {
    "int": ("1", str(2**31 - 1), "0", HUGE, "-1", "abc"),
    "default": ("x", "csv", "a" * 300, "%00", "%0A"),
}
PUBLIC = {"auth.login", "health.healthz", "health.readyz", "static"}
_ARGUMENT = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")
_READS = re.compile(r"""(?:args|form|values|payload|files)\.get(?:list)?\(\s*["'](\w+)["']|int_param\(\s*["'](\w+)["']"""
                    r"""|(\w+) = \w+Field\(""")


def parameter_names(app: Flask, endpoint: str) -> list[str]:
    """Every request parameter the module of ``endpoint``'s view reads (found in its source, forms included)."""
    module = sys.modules[app.view_functions[endpoint].__module__]
    return sorted({a or b or c for a, b, c in _READS.findall(inspect.getsource(module))})


def urls(rule_text: str) -> Iterator[str]:
    """The rule with ordinary values, then with each path part in turn given each bad value."""
    arguments = _ARGUMENT.findall(rule_text)
    first = {name: PATH_VALUES.get(converter or "default", PATH_VALUES["default"])[0] for converter, name in arguments}

    def build(values: dict[str, str]) -> str:
        return _ARGUMENT.sub(lambda m: values[m.group(2)], rule_text)

    yield build(first)
    for converter, name in arguments:
        for value in PATH_VALUES.get(converter or "default", PATH_VALUES["default"])[1:]:
            yield build({**first, name: value})


@pytest.fixture
def sweeper(app: Flask, users: dict, db: Database, production_model: int) -> FlaskClient:
    """An admin API client (a separate account, so the sweep cannot disable or revoke it), with data to hit:
    a study with a classified, flagged image."""
    with db.transaction() as session:
        token = issue_token(session, create_user(session, "sweeper", PASSWORD, "admin"), "sweep")[1]
    client = token_client(app, token)
    picture = io.BytesIO()
    PILImage.linear_gradient("L").resize((128, 128)).save(picture, format="PNG")
    body = client.post("/api/studies", data={"name": "sweep", "files": [(io.BytesIO(picture.getvalue()), "a.png")]},
                       content_type="multipart/form-data").get_json()
    predict(db, [body["files"][0]["id"]], [0.5])
    return client


def test_no_route_answers_5xx_to_bad_parameters(app: Flask, sweeper: FlaskClient, db: Database) -> None:
    anon = app.test_client()
    failures: list[tuple[str, str, str, int]] = []
    sent = 0

    def send(client: FlaskClient, method: str, url: str, what: str, **kwargs: object) -> None:
        nonlocal sent
        response = client.open(url, method=method, **kwargs)
        sent += 1
        if response.status_code >= 500 or b"Traceback" in response.data:
            failures.append((method, url[:120], what, response.status_code))

    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        names = parameter_names(app, rule.endpoint)
        clients = [sweeper, anon] if rule.endpoint in PUBLIC else [sweeper]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            for client in clients:
                base = None
                for url in urls(rule.rule):
                    base = base or url
                    send(client, method, url, "path")
                requests = [({name: value}, f"{name}={value[:20]!r}") for value in EACH_VALUES for name in names]
                requests += [({name: value for name in names}, f"all={value[:20]!r}") for value in ALL_VALUES if names]
                for values, what in requests:
                    if method == "GET":
                        send(client, method, base, "query " + what, query_string=values)
                    else:
                        send(client, method, base, "form " + what, query_string=values, data=values)
                if method != "GET":
                    for value in JSON_VALUES:
                        send(client, method, base, f"json {value!r}", json={name: value for name in names or ["label"]})
                    send(client, method, base, "nested json", data=NESTED_JSON, content_type="application/json")
                    send(client, method, base, "nested json object", data='{"label": ' + NESTED_JSON + "}",
                         content_type="application/json")
                    send(client, method, base, "json NUL", data='{"label": "a\\u0000", "note": "\\u0000"}',
                         content_type="application/json")
    assert not failures, failures
    assert sent > 1000
    assert sweeper.get("/api/studies").status_code == 200  # the sweep ran signed in to the end


@pytest.mark.parametrize(("method", "url", "data"), [
    ("GET", f"/review?study={HUGE}", None),
    ("GET", f"/review/1?study={HUGE}", None),
    ("GET", f"/admin/audit?page={HUGE}", None),
    ("GET", "/admin/audit?page=-3", None),
    ("GET", "/admin/audit?page=two", None),
    ("GET", "/admin/audit?action=nonsense", None),
    ("POST", "/studies/1/rerun", {"model_version_id": HUGE}),
    ("POST", "/studies/1/rerun", {"model_version_id": "abc"}),
    ("GET", f"/api/review-queue?study={HUGE}", None),
    ("GET", "/api/review-queue?study=abc", None),
])
def test_out_of_range_and_non_numeric_parameters_are_400s(app: Flask, sweeper: FlaskClient, method: str, url: str,
                                                          data: dict | None) -> None:
    response = sweeper.open(url, method=method, data=data)
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert "must be" in response.get_data(as_text=True)


def test_deeply_nested_json_is_a_400(app: Flask, sweeper: FlaskClient) -> None:
    response = sweeper.post("/api/images/1/review", data=NESTED_JSON, content_type="application/json")
    assert response.status_code == 400 and "JSON object" in response.get_json()["error"]


def test_a_nul_character_is_a_400_naming_the_parameter(app: Flask, sweeper: FlaskClient) -> None:
    response = sweeper.get("/api/review-queue", query_string={"reason": "a\x00b"})
    assert response.status_code == 400 and "'reason' contains a NUL character" in response.get_json()["error"]
    assert sweeper.get("/review", query_string={"reason": "a\x00b"}).status_code == 400
    browser = session_client(app, "admin")
    token = csrf_token(browser.get("/review").get_data(as_text=True))
    login_page = app.test_client().post("/login", data={"csrf_token": token, "username": "ad\x00min", "password": PASSWORD})
    assert login_page.status_code == 400


# --- 6. which limit was hit ------------------------------------------------------------------------------------


def test_a_huge_text_field_is_answered_with_the_field_limit_not_the_upload_limit(app: Flask, sweeper: FlaskClient) -> None:
    api = sweeper.post("/api/studies", data={"name": "x" * 1_000_000, "files": [(io.BytesIO(b"x"), "a.png")]},
                       content_type="multipart/form-data")
    assert api.status_code == 413
    message = api.get_json()["error"]
    assert "'name' is too large" in message and "500 KB" in message and "512 MB" not in message

    browser = session_client(app, "admin")
    token = csrf_token(browser.get("/").get_data(as_text=True))
    page = browser.post("/studies", data={"csrf_token": token, "name": "x" * 1_000_000,
                                          "files": [(io.BytesIO(b"x"), "a.png")]}, content_type="multipart/form-data")
    assert page.status_code == 413
    text = page.get_data(as_text=True)
    assert "is too large" in text and "512 MB" not in text


def test_too_many_parts_and_too_large_json_say_so(app: Flask, sweeper: FlaskClient) -> None:
    app.config["MAX_FORM_PARTS"] = 3
    parts = sweeper.post("/api/studies", data={"name": "x", "files": [(io.BytesIO(b"x"), f"{i}.png") for i in range(5)]},
                         content_type="multipart/form-data")
    assert parts.status_code == 413 and "Too many parts" in parts.get_json()["error"]
    big = sweeper.post("/api/images/1/review", data='{"label": "' + "x" * 2_000_000 + '"}', content_type="application/json")
    assert big.status_code == 413 and "JSON body too large" in big.get_json()["error"]

