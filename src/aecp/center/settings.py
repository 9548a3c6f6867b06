"""The center's settings: where it keeps its data, which database, where it listens, how long
sessions and lock-outs last, and, for a center of an HA trio, where its local Patroni and HA
agent answer (``CenterHA``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg")


class CenterHA(BaseModel):
    """A center of the HA trio: it serves writes only while its local PostgreSQL is Patroni's
    leader, and names the active (``management_ip``) to everyone else."""

    model_config = ConfigDict(extra="forbid")

    patroni_url: str = Field(
        description="the local Patroni's REST API, e.g. http://10.232.0.1:8008"
    )
    management_ip: str = Field(description="the management IP (bare address): where the active is")
    status_url: str = Field(
        description="the local HA agent's status, e.g. http://10.232.0.1:8009/status"
    )
    poll_s: float = Field(0.5, gt=0, le=60, description="seconds between two leadership probes")
    status_every_s: float = Field(
        2.0, gt=0, le=300, description="seconds between two reads of the HA agent's status"
    )
    status_token: SecretStr = Field(
        SecretStr(""), description="the trio's agent secret (sent as a bearer token), if any"
    )

    def status_headers(self) -> dict[str, str]:
        """The headers of a call to the HA agent."""
        token = self.status_token.get_secret_value()
        return {"Authorization": f"Bearer {token}"} if token else {}

    @field_validator("patroni_url")
    @classmethod
    def _patroni(cls, value: str) -> str:
        return _http_url(value, path_allowed=False).rstrip("/")

    @field_validator("status_url")
    @classmethod
    def _status(cls, value: str) -> str:
        return _http_url(value, path_allowed=True)

    @field_validator("management_ip")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not a bare IP address (no prefix, no port)") from None

    def active_url(self, port: int) -> str:
        """Where the active answers: ``http://<management_ip>:<port>``."""
        host = self.management_ip
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return f"http://{host}:{port}"


def _http_url(value: str, path_allowed: bool) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL with a host")
    if parts.query or parts.fragment or (not path_allowed and parts.path not in ("", "/")):
        raise ValueError(f"{value!r}: give scheme, host and port only")
    return value


class CenterSettings(BaseModel):
    data_dir: Path
    database_url: str = Field(
        "",
        description="SQLAlchemy URL; default: SQLite (WAL) in data_dir/center.db; in HA: "
        "postgresql+psycopg://user:password@host:port/database",
    )
    address: str = "127.0.0.1"
    port: int = Field(8800, ge=1, le=65535)
    session_ttl_s: float = Field(12 * 3600, gt=0)
    lockout_after: int = Field(5, ge=1, description="failed logins in a row before a lock-out")
    lockout_s: float = Field(15 * 60, gt=0)
    allow_private_webhooks: bool = Field(
        False, description="let webhooks reach loopback, link-local and metadata addresses"
    )
    ha: CenterHA | None = Field(None, description="set for a center of an HA trio")

    @model_validator(mode="after")
    def _ha_needs_postgres(self) -> CenterSettings:
        if self.ha is not None and not is_postgres(self.database_url):
            raise ValueError(
                "database_url: a center of an HA trio needs its local PostgreSQL "
                "(postgresql+psycopg://user:password@host:port/database)"
            )
        return self

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'center.db'}"

    @property
    def root_password_file(self) -> Path:
        return self.data_dir / "root-password"


def is_postgres(url: str) -> bool:
    """Whether ``url`` is a PostgreSQL URL (a driver named or not)."""
    return url.split(":", 1)[0] in POSTGRES_SCHEMES
