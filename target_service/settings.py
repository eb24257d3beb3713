"""Service settings, read from ``TARGET_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from defenses.calibration import QUICK_CLIENTS
from defenses.output_policies import parse_policy

DEFAULT_MODELS = ["lenet5-mnist", "c3f2-mnist", "dnn5-mnist"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TARGET_", env_file=None, extra="ignore")

    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token of the admin API; without it the admin API is off."
    )
    state_dir: Path = Field(default=Path("var"), description="SQLite state lives here.")
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
        "checkpoint trained at first start (0: do not calibrate).",
    )
    alarm_policies: dict[str, Literal["log", "block"]] = Field(
        default_factory=dict,
        description="Per-model alarm policy: 'log' (default) or 'block' (403).",
    )
    snapshot_every: int = Field(
        default=1000, ge=1, description="Detector snapshot period (queries)."
    )
    torch_threads: int = Field(
        default=1,
        ge=1,
        description="Threads per torch op; requests already run in parallel in the thread pool, "
        "and on a small machine one thread per op is several times faster than two.",
    )

    @field_validator("output_policies")
    @classmethod
    def _policies_parse(cls, value: dict[str, str]) -> dict[str, str]:
        for spec in value.values():
            parse_policy(spec)
        return value

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.sqlite3"
