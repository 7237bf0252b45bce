"""One typed Settings object, read from ``TRIAGE_*`` environment variables.

Every process (portal, worker, trainer, CLI) reads its configuration here and nowhere else. A bad
value stops start-up with an error that names the environment variable.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "TRIAGE_"
#: The secret key of the embedded default: public (it is in this file), so refused anywhere else.
DEFAULT_SECRET_KEY = "dev-only-change-me"


class ConfigError(RuntimeError):
    """A setting is missing or invalid; the message names the environment variable."""


class Settings(BaseModel):
    """All settings of the system. Each field is read from ``TRIAGE_<FIELD NAME>``."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(
        default=Path("var"),
        description="Folder for the embedded database, the serverless broker, images and models.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL. Empty: a SQLite file in the data folder.",
    )
    broker_url: str = Field(
        default="",
        description="Celery broker URL (e.g. redis://host:6379/0). Empty: Kombu's filesystem "
        "transport in the data folder (no server needed).",
    )
    storage_dir: Path | None = Field(
        default=None, description="Content-addressed image store. Empty: DATA_DIR/images."
    )
    models_dir: Path | None = Field(
        default=None, description="Model artifacts by sha256. Empty: DATA_DIR/models."
    )
    secret_key: str = Field(
        default=DEFAULT_SECRET_KEY,
        min_length=8,
        description="Flask secret key (sessions, CSRF); also keys the patient-ID hash and the audit draw. "
        "Set a long random value in production: the default is refused outside the embedded deployment.",
    )
    max_upload_mb: int = Field(default=512, ge=1, le=65536, description="Largest request accepted.")
    max_file_mb: int = Field(default=64, ge=1, le=4096, description="Largest single image accepted.")
    max_image_pixels: int = Field(
        default=60_000_000,
        ge=1_000_000,
        description="Largest image (width x height) accepted; guards against decompression bombs.",
    )
    decode_pixel_budget: int = Field(
        default=60_000_000,
        ge=1_000_000,
        description="Worker: full-resolution pixels (width x height from the headers) being decoded at once "
        "by one worker process's decode threads together; an image larger than this decodes alone.",
    )
    chunk_size: int = Field(
        default=64, ge=1, le=10_000, description="Images per queued task (one task = one chunk)."
    )
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the worker runs the model: auto picks CUDA when present."
    )
    worker_concurrency: int = Field(
        default=1, ge=1, le=64, description="Worker processes per `celery worker` (one per GPU)."
    )
    cuda_devices: str = Field(
        default="",
        pattern=r"^([A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*)?$",
        description="Worker: the GPUs its pool children take in turn (child i gets entry i mod n), named as "
        "CUDA_VISIBLE_DEVICES names them (indices or UUIDs), e.g. 0,1,2,3. Empty: the GPUs the worker sees "
        "(its own CUDA_VISIBLE_DEVICES, else every GPU), one per child.",
    )
    decode_threads: int = Field(
        default=0, ge=0, le=256,
        description="Worker: CPU decode threads per worker process. 0: the node's cores (those this process may "
        "run on) shared among the TRIAGE_WORKER_CONCURRENCY processes.",
    )
    gpu_decode: bool = Field(
        default=True,
        description="Worker on CUDA: decode baseline JPEGs in batches on the GPU (nvJPEG) and resize them there; "
        "other files (progressive or CMYK JPEG, PNG, DICOM, corrupt) go to the CPU decoder, one by one.",
    )
    torch_threads: int = Field(
        default=0, ge=0, le=256,
        description="Worker: CPU threads for the forward pass (PyTorch or ONNX Runtime) per worker process. 0: the "
        "node's cores shared among the TRIAGE_WORKER_CONCURRENCY processes."
    )
    fast_jpeg_decode: bool = Field(
        default=False,
        description="Fast JPEG path: decode luminance only (radiographs are grey; colour is dropped) and "
        "let the decoder downscale large radiographs in the DCT domain to about twice the model's input "
        "size (several times faster; probabilities differ slightly from a full decode for large images).",
    )
    runtime: Literal["auto", "torch", "onnx", "onnx-int8", "standin"] = Field(
        default="auto",
        description="Inference runtime: auto (PyTorch on CUDA, ONNX Runtime fp32 on CPU), torch, onnx "
        "(ONNX Runtime fp32), onnx-int8 (statically quantized, CPU), or standin (benchmarks only: "
        "no model, constant output).",
    )
    reconcile_after_s: int = Field(
        default=900,
        ge=10,
        description="The reconciler re-enqueues images queued or processing for longer than this.",
    )
    max_image_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Tries before an image whose processing keeps killing the worker is failed. After a "
        "crash the unfinished images of the chunk are retried one at a time, so only the image that kills "
        "the worker is failed (after at least one try alone, whatever this value).",
    )
    lease_s: int = Field(
        default=60,
        ge=2,
        le=3600,
        description="Seconds a worker's claim on its images lasts without a heartbeat; the worker renews it "
        "every third of this while it works. Every worker re-queues images whose lease ran out (or whose "
        "claiming process on the same host is gone) at start-up and every half of this.",
    )
    test_crash_on_sha256: str = Field(
        default="",
        pattern=r"^([0-9a-f]{64})?$",
        description="Testing only: a worker process that reads the stored image with this sha256 kills "
        "itself (SIGKILL), to test that a poison image is isolated. Leave empty.",
    )
    audit_rate: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Share of unflagged images also sent to review as audit cases, so a site can measure "
        "the error among unflagged images on its own patients.",
    )
    drift_psi: float = Field(
        default=0.2,
        gt=0.0,
        description="Population stability index (a day's confidence or unfamiliar-score distribution "
        "against validation) beyond which the models page warns of drift.",
    )
    visibility_timeout_s: int = Field(
        default=3600,
        ge=1,
        description="Redis broker: seconds before an unacknowledged task is redelivered.",
    )
    broker_poll_interval_s: float = Field(
        default=0.05, gt=0, le=10, description="Serverless broker: seconds between polls."
    )
    secure_cookies: bool = Field(
        default=False,
        description="Always mark the session cookie Secure (set behind an HTTPS proxy that does not "
        "forward the scheme). The cookie is Secure anyway whenever the request itself is HTTPS.",
    )
    login_max_failures: int = Field(
        default=5, ge=1, le=1000,
        description="Failed logins allowed per user name (from any address) within LOGIN_WINDOW_S; then "
        "sign-ins to that account answer 429 until the window has passed.",
    )
    login_max_address_failures: int = Field(
        default=50, ge=1, le=100_000,
        description="Failed logins allowed per client address (any user names) within LOGIN_WINDOW_S; then "
        "sign-ins from that address answer 429. Counted separately from the per-account limit, so one "
        "person's typos do not lock out colleagues behind the same address.",
    )
    login_window_s: int = Field(
        default=300, ge=1, le=86_400, description="Window (seconds) over which failed logins are counted."
    )
    trusted_proxies: int = Field(
        default=0, ge=0, le=10,
        description="Reverse proxies in front of the portal whose X-Forwarded-For and X-Forwarded-Proto "
        "headers are trusted (Werkzeug's ProxyFix hops). The client address they give is used by the login "
        "rate limit and the audit log. 0: use the connection's address and ignore those headers.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        description="Log level of every process: portal, worker, trainer and the `triage` CLI (which logs "
        "WARNING and above when this is not set, so its printed output stays readable).",
    )

    @field_validator("database_url")
    @classmethod
    def _database_url_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "filesystem://", "sqla+", "amqp://", "memory://")):
            raise ValueError("must be a redis://, filesystem://, sqla+… or amqp:// URL")
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        data_dir = self.data_dir.expanduser().resolve()
        self.data_dir = data_dir
        if not self.database_url:
            self.database_url = f"sqlite:///{data_dir / 'triage.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.storage_dir is None:
            self.storage_dir = data_dir / "images"
        if self.models_dir is None:
            self.models_dir = data_dir / "models"
        return self

    @model_validator(mode="after")
    def _refuse_the_public_secret_key_outside_the_embedded_default(self) -> "Settings":
        """The default key is public: with PostgreSQL or a broker server it would key real patient hashes and sessions."""
        if self.secret_key == DEFAULT_SECRET_KEY and not self.is_embedded:
            raise ValueError(
                f"{ENV_PREFIX}SECRET_KEY is the public default {DEFAULT_SECRET_KEY!r}, accepted only on the embedded "
                "default (SQLite and the filesystem broker); with this database or broker set "
                f"{ENV_PREFIX}SECRET_KEY to a long random value, e.g. `openssl rand -hex 32`"
            )
        return self

    @property
    def broker_folder(self) -> Path:
        """Folder used by the serverless (filesystem) broker."""
        return self.data_dir / "broker"

    @property
    def is_embedded(self) -> bool:
        """True when running on the embedded default (SQLite, serverless broker)."""
        return self.database_url.startswith("sqlite") and self.broker_url.startswith("filesystem")


def load_settings(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Read settings from ``environ`` (default: the process environment) plus explicit overrides.

    Raises:
        ConfigError: naming each environment variable whose value is invalid.
    """
    source = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name in Settings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in source:
            values[name] = source[key]
    values.update(overrides)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a rule across settings: its message names the variables (and never echoes values)
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            problems.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']} (got {error.get('input')!r})")
        raise ConfigError("Invalid setting(s): " + "; ".join(problems)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return load_settings()
