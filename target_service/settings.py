"""Service settings, read from ``TARGET_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from defenses.base import DetectorError, check_setting_names
from defenses.calibration import QUICK_CLIENTS
from defenses.output_policies import parse_policy
from mlcore.wire import echo
from target_service.screening import InputDefenseSpec

MIN_ADMIN_TOKEN_CHARS = 16
DEFAULT_MODELS = ["lenet5-mnist", "c3f2-mnist", "dnn5-mnist"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TARGET_", env_file=None, extra="ignore")

    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the admin API (at least 16 characters); without it the "
        "admin API is off.",
    )
    state_dir: Path = Field(
        default=Path("var"),
        description="SQLite state (unless TARGET_DATABASE_URL is set) and detector snapshots.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="postgresql://user:password@host:port/database: keep the state in "
        "PostgreSQL, shared by replicas; unset = SQLite under the state directory.",
    )
    database_pool_size: int = Field(
        default=10, ge=1, le=200, description="Most PostgreSQL connections per process."
    )
    checkpoint_dir: Path = Field(default=Path("checkpoints"), description="Target checkpoints.")
    data_root: Path | None = Field(default=None, description="Root of full datasets (CIFAR-10...).")
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))
    output_policies: dict[str, str] = Field(
        default_factory=dict,
        description="Per-model output policy, e.g. {'lenet5-mnist': 'top-k:3'}.",
    )
    train_missing: bool = Field(default=True, description="Train a missing checkpoint at start-up.")
    train_epochs: int | None = Field(
        default=None, ge=1, description="Override epochs (quick starts)."
    )
    max_batch: int = Field(default=1000, ge=1, description="Most images in one predict request.")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    body_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a client has to send a whole body, else 408."
    )
    metrics_public: bool = Field(
        default=False, description="Serve /metrics without the admin token."
    )
    rate_limit: float = Field(
        default=0.0, ge=0, description="Requests/s per client; 0 = unlimited."
    )
    rate_burst: int = Field(default=20, ge=1)
    detectors: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict,
        description="Per-model detectors and settings, replacing the default "
        "{'prada': {}, 'mi_redundancy': {}}; {} turns detection off for a model. A threshold "
        "set here overrides the calibrated one.",
    )
    calibration_clients: int = Field(
        default=QUICK_CLIENTS,
        ge=0,
        description="Benign clients per population simulated to calibrate the detectors of a "
        "checkpoint trained at first start or by a training job (0: do not calibrate).",
    )
    alarm_policies: dict[str, Literal["log", "block"]] = Field(
        default_factory=dict,
        description="Per-model alarm policy: 'log' (default) or 'block' (403).",
    )
    input_defenses: dict[str, InputDefenseSpec] = Field(
        default_factory=dict,
        description="Per-model input defence, e.g. {'lenet5-mnist': {'kind': 'kl-sanitized', "
        "'mode': 'framework', 'method': 'self', 'threshold': 0.9999999, 'pass_rate': 0.98}} "
        "(target_service.screening).",
    )
    snapshot_every: int = Field(
        default=1000, ge=1, description="Detector snapshot period (queries)."
    )
    detection_mode: Literal["inline", "worker"] = Field(
        default="inline",
        description="'inline': each request runs the detectors (exact blocking, one process); "
        "'worker': requests only log their queries and `target-service detect` runs the "
        "detectors, so `block` takes effect within the worker's lag.",
    )
    detection_groups: Literal["client", "org", "all"] = Field(
        default="client",
        description="What the detectors watch (worker mode): each client; and also each org's "
        "clients together ('org'), or every client together ('all').",
    )
    detection_lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A detection worker that has not renewed its lease on a stream for this "
        "long loses it to another worker, which resumes from the stream's cursor.",
    )
    torch_threads: int = Field(
        default=1,
        ge=1,
        description="Threads per torch op; requests already run in parallel in the thread pool, "
        "and on a small machine one thread per op is several times faster than two.",
    )

    training_workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Training worker processes, started when the first job is queued; "
        "0 = jobs wait in the queue.",
    )
    training_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A running job whose worker has not renewed its lease for this long is "
        "resumed by another worker from its last epoch checkpoint.",
    )
    training_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often an idle worker looks for queued jobs."
    )
    max_dataset_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Largest dataset upload (npz bytes)."
    )
    max_dataset_unpacked_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=1024, description="Largest npz once unpacked."
    )
    max_dataset_classes: int = Field(default=1000, ge=2)

    @field_validator("admin_token")
    @classmethod
    def _admin_token_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"TARGET_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_CHARS} characters, "
                f"got {len(value.get_secret_value())}"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgresql(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            scheme = value.get_secret_value().partition("://")[0]
            if scheme not in ("postgresql", "postgres"):
                raise ValueError(f"must be a postgresql:// URL, got scheme {echo(scheme)}")
        return value

    @field_validator("output_policies")
    @classmethod
    def _policies_parse(cls, value: dict[str, str]) -> dict[str, str]:
        for spec in value.values():
            parse_policy(spec)
        return value

    @model_validator(mode="after")
    def _defences_fit_the_models(self) -> Settings:
        """Refuse, before any model loads, a detector or alarm policy for a model that is not
        hosted, an unknown detector and an unknown detector setting (values and references are
        checked against the detectors themselves at start-up: ``detection.build_detectors``)."""
        for variable, per_model in (
            ("TARGET_DETECTORS", self.detectors),
            ("TARGET_ALARM_POLICIES", self.alarm_policies),
            ("TARGET_INPUT_DEFENSES", self.input_defenses),
        ):
            for model in per_model:
                if model not in self.models:
                    raise ValueError(
                        f"{variable} names model {model!r}, which is not hosted; hosted "
                        f"(TARGET_MODELS): {self.models}"
                    )
        if self.detection_groups != "client" and self.detection_mode != "worker":
            raise ValueError(
                f"TARGET_DETECTION_GROUPS={self.detection_groups} needs "
                "TARGET_DETECTION_MODE=worker (groups are watched off the request path)"
            )
        if self.detection_groups == "all" and "block" in self.alarm_policies.values():
            raise ValueError(
                "TARGET_DETECTION_GROUPS=all with a 'block' alarm policy would block every "
                "client at the first alarm: use 'log', or groups 'org'"
            )
        for model, detectors in self.detectors.items():
            for name, settings in detectors.items():
                try:
                    check_setting_names(name, settings)
                except DetectorError as exc:
                    raise ValueError(f"TARGET_DETECTORS[{model!r}][{name!r}]: {exc}") from None
        return self

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.sqlite3"


def describe_settings_error(exc: ValidationError) -> str:
    """One line per invalid setting, naming the variable and the value it was given, except for
    secrets (pydantic's own message would print the token)."""
    lines = []
    for error in exc.errors():
        field_name = str(error["loc"][0]) if error["loc"] else ""
        # the variable upper-case, the keys inside it as written (a model name, a setting)
        where = (
            ".".join(["TARGET_" + field_name.upper(), *map(str, error["loc"][1:])])
            if field_name
            else "settings"
        )
        # a model-level error's input is every setting, the token included
        hidden = not field_name or field_name in _SECRET_FIELDS
        shown = "" if hidden else f" (got {echo(error.get('input'))})"
        lines.append(f"{where}: {error['msg']}{shown}")
    return "\n".join(lines)


_SECRET_FIELDS = {"admin_token", "database_url"}
