"""Model registry: register, list and promote model versions; resolve the production one.

Versions live in the database; their weights live on disk as safetensors, keyed by sha256. This
module does not import torch (the portal uses it); checking that weights fit an architecture is done
by :mod:`core.ml.modelio` before registration.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.config import Settings
from core.models import ModelVersion, utcnow
from core.preprocessing import Preprocessing
from core.files import atomic_target
from core.storage import model_store, sha256_file

class RegistryError(ValueError):
    """Invalid model metadata or an unknown version; the message says which."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to serve a model version, independent of the database session."""

    version_id: int
    architecture: str
    labels: list[str]
    preprocessing: Preprocessing
    threshold: float
    temperature: float
    weights_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: sha256 of the unfamiliar-image reference (``core.ml.unfamiliar``), None when not fitted
    reference_sha256: str | None = None

    @classmethod
    def from_version(cls, version: ModelVersion) -> "ModelSpec":
        """Detach the serving metadata from a database row (its stored preprocessing JSON read back).

        Raises:
            core.preprocessing.PreprocessingError: the row's preprocessing cannot serve.
        """
        return cls(
            version_id=version.id,
            architecture=version.architecture,
            labels=list(version.labels),
            preprocessing=Preprocessing.from_dict(version.preprocessing),
            threshold=float(version.threshold),
            temperature=float(version.temperature),
            weights_sha256=version.weights_sha256,
            extra=dict(version.extra or {}),
            reference_sha256=version.reference_sha256,
        )

    @property
    def cache_key(self) -> tuple[int, str]:
        """Key for per-process caches: a version id never reuses another's weights or reference."""
        return (self.version_id, f"{self.weights_sha256}:{self.reference_sha256 or ''}")


def weights_path(settings: Settings, sha256: str) -> Path:
    """Path of the safetensors file with digest ``sha256``."""
    store = model_store(settings)
    return store.path_for_key(store.key_for(sha256))


def reference_path(settings: Settings, sha256: str) -> Path:
    """Path of the unfamiliar-image reference with digest ``sha256`` (same store as the weights)."""
    return weights_path(settings, sha256)


def _store_file(settings: Settings, source: Path) -> str:
    """Copy a safetensors file into the model store (atomically, once); returns its sha256."""
    digest = sha256_file(source)
    target = weights_path(settings, digest)
    if not target.exists():
        with atomic_target(target) as tmp:
            shutil.copyfile(source, tmp)
    return digest


def validate_metadata(labels: list[str], preprocessing: Preprocessing, threshold: float, temperature: float) -> None:
    """Refuse metadata that cannot serve: the message names the bad field.

    The preprocessing checked its own fields when it was made (:class:`core.preprocessing.Preprocessing`).

    Raises:
        RegistryError: on empty or duplicate labels, a preprocessing that is not a
            :class:`~core.preprocessing.Preprocessing`, a threshold outside [0, 1], or a
            non-positive temperature.
    """
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
        raise RegistryError(f"labels must be two or more distinct non-empty names, got {labels!r}")
    if not isinstance(preprocessing, Preprocessing):
        raise RegistryError(f"preprocessing must be a core.preprocessing.Preprocessing, got {type(preprocessing).__name__}")
    if not (0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise RegistryError(f"threshold must be between 0 and 1, got {threshold}")
    if not (temperature > 0) or math.isinf(temperature):
        raise RegistryError(f"temperature must be positive, got {temperature}")


def register_version(
    session: Session,
    settings: Settings,
    weights_file: Path,
    *,
    name: str,
    architecture: str,
    labels: list[str],
    preprocessing: Preprocessing,
    threshold: float,
    temperature: float = 1.0,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    is_demo: bool = False,
    reference_file: Path | None = None,
) -> ModelVersion:
    """Copy a safetensors weights file (and the unfamiliar-image reference, when given) into the
    store and record a new version (not promoted)."""
    validate_metadata(labels, preprocessing, threshold, temperature)
    weights_file = Path(weights_file)
    for path in (weights_file, reference_file):
        if path is not None and Path(path).suffix != ".safetensors":
            raise RegistryError(f"weights and reference must be .safetensors files, got {Path(path).name}")
    digest = _store_file(settings, weights_file)
    reference_digest = _store_file(settings, Path(reference_file)) if reference_file is not None else None
    version = ModelVersion(
        name=name,
        architecture=architecture,
        labels=list(labels),
        preprocessing=preprocessing.to_dict(),
        threshold=float(threshold),
        temperature=float(temperature),
        weights_sha256=digest,
        reference_sha256=reference_digest,
        metrics=metrics or {},
        extra=extra or {},
        is_demo=is_demo,
    )
    session.add(version)
    session.flush()
    return version


def list_versions(session: Session) -> list[ModelVersion]:
    """All versions, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def get_version(session: Session, version_id: int) -> ModelVersion:
    """One version by id.

    Raises:
        RegistryError: when there is no such version.
    """
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise RegistryError(f"no model version #{version_id}")
    return version


def promote(session: Session, version_id: int) -> ModelVersion:
    """Make ``version_id`` the one production version; new studies use it from now on."""
    version = get_version(session, version_id)
    session.execute(update(ModelVersion).where(ModelVersion.id != version_id).values(is_production=False))
    version.is_production = True
    version.promoted_at = utcnow()
    session.flush()
    return version


def production_version(session: Session) -> ModelVersion | None:
    """The production version, or None when none has been promoted."""
    return session.scalars(select(ModelVersion).where(ModelVersion.is_production.is_(True)).limit(1)).first()
