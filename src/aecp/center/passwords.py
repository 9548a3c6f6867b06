"""Password hashes (argon2) and the rule for new passwords."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from aecp.common.errors import InvalidInput

_HASHER = PasswordHasher()
MIN_LENGTH = 12
# hashed once: a login of an unknown user checks against it, so it takes as long as a real one
_DUMMY = _HASHER.hash("not a password of anyone's")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify(password_hash: str | None, password: str) -> bool:
    """True if ``password`` matches; with no hash (an unknown user) as slow as a real check."""
    try:
        return _HASHER.verify(password_hash or _DUMMY, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def check_new(password: str) -> str:
    """``InvalidInput`` (field ``password``) for a weak password."""
    if len(password) < MIN_LENGTH:
        raise InvalidInput("password", f"must be at least {MIN_LENGTH} characters")
    kinds = sum(any(f(c) for c in password) for f in (str.islower, str.isupper, str.isdigit)) + any(
        not c.isalnum() for c in password
    )
    if kinds < 3:
        raise InvalidInput(
            "password", "must mix at least three of: lower case, upper case, digits, symbols"
        )
    return password
