"""Audit sampling: which unflagged images also go to review, as a random check of the model.

A share ``TRIAGE_AUDIT_RATE`` of the images the model did *not* flag is sent to the review queue as
audit cases. Their reviews measure the error among unflagged images on the site's own patients
(the models page reports it beside the promise made at validation).

The choice is a keyed hash, not a random draw: the same (model version, image) always gets the same
answer, so a redelivered task makes the same choice, and nobody without the secret key can predict
which images are audited. No torch and no database here.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

#: 2**64: the first 8 bytes of the HMAC read as an unsigned integer, divided by this, lie in [0, 1).
_SCALE = float(1 << 64)


def audit_draw(secret_key: str, version_id: int, image_id: int) -> float:
    """A uniform number in [0, 1) fixed by the key, the model version and the image.

    HMAC-SHA256 keyed by ``secret_key`` of ``f"{version_id}:{image_id}"``; its first 8 bytes,
    big-endian, scaled to [0, 1).
    """
    digest = hmac.new(secret_key.encode(), f"{version_id}:{image_id}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def is_audit_sample(secret_key: str, version_id: int, image_id: int, rate: float) -> bool:
    """Whether this image's prediction by this version is an audit sample at ``rate`` (0 to 1).

    Rate 0 audits nothing and rate 1 everything (the draw is always below 1).
    """
    if rate <= 0.0:
        return False
    return audit_draw(secret_key, version_id, image_id) < rate


def audit_ids(secret_key: str, version_id: int, rate: float, outcomes: Iterable[tuple[int, bool]]) -> set[int]:
    """Image ids chosen for audit among ``outcomes`` = ``(image id, flagged)`` pairs.

    Flagged images go to review anyway and are never audit samples.
    """
    return {
        image_id for image_id, flagged in outcomes
        if not flagged and is_audit_sample(secret_key, version_id, image_id, rate)
    }
