"""The center's settings: where it keeps its data, which database, where it listens, and how
long sessions and lock-outs last."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class CenterSettings(BaseModel):
    data_dir: Path
    database_url: str = Field(
        "", description="SQLAlchemy URL; default: SQLite (WAL) in data_dir/center.db"
    )
    address: str = "127.0.0.1"
    port: int = Field(8800, ge=1, le=65535)
    session_ttl_s: float = Field(12 * 3600, gt=0)
    lockout_after: int = Field(5, ge=1, description="failed logins in a row before a lock-out")
    lockout_s: float = Field(15 * 60, gt=0)
    allow_private_webhooks: bool = Field(
        False, description="let webhooks reach loopback, link-local and metadata addresses"
    )

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'center.db'}"

    @property
    def root_password_file(self) -> Path:
        return self.data_dir / "root-password"
