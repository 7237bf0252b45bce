"""SQLAlchemy 2.0 tables: studies, images, predictions, reviews, model versions, users, tokens, audit."""

from __future__ import annotations

import enum
from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so migrations name constraints stably."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ImageStatus(str, enum.Enum):
    """Life cycle of one uploaded image."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class StudyStatus(str, enum.Enum):
    """Life cycle of a study batch: receiving while its upload is being recorded (its first chunks may
    already be classified), queued until a worker starts, done when every image ended."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class Group(Base):
    """A radiology site: its users see only its studies (admins see every group's)."""

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class User(Base):
    """A person using the portal (roles: uploader, reviewer, admin), in at most one group."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="uploader")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Stored in each session at sign-in; raising it (logout, password change, disabling) ends every
    #: session of the user, including copies of the cookie.
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The user's site; None: the default group (users and studies without a group).
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id"), index=True)

    group: Mapped[Group | None] = relationship()
    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", order_by="ApiToken.id")


class ApiToken(Base):
    """An API token for scripted access (``Authorization: Bearer …``); only its sha256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(120), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship(back_populates="tokens")


class AuditEvent(Base):
    """Who did what to which object, when and from where (upload, view, review, export, promote, login)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_action_created_at", "action", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    username: Mapped[str] = mapped_column(String(80), default="")
    action: Mapped[str] = mapped_column(String(32))
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)


class ModelVersion(Base):
    """A registered model: weights (by sha256) plus everything needed to serve them."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    architecture: Mapped[str] = mapped_column(String(200))
    labels: Mapped[list[str]] = mapped_column(JSON)
    preprocessing: Mapped[dict[str, Any]] = mapped_column(JSON)
    threshold: Mapped[float] = mapped_column(Float)
    temperature: Mapped[float] = mapped_column(Float, default=1.0)
    weights_sha256: Mapped[str] = mapped_column(String(64), index=True)
    #: sha256 of the "unfamiliar image" reference (safetensors in the model store), if fitted.
    reference_sha256: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    is_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    is_production: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def display_name(self) -> str:
        """Name shown to people; demo models say so."""
        suffix = " (demo, not for clinical use)" if self.is_demo else ""
        return f"#{self.id} {self.name}{suffix}"


class Study(Base):
    """One uploaded batch of images, classified with one model version."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "study_status"), default=StudyStatus.QUEUED)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    #: The uploader's group at upload (a re-run keeps its original's); None: the default group.
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id"), index=True)
    rerun_of_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # DICOM studies only (an upload is split by StudyInstanceUID); no patient identifiers are kept.
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    modality: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(200))
    study_date: Mapped[date | None] = mapped_column(Date)

    model_version: Mapped[ModelVersion] = relationship()
    images: Mapped[list[Image]] = relationship(back_populates="study", order_by="Image.id")


class Image(Base):
    """One uploaded file of a study; the bytes live in the image store under ``storage_key``."""

    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_study_id_status", "study_id", "status"),
        # The workers' watchdog looks for expired leases and images queued too long.
        Index("ix_images_status_updated_at", "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    storage_key: Mapped[str | None] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[ImageStatus] = mapped_column(_enum(ImageStatus, "image_status"), default=ImageStatus.QUEUED)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The worker process holding the image while it is ``processing`` (``host:pid:nonce``), and until
    #: when: the worker renews the lease while it works; an expired lease means the worker is gone.
    claimed_by: Mapped[str | None] = mapped_column(String(120))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # From the DICOM header when the upload is DICOM: what a reviewer and a PACS need, nothing that
    # identifies the patient. ``patient_key`` is a keyed hash (core.dicom.patient_key) for matching.
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    photometric: Mapped[str | None] = mapped_column(String(16))
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship(back_populates="images")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="image", order_by="Prediction.id")
    reviews: Mapped[list[Review]] = relationship(back_populates="image", order_by="Review.id")


class Prediction(Base):
    """The output of one model version for one image (at most one per pair)."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id", name="uq_predictions_image_version"),
        Index("ix_predictions_model_version_id_created_at", "model_version_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    label: Mapped[str] = mapped_column(String(100))
    confidence: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    flag_reason: Mapped[str | None] = mapped_column(String(200))
    #: Why the image was flagged: ``unsure`` (low confidence) or ``unfamiliar`` (out of distribution).
    flag_kind: Mapped[str | None] = mapped_column(String(16), index=True)
    #: Distance of the image's features from the training radiographs (higher: less familiar).
    unfamiliar_score: Mapped[float | None] = mapped_column(Float)
    #: 1 - p(no_fracture) when the labels include ``no_fracture``; else None.
    fracture_probability: Mapped[float | None] = mapped_column(Float, index=True)
    #: An unflagged image sent to review as a random audit sample (``TRIAGE_AUDIT_RATE``).
    audit: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)
    #: Per-image seconds spent decoding and in the model (the batch's time shared out).
    decode_seconds: Mapped[float | None] = mapped_column(Float)
    model_seconds: Mapped[float | None] = mapped_column(Float)
    heatmap_key: Mapped[str | None] = mapped_column(String(200))
    #: Why a requested heat map could not be made (None: made, pending or never asked for).
    heatmap_error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    image: Mapped[Image] = relationship(back_populates="predictions")
    model_version: Mapped[ModelVersion] = relationship()


class Review(Base):
    """A reviewer's label for an image (the latest one counts)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    reviewer_name: Mapped[str] = mapped_column(String(80))
    label: Mapped[str] = mapped_column(String(100))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    image: Mapped[Image] = relationship(back_populates="reviews")
