"""The center's secrets at rest: cluster credentials are encrypted (Fernet) with a key made
at first start in ``data_dir/secret.key`` (mode 0600). Losing the key loses the stored
credentials (the clusters are registered again); the database alone reveals none."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from aecp.common.errors import Unavailable


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def at(cls, path: Path) -> SecretBox:
        """The box of the key at ``path``, made now (0600) if there is none."""
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        return cls(path.read_bytes().strip())

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise Unavailable(
                "a stored credential does not open with this center's key (secret.key was "
                "replaced?): register the cluster again"
            ) from None
