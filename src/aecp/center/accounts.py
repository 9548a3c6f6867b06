"""Users, roles and sessions: login (with lock-out), logout, who a session is, and the
administration of users and roles. Every function takes the caller's database session and
commits nothing: the request's unit of work commits (``api.deps``)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session as DB

from aecp.center import passwords, tasks
from aecp.center.db.models import Role, Session, User
from aecp.center.roles import PRESETS, allows
from aecp.common.clock import SYSTEM_CLOCK, Clock
from aecp.common.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthorized,
)
from aecp.model.base import check_name

ROOT = "root"
BAD_LOGIN = "wrong user name or password"  # one answer for an unknown user and a bad password


@dataclass(frozen=True)
class Caller:
    user: str
    role: str
    actions: frozenset[str]

    def may(self, action: str) -> bool:
        return allows(self.actions, action)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def ensure_presets(db: DB, now: float) -> None:
    """The preset roles, with this version's actions (a newer version may add some)."""
    for name, actions in PRESETS.items():
        role = db.get(Role, name)
        if role is None:
            db.add(Role(name=name, actions=" ".join(sorted(actions)), preset=True, created_at=now))
        else:
            role.actions = " ".join(sorted(actions))


def create_root(db: DB, now: float) -> str | None:
    """The ``root`` user with a random password, if there is none yet; returns the password
    (for the caller to show once and write to a 0600 file), or None."""
    if db.get(User, ROOT) is not None:
        return None
    password = secrets.token_urlsafe(18) + "-Aa1"
    db.add(
        User(
            name=ROOT,
            role="ROOT",
            password_hash=passwords.hash_password(password),
            disabled=False,
            failed_logins=0,
            locked_until=0.0,
            created_at=now,
        )
    )
    return password


class Accounts:
    def __init__(
        self, ttl: float, lockout_after: int, lockout_s: float, clock: Clock = SYSTEM_CLOCK
    ):
        self.ttl, self.lockout_after, self.lockout_s, self.clock = (
            ttl,
            lockout_after,
            lockout_s,
            clock,
        )

    # ---- sessions ---------------------------------------------------------------------------
    def login(self, db: DB, name: str, password: str) -> tuple[str, float]:
        """A session token and its expiry; ``Unauthorized`` with one message for an unknown
        user, a wrong password, a disabled or locked-out user (the hash is checked in every
        case, so the answer takes as long)."""
        now = self.clock.wall()
        user = db.get(User, name) if _valid_name(name) else None
        ok = passwords.verify(user.password_hash if user else None, password)
        if user is None or user.disabled or user.locked_until > now:
            raise Unauthorized(BAD_LOGIN)
        if not ok:
            # counted in the database, not read-modify-write: concurrent attempts all count
            db.execute(
                update(User).where(User.name == name).values(failed_logins=User.failed_logins + 1)
            )
            db.execute(
                update(User)
                .where(User.name == name, User.failed_logins >= self.lockout_after)
                .values(failed_logins=0, locked_until=now + self.lockout_s)
            )
            raise Unauthorized(BAD_LOGIN)
        user.failed_logins = 0
        token = "aoc_" + secrets.token_urlsafe(32)
        expires = now + self.ttl
        db.add(
            Session(token_sha256=token_digest(token), user=name, created_at=now, expires_at=expires)
        )
        return token, expires

    def logout(self, db: DB, token: str) -> None:
        db.execute(delete(Session).where(Session.token_sha256 == token_digest(token)))

    def caller(self, db: DB, token: str) -> Caller:
        """Who holds session ``token``; ``Unauthorized`` if it is unknown, expired, revoked,
        or its user is disabled or gone."""
        s = db.get(Session, token_digest(token))
        if s is None or s.expires_at <= self.clock.wall():
            raise Unauthorized("no valid session: log in")
        user = db.get(User, s.user)
        if user is None or user.disabled:
            raise Unauthorized("no valid session: log in")
        role = db.get(Role, user.role)
        actions = frozenset(role.actions.split()) if role else frozenset()
        return Caller(user.name, user.role, actions)

    # ---- users ------------------------------------------------------------------------------
    def users(self, db: DB) -> list[User]:
        return list(db.scalars(select(User).order_by(User.name)))

    def user(self, db: DB, name: str) -> User:
        check_name("name", name)
        user = db.get(User, name)
        if user is None:
            raise NotFound(f"user {name} does not exist", user=name)
        return user

    def create_user(self, db: DB, by: Caller, name: str, role: str, password: str) -> User:
        check_name("name", name)
        passwords.check_new(password)
        self._grantable(db, by, role)
        if db.get(User, name) is not None:
            raise AlreadyExists(f"user {name} already exists", field="name")
        user = User(
            name=name,
            role=role,
            password_hash=passwords.hash_password(password),
            disabled=False,
            failed_logins=0,
            locked_until=0.0,
            created_at=self.clock.wall(),
        )
        db.add(user)
        return user

    def update_user(
        self,
        db: DB,
        by: Caller,
        name: str,
        role: str | None,
        disabled: bool | None,
        password: str | None,
    ) -> User:
        """Change a user's role, password, or disable it (its sessions end at once)."""
        user = self.user(db, name)
        self._guard_root(by, user)
        self._grantable(db, by, user.role)  # nobody changes a user wider than itself
        if role is not None:
            if name == by.user and by.role != "ROOT":
                raise Forbidden("a user cannot change its own role", field="role")
            self._grantable(db, by, role)
            if name == ROOT and role != "ROOT":
                raise Conflict("the root user keeps the ROOT role", field="role")
            user.role = role
            db.execute(delete(Session).where(Session.user == name))
        if password is not None:
            user.password_hash = passwords.hash_password(passwords.check_new(password))
            user.failed_logins, user.locked_until = 0, 0.0  # a reset also unlocks
            db.execute(delete(Session).where(Session.user == name))
        if disabled is not None:
            if name == ROOT and disabled:
                raise Conflict("the root user cannot be disabled", field="disabled")
            user.disabled = disabled
            if disabled:
                db.execute(delete(Session).where(Session.user == name))
        return user

    def delete_user(self, db: DB, by: Caller, name: str) -> None:
        user = self.user(db, name)
        self._guard_root(by, user)
        self._grantable(db, by, user.role)
        if name == ROOT:
            raise Conflict("the root user cannot be deleted", user=name)
        if name == by.user:
            raise Conflict("a user cannot delete itself", user=name)
        db.execute(delete(Session).where(Session.user == name))
        tasks.forget_user(db, name, self.clock.wall())
        db.delete(user)

    def _grantable(self, db: DB, by: Caller, role: str) -> None:
        """``Forbidden`` unless ``by`` may hand out (or act on a holder of) ``role``: its
        actions are all ``by``'s own (``*`` only from ``*``; ROOT only from ROOT)."""
        target = self._role(db, role)
        actions = frozenset(target.actions.split())
        if role == "ROOT" and by.role != "ROOT":
            raise Forbidden("only a ROOT user may make a ROOT user", field="role")
        if "*" in by.actions:
            return
        if "*" in actions or not actions <= by.actions:
            raise Forbidden(
                f"role {role} allows more than {by.user}'s own role {by.role}", field="role"
            )

    @staticmethod
    def _guard_root(by: Caller, user: User) -> None:
        if user.role == "ROOT" and by.role != "ROOT":
            raise Forbidden(f"only a ROOT user may change the ROOT user {user.name}")

    # ---- roles ------------------------------------------------------------------------------
    def roles(self, db: DB) -> list[Role]:
        return list(db.scalars(select(Role).order_by(Role.name)))

    def _role(self, db: DB, name: str) -> Role:
        role = db.get(Role, name)
        if role is None:
            raise InvalidInput("role", f"role {name!r} does not exist")
        return role

    def create_role(self, db: DB, name: str, actions: frozenset[str]) -> Role:
        if not name.replace("_", "").replace("-", "").isalnum() or len(name) > 64:
            raise InvalidInput("name", "letters, digits, - and _ only, at most 64")
        if db.get(Role, name) is not None:
            raise AlreadyExists(f"role {name} already exists", field="name")
        role = Role(
            name=name, actions=" ".join(sorted(actions)), preset=False, created_at=self.clock.wall()
        )
        db.add(role)
        return role

    def delete_role(self, db: DB, name: str) -> None:
        role = db.get(Role, name)
        if role is None:
            raise NotFound(f"role {name} does not exist", role=name)
        if role.preset:
            raise Conflict(f"role {name} is a preset", role=name)
        if db.scalars(select(User).where(User.role == name)).first() is not None:
            raise Conflict(f"role {name} is some user's role", role=name)
        db.delete(role)


def _valid_name(name: str) -> bool:
    try:
        check_name("name", name)
    except InvalidInput:
        return False
    return True
