"""Request parsing that answers 4xx, never 500: bounded integer parameters, safe redirect targets,
JSON too deep to parse, and 413s that say which limit was hit.

Every route reads its numeric parameters through :func:`int_param` (the same bounds as the JSON API
and the ``<int:...>`` URL converter), so a value SQLite or PostgreSQL cannot hold is a 400.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from flask import Request, abort, current_app, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from portal.openapi import MAX_ID

_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")
#: Largest JSON body accepted (the API takes small objects; uploads are multipart).
MAX_JSON_BYTES = 1024 * 1024
#: Largest text field of a form (Flask's MAX_FORM_MEMORY_SIZE); files are limited separately.
MAX_FORM_FIELD_BYTES = 500_000


def int_param(name: str, *, source: MultiDict[str, str] | None = None, minimum: int = 1, maximum: int = MAX_ID,
              default: int | None = None) -> int | None:
    """The integer parameter ``name`` (query string or form), ``default`` when absent or empty.

    A value that is not a whole number, or lies outside ``minimum``..``maximum``, is a 400 that
    names the parameter and the range (never an overflow deep in the database driver).
    """
    raw = (request.values if source is None else source).get(name)
    if raw is None or not raw.strip():
        return default
    raw = raw.strip()
    if not _INTEGER.fullmatch(raw) or not minimum <= int(raw) <= maximum:
        abort(400, f"{name} must be a whole number from {minimum} to {maximum}.")
    return int(raw)


def safe_redirect_target(target: str | None) -> str | None:
    """``target`` when it is a path on this site, else None.

    Refused: anything with a control character, a format character or white space anywhere (browsers
    drop tabs and newlines inside URLs, so ``/\\t/evil.example`` becomes ``//evil.example``, and a
    newline cannot go into a header at all), backslashes (read as ``/`` by browsers), a scheme or a
    host, and paths starting with ``//``.
    """
    if not target or len(target) > 2000:
        return None
    if any(char.isspace() or not char.isprintable() for char in target) or "\\" in target:
        return None
    if not target.startswith("/") or target.startswith("//"):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


def refuse_nul_characters() -> None:
    """Before each request (after sign-in): a NUL character in a query or form value is a 400.

    PostgreSQL cannot store NUL in text, so such a value would otherwise fail deep in a query.
    """
    sources = [("query", request.args)]
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        sources.append(("form", request.form))
    for where, values in sources:
        for key, value in values.items(multi=True):
            if "\x00" in key or "\x00" in value:
                abort(400, f"The {where} parameter {key!r} contains a NUL character.")


class PortalJSONProvider(DefaultJSONProvider):
    """Flask's JSON, where a document nested too deeply to parse, or holding a NUL character, is a 400."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse JSON; too deep a nesting or a NUL character raises ValueError (so ``get_json`` answers 400)."""
        text = s.decode("utf-8", "replace") if isinstance(s, (bytes, bytearray)) else s
        if "\x00" in text or "\\u0000" in text:
            raise ValueError("JSON with a NUL character")
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


class PortalRequest(Request):
    """Flask's request, whose 413s name the limit that was hit (request size, text field, parts, JSON)."""

    def _load_form_data(self) -> None:
        try:
            super()._load_form_data()
        except RequestEntityTooLarge as exc:
            if exc.description != RequestEntityTooLarge.description:
                raise
            message = _form_limit_message(exc)
            if message is None:
                raise  # the request as a whole is over the upload limit: the error handler says so
            raise RequestEntityTooLarge(description=message) from None

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:  # type: ignore[override]
        """Parse the JSON body; a body over :data:`MAX_JSON_BYTES` is a 413 that says so."""
        if self.content_length is not None and self.content_length > MAX_JSON_BYTES and (force or self.is_json):
            raise RequestEntityTooLarge(
                description=f"JSON body too large: the limit is {MAX_JSON_BYTES // 1024} KB per JSON request "
                "(files go in multipart uploads)."
            )
        return super().get_json(force=force, silent=silent, cache=cache)


def _form_limit_message(exc: RequestEntityTooLarge) -> str | None:
    """Which form limit Werkzeug's parser hit, from where it raised (None: the request size limit)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return None
    frame = tb.tb_frame
    module, function = frame.f_globals.get("__name__", ""), frame.f_code.co_name
    field_limit = current_app.config.get("MAX_FORM_MEMORY_SIZE") or MAX_FORM_FIELD_BYTES
    if module == "werkzeug.sansio.multipart" and function == "next_event":
        parts = current_app.config.get("MAX_FORM_PARTS")
        return (f"Too many parts in one request: the limit is {parts:,} files and fields per upload. "
                "Split the batch into smaller uploads.")
    if module in ("werkzeug.formparser", "werkzeug.sansio.multipart"):
        part = frame.f_locals.get("current_part") if function == "parse" else None
        name = getattr(part, "name", None)
        which = f"The form field {name!r} is too large" if name else "A form field is too large"
        return (f"{which}: text fields are limited to {field_limit // 1000:,} KB each. "
                "Files are not text fields; their limits are TRIAGE_MAX_FILE_MB per file and TRIAGE_MAX_UPLOAD_MB per request.")
    return None
