"""The OpenAPI document is true: schemathesis fuzzes every operation with a valid token and finds no
server error and no response that breaks the document."""

from __future__ import annotations

import io
from pathlib import Path

import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings as hypothesis_settings

from core.db import Database
from tests.conftest import xray_sample
from tests.portal.conftest import predict, token_client


MAX_EXAMPLES = 15  # per operation: enough to find 5xx and schema breaks, bounded in time


def test_api_conforms_to_its_openapi_document(
    app: Flask, users: dict[str, str], db: Database, production_model: int, xrays_dir: Path
) -> None:
    # A study with a flagged case exists, so reads and reviews reach real rows as well as 404s.
    client = token_client(app, users["admin"])
    image = xray_sample(xrays_dir, 1)[0]
    body = client.post("/api/studies", data={"name": "fuzz", "files": [(io.BytesIO(image.read_bytes()), image.name)]},
                       content_type="multipart/form-data").get_json()
    predict(db, [body["files"][0]["id"]], [0.5])
    headers = {"Authorization": f"Bearer {users['admin']}"}
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", app, headers=headers)

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, operations  # every operation of the document (the document itself may be skipped)
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                             derandomize=True, database=None)
        def check(case: schemathesis.Case) -> None:
            # Every check except "schema-valid data must be accepted": a label is a free string in the
            # document (each model version has its own labels) and a label the version lacks is a 400.
            case.call_and_validate(headers=headers, excluded_checks=[schemathesis.checks.positive_data_acceptance])

        check()


def test_document_is_served_and_lists_every_api_route(app: Flask, users: dict[str, str]) -> None:
    document = token_client(app, users["reviewer"]).get("/api/openapi.json").get_json()
    assert document["openapi"].startswith("3.") and document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    documented = {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = rule.rule.replace("<int:", "{").replace(">", "}")
            served |= {(path, m) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented
