"""One frozen settings object, read from ``METERLINE_*`` environment variables and validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERLINE_", frozen=True, extra="ignore")

    # Where local state lives (embedded ClickHouse files, sink cursors, Stripe mock state).
    data_dir: Path = Field(default=Path(".meterline"))

    # Kafka: None means "start the embedded Tansu broker" (dev/demo/CI only).
    kafka_bootstrap: str | None = None
    topic_prefix: str = "meterline."
    partitions: int = Field(default=4, ge=1, le=1024)
    # "tansu" turns on the dev-broker workarounds of shared/notes/broker.md; "kafka" for real Kafka.
    broker_flavor: Literal["kafka", "tansu"] = "kafka"

    # ClickHouse: chdb:///abs/path (embedded, default) or http(s)://user:pass@host:port/db.
    clickhouse_dsn: str | None = None
    # A ClickHouse cluster (remote_servers name): migrations take their cluster form, Replicated
    # tables + Distributed tables ON CLUSTER (meterline.stack.clickhouse.render_cluster).
    clickhouse_cluster: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")

    # Stripe: a real key, or empty to use the bundled local Stripe-compatible server.
    stripe_api_key: SecretStr | None = None
    stripe_base_url: str | None = None
    stripe_webhook_secret: SecretStr | None = None  # enables POST /v1/stripe/webhook (paid top-ups)
    # `meterline up` runs `meterline stripe sync` every this many seconds (0: never, the default).
    stripe_sync_every_s: float = Field(default=0, ge=0)

    # Alerts: webhook receivers (JSON list in the env var) and the HMAC signing secret.
    alert_webhook_urls: list[str] = Field(default_factory=list)
    alert_webhook_secret: SecretStr | None = None

    # HTTP API.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8787, ge=0, le=65535)

    # Read-only SQL (`meterline sql`, POST /v1/sql): limits the engine enforces per query
    # (meterline.stack.analytics.SqlLimits; docs/security.md). A query over a limit fails, 400.
    sql_max_execution_time_s: int = Field(default=30, ge=1, le=3600)
    sql_max_memory_usage_bytes: int = Field(default=1024**3, ge=16 * 1024**2)
    sql_max_result_rows: int = Field(default=100_000, ge=1)
    sql_max_result_bytes: int = Field(default=64 * 1024**2, ge=1024)

    # Processing.
    dedupe_window_days: int = Field(default=35, ge=1, le=400)
    max_future_skew_seconds: int = Field(default=300, ge=0)
    workers: int = Field(default=1, ge=1, le=16)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_chars(cls, v: str) -> str:
        if not all(c.isalnum() or c in "._-" for c in v):
            raise ValueError("topic_prefix may contain only letters, digits, '.', '_' and '-'")
        return v

    @field_validator("clickhouse_dsn")
    @classmethod
    def _dsn_scheme(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = urlparse(v).scheme
        if scheme not in ("chdb", "http", "https"):
            raise ValueError(f"clickhouse_dsn must start with chdb://, http:// or https://, got {scheme!r}")
        return v

    @property
    def resolved_clickhouse_dsn(self) -> str:
        if self.clickhouse_dsn:
            return self.clickhouse_dsn
        return f"chdb://{(self.data_dir / 'chdb').resolve()}"

    def topic(self, name: str) -> str:
        """Full topic name for a logical name from ``infra/topics.yaml``."""
        return f"{self.topic_prefix}{name}"
