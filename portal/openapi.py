"""The OpenAPI 3 document of the JSON API (served at /api/openapi.json; a schemathesis test keeps it true)."""

from __future__ import annotations

import functools
import re
from typing import Any

MAX_ID = 2**31 - 1


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "Not signed in / bad token", 403: "Role not allowed", 404: "Not found",
            409: "Conflict", 413: "Upload too large", 503: "Broker unavailable"}
    return {str(code): _json(_ref("Error"), text[code]) for code in codes}


def _id_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}}


STRING, NUMBER, INTEGER, BOOLEAN = ({"type": t} for t in ("string", "number", "integer", "boolean"))

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": STRING}},
    "ModelSummary": {
        "type": "object", "required": ["id", "name", "display_name", "is_demo", "is_production"],
        "properties": {"id": INTEGER, "name": STRING, "display_name": STRING, "is_demo": BOOLEAN, "is_production": BOOLEAN},
    },
    "Model": {
        "allOf": [_ref("ModelSummary"), {
            "type": "object",
            "required": ["architecture", "labels", "threshold", "temperature", "metrics", "weights_sha256", "created_at"],
            "properties": {
                "architecture": STRING, "labels": {"type": "array", "items": STRING}, "threshold": NUMBER,
                "temperature": NUMBER, "metrics": {"type": "object"}, "weights_sha256": STRING,
                "created_at": STRING, "promoted_at": _nullable(STRING),
            },
        }],
    },
    "Counts": {
        "type": "object", "required": ["queued", "processing", "done", "failed", "total", "flagged"],
        "properties": {k: {"type": "integer", "minimum": 0} for k in ("queued", "processing", "done", "failed", "total", "flagged")},
    },
    "Study": {
        "type": "object",
        "required": ["id", "name", "status", "created_at", "model_version", "counts", "suspected_fractures", "status_url",
                     "results_url", "page_url"],
        "properties": {
            "id": INTEGER, "name": STRING, "status": {"type": "string", "enum": ["receiving", "queued", "processing", "done"]},
            "created_at": STRING, "finished_at": _nullable(STRING), "rerun_of_id": _nullable(INTEGER),
            "model_version": _ref("ModelSummary"), "counts": _ref("Counts"),
            "suspected_fractures": _nullable({
                "type": "integer", "minimum": 0,
                "description": "Predictions by the study's model version not labelled no_fracture; null when its "
                               "labels have no no_fracture"}),
            "status_url": STRING, "results_url": STRING, "page_url": STRING,
            "study_instance_uid": _nullable(STRING), "modality": _nullable(STRING), "body_part": _nullable(STRING),
            "study_date": _nullable({"type": "string", "format": "date"}),
            "sr_url": _nullable({"type": "string", "description": "DICOM Structured Report download (DICOM studies)"}),
        },
    },
    "Probabilities": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}},
    "ImageResult": {
        "type": "object", "required": ["id", "filename", "status"],
        "properties": {
            "id": INTEGER, "filename": STRING, "status": {"type": "string", "enum": ["queued", "processing", "done", "failed"]},
            "error": _nullable(STRING), "sha256": _nullable(STRING), "width": _nullable(INTEGER), "height": _nullable(INTEGER),
            "label": _nullable(STRING), "confidence": _nullable(NUMBER), "probabilities": _nullable(_ref("Probabilities")),
            "flagged": _nullable(BOOLEAN), "flag_reason": _nullable(STRING), "model_version_id": _nullable(INTEGER),
            "review": _nullable({"type": "object", "properties": {"label": STRING, "reviewer": STRING, "created_at": STRING}}),
            "file_url": _nullable(STRING), "preview_url": _nullable(STRING),
            "sop_instance_uid": _nullable(STRING), "sop_class_uid": _nullable(STRING),
            "series_instance_uid": _nullable(STRING), "study_instance_uid": _nullable(STRING),
            "modality": _nullable(STRING), "body_part": _nullable(STRING),
        },
    },
    "StudyResults": {"allOf": [_ref("Study"), {"type": "object", "required": ["images"],
                                               "properties": {"images": {"type": "array", "items": _ref("ImageResult")}}}]},
    "StudyInUpload": {"allOf": [_ref("Study"), {
        "type": "object", "required": ["tasks", "files"],
        "properties": {"tasks": INTEGER, "files": {"type": "array", "items": {
            "type": "object", "required": ["id", "filename", "status"],
            "properties": {"id": INTEGER, "filename": STRING, "status": STRING, "error": _nullable(STRING)}}}},
    }]},
    "CreatedStudy": {
        "description": "The first study of the upload, plus `studies`: every study created (DICOM files are grouped "
                       "by StudyInstanceUID; other files make one study).",
        "allOf": [_ref("StudyInUpload"), {
            "type": "object", "required": ["studies"],
            "properties": {"studies": {"type": "array", "minItems": 1, "items": _ref("StudyInUpload")}},
        }],
    },
    "Case": {
        "type": "object",
        "required": ["image_id", "study_id", "filename", "label", "confidence", "probabilities", "labels", "waiting_seconds",
                     "reason", "audit", "fracture_probability"],
        "properties": {
            "image_id": INTEGER, "study_id": INTEGER, "study_name": STRING, "filename": STRING, "label": STRING,
            "confidence": NUMBER, "probabilities": _ref("Probabilities"), "flag_reason": _nullable(STRING),
            "reason": {"type": "string", "enum": ["unsure", "unfamiliar", "audit"],
                       "description": "Why the case waits: model unsure, unfamiliar image, or a random audit of an unflagged image"},
            "reason_text": STRING, "audit": BOOLEAN,
            "fracture_probability": _nullable({"type": "number", "minimum": 0, "maximum": 1,
                                               "description": "1 - p(no_fracture); null when the labels have no no_fracture"}),
            "labels": {"type": "array", "items": STRING}, "model_version_id": INTEGER, "flagged_at": _nullable(STRING),
            "file_url": STRING, "preview_url": _nullable(STRING), "review_url": STRING, "waiting_seconds": NUMBER, "waiting": STRING,
        },
    },
    "ReviewRequest": {
        "type": "object", "required": ["label"],
        "properties": {"label": {"type": "string", "description": "one of the model version's labels"},
                       "note": _nullable({"type": "string", "maxLength": 2000})},
    },
    "Review": {
        "type": "object", "required": ["id", "image_id", "label", "reviewer", "created_at"],
        "properties": {"id": INTEGER, "image_id": INTEGER, "label": STRING, "reviewer": STRING,
                       "note": _nullable(STRING), "created_at": STRING},
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI 3.0 document (plain data).

    Every operation may answer 400: a query parameter it does not list, or one given twice, is
    refused rather than ignored (see :func:`query_parameters`).
    """
    body = _operations_document()
    for operations in body["paths"].values():
        for operation in operations.values():
            operation["responses"].setdefault("400", _json(_ref("Error"), "Bad request"))
    return body


@functools.cache
def _query_parameters() -> dict[tuple[str, str], frozenset[str]]:
    return {
        (path, method.upper()): frozenset(p["name"] for p in operation.get("parameters", []) if p["in"] == "query")
        for path, operations in _operations_document()["paths"].items()
        for method, operation in operations.items()
    }


def query_parameters(rule: str, method: str) -> frozenset[str] | None:
    """The query parameters the document lists for an operation, or ``None`` when it does not describe it.

    Args:
        rule: the Flask URL rule (``/api/studies/<int:study_id>/export``) or the document's path.
        method: the HTTP method (``HEAD`` counts as ``GET``).
    """
    path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule)
    return _query_parameters().get((path, "GET" if method.upper() == "HEAD" else method.upper()))


def _operations_document() -> dict[str, Any]:
    """The document as written by hand, before :func:`document` adds what every operation shares."""
    study_id, image_id = _id_param("study_id"), _id_param("image_id")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Bone X-ray triage API", "version": "1",
            "description": "Create studies, follow them, read results, review flagged cases, export. "
                           "Authenticate with `Authorization: Bearer <token>` (`triage user token NAME`).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
        "paths": {
            "/api/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "The OpenAPI document"), **_errors(401)},
            }},
            "/api/studies": {
                "get": {
                    "operationId": "listStudies", "summary": "The newest studies with status and counts",
                    "responses": {"200": _json({"type": "object", "required": ["studies"], "properties": {
                        "studies": {"type": "array", "items": _ref("Study")}}}, "Studies, newest first"), **_errors(401, 403)},
                },
                "post": {
                    "operationId": "createStudy", "summary": "Create a study from files and/or a zip; its images are queued",
                    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                        "type": "object", "properties": {
                            "name": {"type": "string", "maxLength": 200},
                            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "archive": {"type": "string", "format": "binary"},
                        }}}}},
                    "responses": {"201": _json(_ref("CreatedStudy"), "Created; refused files are listed with a reason"),
                                  **_errors(400, 401, 403, 409, 413, 503)},
                },
            },
            "/api/studies/{study_id}": {"get": {
                "operationId": "studyStatus", "summary": "A study's status and counts", "parameters": [study_id],
                "responses": {"200": _json(_ref("Study"), "The study"), **_errors(401, 403, 404)},
            }},
            "/api/studies/{study_id}/results": {"get": {
                "operationId": "studyResults", "summary": "Every image with its status, error or prediction",
                "parameters": [study_id],
                "responses": {"200": _json(_ref("StudyResults"), "Results"), **_errors(401, 403, 404)},
            }},
            "/api/studies/{study_id}/export": {"get": {
                "operationId": "exportStudy", "summary": "Download results as JSON or CSV",
                "parameters": [study_id, {"name": "format", "in": "query", "required": False,
                                          "schema": {"type": "string", "enum": ["json", "csv"], "default": "json"}}],
                "responses": {"200": {"description": "The export", "content": {
                    "application/json": {"schema": {"type": "object", "required": ["study", "images"]}},
                    "text/csv": {"schema": {"type": "string"}}}}, **_errors(400, 401, 403, 404)},
            }},
            "/api/studies/{study_id}/sr.dcm": {"get": {
                "operationId": "studyReport",
                "summary": "Download the study's results as a DICOM Structured Report (Comprehensive SR; for review, not a diagnosis)",
                "parameters": [study_id],
                "responses": {"200": {"description": "The report (DICOM Part 10 file)", "content": {
                    "application/dicom": {"schema": {"type": "string", "format": "binary"}}}},
                    **_errors(401, 403, 404, 409)},
            }},
            "/api/review-queue": {"get": {
                "operationId": "reviewQueue",
                "summary": "Unreviewed cases: flagged images and audit samples, oldest or most suspicious first",
                "parameters": [
                    {"name": "study", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID}},
                    {"name": "reason", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 200},
                     "description": "unsure, unfamiliar, audit, or a flag-reason category"},
                    {"name": "order", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": ["oldest", "newest", "suspicious", "least_suspicious", "label",
                                                           "reason", "study"], "default": "oldest"},
                     "description": "oldest (longest waiting) first; newest first; suspicious: highest fracture probability "
                                    "first (none last), then oldest; least_suspicious; label (the model's, then most "
                                    "suspicious); reason (unsure, unfamiliar, audit); study"},
                ],
                "responses": {"200": _json({"type": "object", "required": ["count", "cases"], "properties": {
                    "count": INTEGER, "cases": {"type": "array", "items": _ref("Case")}}}, "Waiting cases"),
                    **_errors(400, 401, 403)},
            }},
            "/api/images/{image_id}/review": {"post": {
                "operationId": "recordReview", "summary": "Record the signed-in reviewer's label for an image",
                "parameters": [image_id],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ReviewRequest")}}},
                "responses": {"201": _json(_ref("Review"), "Recorded"), **_errors(400, 401, 403, 404, 409)},
            }},
            "/api/models": {"get": {
                "operationId": "listModels", "summary": "Registered model versions, newest first",
                "responses": {"200": _json({"type": "object", "required": ["models"], "properties": {
                    "models": {"type": "array", "items": _ref("Model")}}}, "Model versions"), **_errors(401, 403)},
            }},
        },
    }
