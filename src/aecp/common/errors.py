"""The one exception tree of AECP.

::

    AecpError                      500  root; never raised bare
    ├── InvalidInput               422  a field of a request or config is wrong (names the field)
    ├── Unauthorized               401  no or bad credentials
    ├── NotFound                   404  the named object does not exist
    ├── Conflict                   409  the request clashes with stored state
    │   ├── AlreadyExists          409  an object with that name exists
    │   ├── InvalidState           409  the operation is not valid in the object's current state
    │   └── NoCapacity             409  no node can take the object
    ├── Unavailable                503  a dependency cannot be reached right now
    │   └── StoreUnavailable       503  the cluster store (etcd) cannot be reached
    ├── LeaseExpired                    a store lease is gone (the holder must stop acting)
    ├── ImageError                 422  an image file is missing, corrupt or of an unknown format
    └── HypervisorError                 the hypervisor could not carry out a command
        └── LaunchError                 QEMU did not start (carries exit code, argv and output)

Errors that cross the API carry ``code`` and ``fields``; the API maps ``http_status`` onto the
response. ``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class AecpError(Exception):
    """Root of every AECP error: a message, a stable code and named fields."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields: dict[str, Any] = fields

    def to_dict(self) -> dict[str, Any]:
        """The JSON body the API returns for this error."""
        return {"error": self.code, "message": self.message, **self.fields}


class InvalidInput(AecpError):
    """A value given by a user is wrong; ``field`` names it."""

    code = "invalid_input"
    http_status = 422

    def __init__(self, field: str, reason: str, **fields: Any) -> None:
        super().__init__(f"{field}: {reason}", field=field, reason=reason, **fields)


class Unauthorized(AecpError):
    code = "unauthorized"
    http_status = 401


class Forbidden(AecpError):
    """The caller is known, and its role does not allow the request."""

    code = "forbidden"
    http_status = 403


class NotFound(AecpError):
    code = "not_found"
    http_status = 404


class Conflict(AecpError):
    code = "conflict"
    http_status = 409


class AlreadyExists(Conflict):
    code = "already_exists"


class InvalidState(Conflict):
    code = "invalid_state"


class NoCapacity(Conflict):
    code = "no_capacity"


class Compacted(AecpError):
    """A watch asked for changes from a revision the store no longer keeps: the caller must
    read everything again (``compact_revision``: the oldest revision still kept)."""

    code = "compacted"
    http_status = 410


class Unavailable(AecpError):
    code = "unavailable"
    http_status = 503


class StoreUnavailable(Unavailable):
    code = "store_unavailable"


class LeaseExpired(AecpError):
    code = "lease_expired"


class ImageError(AecpError):
    code = "image_error"
    http_status = 422


class HypervisorError(AecpError):
    code = "hypervisor_error"


class LaunchError(HypervisorError):
    """QEMU failed to launch; carries what is needed to understand why."""

    code = "launch_failed"

    def __init__(self, message: str, *, exit_code: int | None, argv: Sequence[str], output: str):
        super().__init__(message, exit_code=exit_code, output=output[-4000:])
        self.argv = list(argv)

    def __str__(self) -> str:
        return f"{self.message} (exit code {self.fields['exit_code']}): {self.fields['output']}"


class ConfigError(AecpError):
    """Settings failed validation; ``problems`` lists every problem found at once."""

    code = "config_error"
    http_status = 422

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("invalid settings: " + "; ".join(problems), problems=list(problems))
